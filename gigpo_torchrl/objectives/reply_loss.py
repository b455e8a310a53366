"""``GIGPOLoss``: the clipped-ratio policy loss over each step's reply tokens, critic-free."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.utils import NestedKey
from torch import Tensor
from torchrl.objectives import LossModule

from gigpo_torchrl.advantage import GIGPOAdvantage
from gigpo_torchrl.policy.frozen_layers import FrozenStates, frozen_depth
from gigpo_torchrl.policy.packing import (
    encode_frozen,
    pack_rows,
    plan_micro_batches,
    reply_log_probs,
)

LOSS_AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")


def token_weights(lengths: Tensor, mode: str, *, tokens: int, rows: int) -> Tensor:
    """The weight of each reply token in a loss aggregated with ``mode`` (verl's names).

    Args:
        lengths: int ``[R]`` reply lengths of the rows at hand.
        mode: ``"token_mean"`` (every token of the mini-batch weighs ``1/tokens``),
            ``"seq_mean_token_mean"`` (each row's token-mean, averaged over ``rows``) or
            ``"seq_mean_token_sum"`` (each row's token-sum, averaged over ``rows``).
        tokens, rows: reply tokens and non-empty rows of the whole mini-batch, so that
            micro-batches of it add up to the mini-batch's aggregate.

    Returns:
        float ``[lengths.sum()]``, rows after one another.
    """
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode={mode!r} is not one of {LOSS_AGG_MODES}")
    lengths = lengths.to(torch.float64)
    per_row = {
        "token_mean": torch.full_like(lengths, 1.0 / max(tokens, 1)),
        "seq_mean_token_mean": 1.0 / (lengths.clamp_min(1) * max(rows, 1)),
        "seq_mean_token_sum": torch.full_like(lengths, 1.0 / max(rows, 1)),
    }[mode]
    return per_row.repeat_interleave(lengths.long()).float()


class GIGPOLoss(LossModule):
    """Clipped-ratio (PPO/GRPO) loss with a KL penalty, over the current step's reply only.

    Reads a ``[R]`` batch of step rows (lazily stacked, ragged) with:

    - ``("tokens", "prompt")``, ``("tokens", "response")``: int64 token ids per row;
    - ``("log_probs", "response")``: float ``[len(response)]``, the behaviour log-probs;
    - ``advantage``: one value per row (``[R]``, ``[R, 1]`` or ``[R, 1, 1]``), e.g. from
      :class:`~gigpo_torchrl.GIGPOAdvantage`, the default value estimator;
    - ``("ref_log_probs", "response")`` when ``beta > 0`` (:meth:`reference_log_probs`);
    - ``("allowed_tokens", "response")`` when the replies were sampled among restricted
      token sets (:class:`~gigpo_torchrl.policy.LLMPolicy` with ``constrain_actions``):
      log-probs, ratios, KLs and entropy are then those of the model's distribution
      renormalised over each set, the distribution the replies were sampled from.

    Every term and diagnostic is computed over reply tokens only — never prompt or padding
    positions — with masks from the stored lengths, so any token id (pad, eos, other
    special tokens) may appear in a reply. Per token, with ``r = π/π_behaviour``:
    ``pg = −min(r·A, clip(r, 1−ε, 1+ε)·A)`` and ``kl = exp(ref − log π) − (ref − log π) − 1``
    (k3). Both are aggregated with ``loss_agg_mode`` (see :func:`token_weights`), the KL
    term times ``beta``; with ``entropy_coeff > 0`` the same aggregate of the per-token
    entropy, times ``entropy_coeff``, is subtracted (an exploration bonus, as torchrl's
    ``ClipPPOLoss(entropy_coeff=...)``). Rows are scored with
    :mod:`~gigpo_torchrl.policy.packing` (a shared prompt encoded once, the LM head at reply
    positions only).

    :meth:`forward` scores all the rows it is given in one pass (the torchrl convention).
    :meth:`backward` runs a mini-batch in micro-batches of at most
    ``max_tokens_per_micro_batch`` padded tokens (or ``micro_batch_size`` rows), calling
    ``backward()`` on each with the weights of the whole mini-batch: its gradient is the
    gradient of ``forward``'s loss on the whole mini-batch, whatever the split. When the
    model's bottom layers are frozen (``--train_layers``), :meth:`frozen_states` encodes
    them once over a whole batch, and :meth:`backward` given those states starts each
    forward above them (:mod:`~gigpo_torchrl.policy.frozen_layers`).

    Output keys (scalars): ``loss_objective``, ``loss_kl_to_ref`` (``beta``·KL),
    ``loss_entropy`` (−``entropy_coeff``·entropy), and the
    token-mean diagnostics ``kl_to_ref``, ``kl_to_behaviour`` (k3 estimate of
    KL(π_behaviour‖π)), ``clip_fraction`` (share of tokens with ``|r − 1| > ε``),
    ``entropy`` (of the full next-token distribution), ``ratio``; :meth:`backward` adds
    ``padding_fraction``, ``tokens``, ``real_tokens`` and ``micro_batches``.

    Args:
        model: the transformers causal LM (or peft model) being trained.

    Keyword Args:
        clip_epsilon: ε of the clipped ratio. Default 0.2.
        beta: KL-to-reference coefficient. Default 0 (no reference needed).
        entropy_coeff: entropy bonus coefficient. Default 0.
        loss_agg_mode: ``"token_mean"`` (default), ``"seq_mean_token_mean"`` or
            ``"seq_mean_token_sum"``.
        max_tokens_per_micro_batch: padded-token budget of one micro-batch in
            :meth:`backward`. Default 4096.
        micro_batch_size: rows per micro-batch instead of a token budget.
        max_sequence_tokens: positions of one packed sequence, in which rows with distinct
            prompts share their common prefix. Default 512 (attention over a packed sequence
            grows with its length; on a CPU 512 costs far less than the prefixes it saves).
    """

    @dataclass
    class _AcceptedKeys(LossModule._AcceptedKeys):
        """Configurable TensorDict keys (rename with ``set_keys``)."""

        advantage: NestedKey = "advantage"
        prompt_tokens: NestedKey = ("tokens", "prompt")
        response_tokens: NestedKey = ("tokens", "response")
        sample_log_prob: NestedKey = ("log_probs", "response")
        ref_log_probs: NestedKey = ("ref_log_probs", "response")
        allowed_tokens: NestedKey = ("allowed_tokens", "response")

    default_value_estimator = GIGPOAdvantage

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        clip_epsilon: float = 0.2,
        beta: float = 0.0,
        entropy_coeff: float = 0.0,
        loss_agg_mode: str = "token_mean",
        max_tokens_per_micro_batch: int | None = 4096,
        micro_batch_size: int | None = None,
        max_sequence_tokens: int = 512,
    ):
        if not clip_epsilon > 0:
            raise ValueError(f"clip_epsilon={clip_epsilon!r} must be > 0")
        if not beta >= 0:
            raise ValueError(f"beta={beta!r} must be >= 0")
        if not entropy_coeff >= 0:
            raise ValueError(f"entropy_coeff={entropy_coeff!r} must be >= 0")
        if loss_agg_mode not in LOSS_AGG_MODES:
            raise ValueError(f"loss_agg_mode={loss_agg_mode!r} is not one of {LOSS_AGG_MODES}")
        if micro_batch_size is not None:
            max_tokens_per_micro_batch = None
        # validates both budgets
        plan_micro_batches(
            [],
            [],
            max_tokens=max_tokens_per_micro_batch,
            max_rows=micro_batch_size,
            max_sequence=max_sequence_tokens,
        )
        super().__init__()
        self.model = model
        self.clip_epsilon = clip_epsilon
        self.beta = beta
        self.entropy_coeff = entropy_coeff
        self.loss_agg_mode = loss_agg_mode
        self.max_tokens_per_micro_batch = max_tokens_per_micro_batch
        self.micro_batch_size = micro_batch_size
        self.max_sequence_tokens = max_sequence_tokens

    @property
    def in_keys(self) -> list[NestedKey]:
        keys = self.tensor_keys
        in_keys = [keys.prompt_tokens, keys.response_tokens, keys.sample_log_prob, keys.advantage]
        return in_keys + ([keys.ref_log_probs] if self.beta > 0 else [])

    @property
    def out_keys(self) -> list[NestedKey]:
        return [
            "loss_objective",
            "loss_kl_to_ref",
            "loss_entropy",
            "kl_to_ref",
            "kl_to_behaviour",
            "clip_fraction",
            "entropy",
            "ratio",
        ]

    def _forward_value_estimator_keys(self, **kwargs) -> None:
        pass

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- reading rows ---------------------------------------------------------------------

    def _rows(self, tensordict: TensorDictBase) -> dict:
        keys = self.tensor_keys

        def tokens(key):
            value = tensordict.get(key, None, as_list=True)
            if value is None:
                raise ValueError(f"GIGPOLoss needs the key {key!r}, which the batch lacks")
            return value

        advantage = tensordict.get(keys.advantage, None)
        if advantage is None:
            raise ValueError(
                f"GIGPOLoss needs {keys.advantage!r}: run the value estimator first "
                "(loss.value_estimator(batch))"
            )
        rows = {
            "prompt": tokens(keys.prompt_tokens),
            "response": tokens(keys.response_tokens),
            "behaviour": tokens(keys.sample_log_prob),
            "advantage": advantage.reshape(-1).float(),
        }
        if self.beta > 0:
            rows["reference"] = tokens(keys.ref_log_probs)
        rows["allowed"] = self._allowed(tensordict)
        count = len(rows["prompt"])
        if rows["advantage"].numel() != count:
            raise ValueError(
                f"{keys.advantage!r} holds {rows['advantage'].numel()} values for {count} rows"
            )
        for i, (response, behaviour) in enumerate(
            zip(rows["response"], rows["behaviour"], strict=True)
        ):
            if behaviour.shape != response.shape:
                raise ValueError(
                    f"row {i}: {keys.sample_log_prob!r} has shape {tuple(behaviour.shape)} "
                    f"but its reply has {response.numel()} tokens"
                )
        return rows

    # -- the loss -------------------------------------------------------------------------

    def _terms(
        self, rows: dict, index: list[int], tokens: int, count: int, frozen: FrozenStates | None
    ) -> dict:
        """Weighted sums over rows ``index`` (weights of a mini-batch of ``tokens`` reply
        tokens in ``count`` non-empty rows): the loss terms and the diagnostics' sums."""
        device = self.device
        packed = pack_rows(
            [rows["prompt"][i] for i in index],
            [rows["response"][i] for i in index],
            max_sequence=self.max_sequence_tokens,
            allowed=None if rows["allowed"] is None else [rows["allowed"][i] for i in index],
            index=None if frozen is None else frozen.index,
        )
        packed = packed.to(device)
        log_probs, entropy = reply_log_probs(
            self.model, packed, entropy=True, entropy_grad=self.entropy_coeff > 0, frozen=frozen
        )

        def flat(name):
            return torch.cat([rows[name][i].reshape(-1) for i in index]).to(device).float()

        behaviour = flat("behaviour")
        advantage = rows["advantage"][index].to(device).repeat_interleave(packed.lengths)
        weights = token_weights(packed.lengths, self.loss_agg_mode, tokens=tokens, rows=count).to(
            device
        )
        log_ratio = log_probs - behaviour
        ratio = log_ratio.exp()
        clipped = ratio.clamp(1 - self.clip_epsilon, 1 + self.clip_epsilon)
        objective = -torch.minimum(ratio * advantage, clipped * advantage)
        terms = {
            "loss_objective": (weights * objective).sum(),
            "kl_to_behaviour": (ratio - 1 - log_ratio).detach().sum(),
            "clip_fraction": ((ratio - 1).abs() > self.clip_epsilon).float().sum(),
            "entropy": entropy.detach().sum(),
            "ratio": ratio.detach().sum(),
            "loss_entropy": -self.entropy_coeff * (weights * entropy).sum(),
        }
        if self.beta > 0:
            delta = flat("reference") - log_probs
            kl = delta.exp() - delta - 1
            terms["loss_kl_to_ref"] = self.beta * (weights * kl).sum()
            terms["kl_to_ref"] = kl.detach().sum()
        else:
            terms["loss_kl_to_ref"] = torch.zeros((), device=device)
            terms["kl_to_ref"] = torch.zeros((), device=device)
        terms["_padded"] = packed.padded_tokens
        terms["_real"] = packed.real_tokens
        return terms

    def _allowed(self, tensordict: TensorDictBase) -> list[Tensor] | None:
        """The rows' allowed token sets (replies sampled among the admissible actions), or
        None when the batch has none."""
        key = self.tensor_keys.allowed_tokens
        if key not in tensordict.keys(True):
            return None
        return tensordict.get(key, as_list=True)

    @staticmethod
    def _totals(rows: dict) -> tuple[int, int]:
        lengths = [r.numel() for r in rows["response"]]
        return sum(lengths), sum(1 for n in lengths if n)

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        """The loss of all rows of ``tensordict`` in one pass (differentiable)."""
        rows = self._rows(tensordict)
        tokens, count = self._totals(rows)
        terms = self._terms(rows, list(range(len(rows["prompt"]))), tokens, count, None)
        return self._output(terms, tokens)

    def _output(self, sums: dict, tokens: int) -> TensorDict:
        losses = ("loss_objective", "loss_kl_to_ref", "loss_entropy")
        out = {k: v for k, v in sums.items() if k in losses}
        for k in ("kl_to_ref", "kl_to_behaviour", "clip_fraction", "entropy", "ratio"):
            out[k] = sums[k] / max(tokens, 1)
        return TensorDict(out, [])

    def micro_batches(self, tensordict: TensorDictBase) -> list[list[int]]:
        """The row indices of each micro-batch :meth:`backward` runs."""
        keys = self.tensor_keys
        return plan_micro_batches(
            tensordict.get(keys.prompt_tokens, as_list=True),
            tensordict.get(keys.response_tokens, as_list=True),
            max_tokens=self.max_tokens_per_micro_batch,
            max_sequence=self.max_sequence_tokens,
            max_rows=self.micro_batch_size,
        )

    def frozen_states(self, tensordict: TensorDictBase) -> FrozenStates | None:
        """The model's frozen bottom layers encoded once over all rows of ``tensordict``
        (a whole batch, before it is split into mini-batches), for :meth:`backward`; None
        when no layer is frozen below a trained one
        (:func:`~gigpo_torchrl.policy.frozen_layers.frozen_depth`). Valid until the frozen
        layers change; run it under the autocast the update runs under."""
        depth = frozen_depth(self.model)
        if depth == 0:
            return None
        keys = self.tensor_keys
        return encode_frozen(
            self.model,
            tensordict.get(keys.prompt_tokens, as_list=True),
            tensordict.get(keys.response_tokens, as_list=True),
            depth=depth,
            max_tokens=self.max_tokens_per_micro_batch,
            max_rows=self.micro_batch_size,
            max_sequence=self.max_sequence_tokens,
        )

    def backward(
        self,
        tensordict: TensorDictBase,
        micro_batches: list[list[int]] | None = None,
        frozen: FrozenStates | None = None,
    ) -> TensorDict:
        """Accumulate the gradient of the mini-batch ``tensordict``'s loss, micro-batch by
        micro-batch (``micro_batches``: row indices, default :meth:`micro_batches`); with
        ``frozen`` (:meth:`frozen_states` of a batch holding these rows) each forward starts
        above the frozen layers.

        Returns the detached loss terms and diagnostics of the whole mini-batch, plus
        ``padding_fraction`` (share of processed positions that are padding), ``tokens``
        (positions processed), ``real_tokens`` (those holding a token) and
        ``micro_batches``.
        """
        rows = self._rows(tensordict)
        tokens, count = self._totals(rows)
        plan = self.micro_batches(tensordict) if micro_batches is None else micro_batches
        covered = sorted(i for batch in plan for i in batch)
        if covered != list(range(len(rows["prompt"]))):
            raise ValueError("micro_batches must cover every row exactly once")
        sums: dict = {}
        for index in plan:
            terms = self._terms(rows, index, tokens, count, frozen)
            (terms["loss_objective"] + terms["loss_kl_to_ref"] + terms["loss_entropy"]).backward()
            for key, value in terms.items():
                value = value.detach() if isinstance(value, Tensor) else value
                sums[key] = sums.get(key, 0) + value
        out = self._output(sums, tokens)
        padded = sums.get("_padded", 0)
        out["padding_fraction"] = torch.tensor(1 - sums.get("_real", 0) / max(padded, 1))
        out["tokens"] = torch.tensor(padded)
        out["real_tokens"] = torch.tensor(sums.get("_real", 0))
        out["micro_batches"] = torch.tensor(len(plan))
        return out

    @torch.no_grad()
    def reference_log_probs(
        self, reference: torch.nn.Module, tensordict: TensorDictBase
    ) -> list[Tensor]:
        """Score every row's reply under ``reference`` (micro-batched like :meth:`backward`)
        and store it at the ``ref_log_probs`` key; returns the per-row tensors (CPU)."""
        keys = self.tensor_keys
        prompts = tensordict.get(keys.prompt_tokens, as_list=True)
        responses = tensordict.get(keys.response_tokens, as_list=True)
        allowed = self._allowed(tensordict)
        out: list[Tensor | None] = [None] * len(prompts)
        device = next(reference.parameters()).device
        for index in self.micro_batches(tensordict):
            packed = pack_rows(
                [prompts[i] for i in index],
                [responses[i] for i in index],
                max_sequence=self.max_sequence_tokens,
                allowed=None if allowed is None else [allowed[i] for i in index],
            )
            log_probs, _ = reply_log_probs(reference, packed.to(device))
            parts = log_probs.float().cpu().split(packed.lengths.tolist())
            for i, part in zip(index, parts, strict=True):
                out[i] = part
        for row, log_probs in zip(tensordict.tensordicts, out, strict=True):
            row.set(keys.ref_log_probs, log_probs)
        return out
