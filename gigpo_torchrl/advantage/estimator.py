"""``GIGPOAdvantage``: the critic-free torchrl value estimator that writes GIGPO advantages."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch
from tensordict import TensorDictBase
from tensordict.utils import NestedKey
from torch import Tensor
from torchrl.objectives.value import ValueEstimatorBase

from gigpo_torchrl.functional import check_finite, check_options, gigpo_advantage
from gigpo_torchrl.functional.anchors import (
    history_anchor,
    parse_anchor,
    similar_text_anchor,
    text_hashes,
)


def read_rows(tensordict: TensorDictBase, key: NestedKey, kind: str) -> Tensor:
    """The flat ``[N]`` values of ``key`` in a ``[*B]`` batch of step rows.

    ``kind`` is ``"int"`` (returned as int64), ``"float"`` or ``"bool"``; the entry must be
    ``[*B]`` or ``[*B, 1]``. Raises ``ValueError`` naming the key otherwise.
    """
    value = tensordict.get(key, None)
    if value is None:
        raise ValueError(
            f"GIGPOAdvantage needs the key {key!r}, which the batch does not have "
            "(rename keys with set_keys)"
        )
    if not isinstance(value, Tensor):
        raise ValueError(f"key {key!r} must hold a tensor, got {type(value).__name__}")
    batch = tensordict.batch_size
    if value.shape not in (batch, (*batch, 1)):
        raise ValueError(
            f"key {key!r} has shape {tuple(value.shape)}; expected {tuple(batch)} "
            f"or {(*batch, 1)} for a batch of shape {tuple(batch)}"
        )
    dtype = value.dtype
    ok = {
        "int": not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool,
        "float": dtype.is_floating_point,
        "bool": dtype == torch.bool,
    }[kind]
    if not ok:
        expected = {"int": "an integer", "float": "a floating", "bool": "a bool"}[kind]
        raise ValueError(f"key {key!r} has dtype {dtype}; expected {expected} dtype")
    value = value.reshape(-1)
    return value.long() if kind == "int" else value


def read_texts(tensordict: TensorDictBase, key: NestedKey) -> list[str]:
    """The flat list of the ``N`` strings of ``key`` (a non-tensor entry) in a ``[*B]`` batch.

    Raises ``ValueError`` naming the key when it is missing or does not hold one string per row.
    """
    value = tensordict.get(key, None)
    if value is None:
        raise ValueError(
            f"GIGPOAdvantage needs the key {key!r}, which the batch does not have "
            "(rename keys with set_keys)"
        )
    n = tensordict.numel()
    if isinstance(value, str):
        texts = [value] * n
    else:
        texts = value.tolist() if hasattr(value, "tolist") else list(value)
        for _ in range(tensordict.batch_dims - 1):
            texts = [text for inner in texts for text in inner]
    if len(texts) != n or not all(isinstance(text, str) for text in texts):
        raise ValueError(f"key {key!r} must hold one string per row ({n} rows)")
    return texts


class StepRows(NamedTuple):
    """The estimator's inputs as flat ``[N]`` tensors, in the order ``gigpo_advantage`` takes
    them (``action_valid`` is its keyword argument; None unless a penalty is set)."""

    reward: Tensor
    done: Tensor
    group_id: Tensor
    traj_id: Tensor
    step: Tensor
    state_hash: Tensor | None
    action_valid: Tensor | None = None


class GIGPOAdvantage(ValueEstimatorBase):
    """Group-in-Group advantage over a batch of step rows (one row per trajectory step).

    Reads, for a TensorDict of batch shape ``[*B]`` holding whole trajectories in any row
    order (each key is ``[*B]`` or ``[*B, 1]``):

    - ``group_id``, ``traj_id``, ``step``, ``state_hash``: integer ids (``state_hash`` is
      needed by ``estimator="gigpo"`` only);
    - ``("next", "reward")``: float step reward, finite;
    - ``("next", "done")``: bool, True exactly at each trajectory's last step;
    - ``action_valid``: bool, only with a nonzero ``invalid_action_penalty``.

    Writes:

    - ``advantage``: ``[*B, 1]``, or ``[*B, 1, 1]`` when the batch carries LLM tokens (the
      ``tokens`` key, default ``("tokens", "full")``) so that torchrl's ``GRPOLoss``
      broadcasts it over each step's own response tokens; ``token_axis`` forces either;
    - ``episode_advantage``, ``step_advantage``, ``step_group_size``: ``[*B, 1]``
      diagnostics (the step ones only when ``state_hash`` is present);
    - ``value_target``: ``[*B, 1]`` discounted return-to-go ``R_t`` (a Monte-Carlo target).

    Every key can be renamed with :meth:`set_keys`.

    Args:
        estimator: ``"gigpo"`` (``A = A_E + ω·A_S``), ``"grpo"`` (``A = A_E``) or ``"rloo"``
            (leave-one-out ``A_E``).

    Keyword Args:
        gamma: discount of the step return. Default 0.95 (the paper's).
        step_advantage_weight: ω. Default 1.0.
        norm: ``"std"`` (divide by the group std) or ``"none"``. Default ``"std"``.
        eps: floor of the std. Default 1e-6.
        compat: None (the paper's semantics) or ``"verl-agent"`` (the authors' reference:
            episode statistics over the group's step rows, ``std + eps``; only a group of one
            row keeps its raw return).
        invalid_action_penalty: ``compat="verl-agent"`` only (their
            ``invalid_action_penalty_coef``; 0.1 in their examples). Default 0. When not 0,
            ``("next", "reward")`` must be the environment's reward *without* the penalty
            (for :class:`~gigpo_torchrl.envs.TextEnv` rows, ``set_keys(reward="env_reward")``)
            and ``action_valid`` is read: step returns are computed from the rewards, then the
            penalty is subtracted from each invalid row's own episode score and own step
            return (not discounted into earlier steps, other rows' scores unchanged), as the
            reference does. Without compat the penalty belongs in the reward itself, and a
            nonzero value is refused.
        anchor: which rows share an anchor (a step group) within an episode group:
            ``"state"`` (equal ``state_hash``, the default), ``"history:k"`` (equal
            ``state_hash`` and equal last ``k`` (``state_hash``, ``action_text``) pairs of the
            trajectory: the same view reached by a different recent past is another anchor)
            or ``"similar"`` (near-duplicate ``observation`` texts, see
            :func:`~gigpo_torchrl.functional.anchors.similar_text_anchor`; no ``state_hash``
            needed). ``step_group_size`` reports the resulting groups.
        similarity_threshold: ``anchor="similar"`` only: the estimated Jaccard similarity of
            two texts' word shingles at or above which they share an anchor. Default 0.8.
        token_axis: None (auto, see above), True or False.
        device: where buffers live (torchrl convention).

    Examples:
        >>> from torchrl.objectives.llm import GRPOLoss
        >>> loss = GRPOLoss(actor, masking_strategy="sft")
        >>> loss.make_value_estimator(GIGPOAdvantage(gamma=0.95))
        >>> batch = loss.value_estimator(batch)   # writes "advantage"
        >>> loss(batch)
    """

    @dataclass
    class _AcceptedKeys:
        """Configurable TensorDict keys (rename with ``set_keys``).

        The first eight are torchrl's common value-estimator keys, kept so that losses can
        forward their own names; ``reward``/``done``/``terminated`` are read under ``"next"``.
        """

        advantage: NestedKey = "advantage"
        value_target: NestedKey = "value_target"
        value: NestedKey = "state_value"
        reward: NestedKey = "reward"
        done: NestedKey = "done"
        terminated: NestedKey = "terminated"
        steps_to_next_obs: NestedKey = "steps_to_next_obs"
        sample_log_prob: NestedKey | None = None
        group_id: NestedKey = "group_id"
        traj_id: NestedKey = "traj_id"
        step: NestedKey = "step"
        state_hash: NestedKey = "state_hash"
        action_valid: NestedKey = "action_valid"
        observation: NestedKey = "observation"
        action_text: NestedKey = "action_text"
        episode_advantage: NestedKey = "episode_advantage"
        step_advantage: NestedKey = "step_advantage"
        step_group_size: NestedKey = "step_group_size"
        tokens: NestedKey = ("tokens", "full")

    default_keys = _AcceptedKeys

    def __init__(
        self,
        estimator: str = "gigpo",
        *,
        gamma: float = 0.95,
        step_advantage_weight: float = 1.0,
        norm: str = "std",
        eps: float = 1e-6,
        compat: str | None = None,
        invalid_action_penalty: float = 0.0,
        anchor: str = "state",
        similarity_threshold: float = 0.8,
        token_axis: bool | None = None,
        device: torch.device | None = None,
    ):
        check_options(
            estimator, gamma, step_advantage_weight, norm, eps, compat, invalid_action_penalty
        )
        self._anchor_mode, self._history = parse_anchor(anchor)
        threshold = similarity_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, int | float):
            raise ValueError(f"similarity_threshold={threshold!r} must be a number in (0, 1]")
        if not 0 < threshold <= 1:
            raise ValueError(f"similarity_threshold={threshold!r} must be in (0, 1]")
        if token_axis not in (None, True, False):
            raise ValueError(f"token_axis={token_axis!r} must be None, True or False")
        super().__init__(value_network=None, device=device)
        self.estimator = estimator
        self.gamma = gamma
        self.step_advantage_weight = step_advantage_weight
        self.norm = norm
        self.eps = eps
        self.compat = compat
        self.invalid_action_penalty = invalid_action_penalty
        self.anchor = anchor
        self.similarity_threshold = similarity_threshold
        self.token_axis = token_axis

    @property
    def in_keys(self) -> list[NestedKey]:
        keys = self.tensor_keys
        in_keys = [
            keys.group_id,
            keys.traj_id,
            keys.step,
            ("next", keys.reward),
            ("next", keys.done),
        ]
        if self.estimator == "gigpo":
            if self._anchor_mode != "similar":
                in_keys.append(keys.state_hash)
            if self._anchor_mode == "history":
                in_keys.append(keys.action_text)
            if self._anchor_mode == "similar":
                in_keys.append(keys.observation)
        if self.invalid_action_penalty:
            in_keys.append(keys.action_valid)
        return in_keys

    @property
    def out_keys(self) -> list[NestedKey]:
        keys = self.tensor_keys
        out = [keys.advantage, keys.value_target, keys.episode_advantage]
        if self.estimator == "gigpo":
            out += [keys.step_advantage, keys.step_group_size]
        return out

    def read_step_rows(self, tensordict: TensorDictBase) -> StepRows:
        """The flat, checked inputs of the estimator (see :class:`StepRows`).

        Raises:
            ValueError: naming a missing key, a wrong dtype or shape, or a non-finite reward.
        """
        if tensordict.batch_dims == 0:
            raise ValueError("GIGPOAdvantage expects a batch of step rows, got batch_size=[]")
        keys = self.tensor_keys
        reward_key = ("next", keys.reward)
        reward = read_rows(tensordict, reward_key, "float")
        traj_id = read_rows(tensordict, keys.traj_id, "int")
        check_finite(reward, traj_id, name=f"key {reward_key!r}")
        has_hash = keys.state_hash in tensordict.keys(True) or (
            self.estimator == "gigpo" and self._anchor_mode != "similar"
        )
        valid = None
        if self.invalid_action_penalty:
            valid = read_rows(tensordict, keys.action_valid, "bool")
        return StepRows(
            reward=reward,
            done=read_rows(tensordict, ("next", keys.done), "bool"),
            group_id=read_rows(tensordict, keys.group_id, "int"),
            traj_id=traj_id,
            step=read_rows(tensordict, keys.step, "int"),
            state_hash=read_rows(tensordict, keys.state_hash, "int") if has_hash else None,
            action_valid=valid,
        )

    def anchor_hash(self, tensordict: TensorDictBase, rows: StepRows) -> Tensor | None:
        """int64 ``[N]`` anchor of each row under :attr:`anchor` (None: no step groups).

        ``"state"`` is ``rows.state_hash``; ``"history:k"`` combines it with the last ``k``
        (state, action) pairs (:func:`~gigpo_torchrl.functional.anchors.history_anchor`);
        ``"similar"`` groups near-duplicate observation texts of each episode group
        (:func:`~gigpo_torchrl.functional.anchors.similar_text_anchor`). Outside
        ``estimator="gigpo"`` a mode whose keys are missing gives None (no diagnostics).
        """
        keys = self.tensor_keys
        mode = self._anchor_mode
        required = self.estimator == "gigpo"
        if mode == "state" or (mode == "history" and rows.state_hash is None):
            return rows.state_hash
        if mode == "history":
            if not required and keys.action_text not in tensordict.keys(True):
                return rows.state_hash
            actions = text_hashes(read_texts(tensordict, keys.action_text))
            actions = actions.to(rows.state_hash.device)
            return history_anchor(rows.state_hash, actions, rows.traj_id, rows.step, self._history)
        if not required and keys.observation not in tensordict.keys(True):
            return rows.state_hash
        texts = read_texts(tensordict, keys.observation)
        anchors = similar_text_anchor(texts, rows.group_id, threshold=self.similarity_threshold)
        return anchors.to(rows.group_id.device)

    @torch.no_grad()
    def forward(
        self,
        tensordict: TensorDictBase,
        *,
        params: TensorDictBase | None = None,
        target_params: TensorDictBase | None = None,
    ) -> TensorDictBase:
        """Write the advantages into ``tensordict`` (in place) and return it."""
        rows = self.read_step_rows(tensordict)
        out = gigpo_advantage(
            *rows[:5],
            self.anchor_hash(tensordict, rows),
            action_valid=rows.action_valid,
            invalid_action_penalty=self.invalid_action_penalty,
            estimator=self.estimator,
            gamma=self.gamma,
            step_advantage_weight=self.step_advantage_weight,
            norm=self.norm,
            eps=self.eps,
            compat=self.compat,
        )
        keys = self.tensor_keys
        row_shape = (*tensordict.batch_size, 1)
        token_axis = self.token_axis
        if token_axis is None:
            token_axis = keys.tokens in tensordict.keys(True)
        advantage_shape = (*row_shape, 1) if token_axis else row_shape
        tensordict.set(keys.advantage, out.advantage.reshape(advantage_shape))
        tensordict.set(keys.value_target, out.step_return.reshape(row_shape))
        tensordict.set(keys.episode_advantage, out.episode_advantage.reshape(row_shape))
        if out.step_advantage is not None:
            tensordict.set(keys.step_advantage, out.step_advantage.reshape(row_shape))
            tensordict.set(keys.step_group_size, out.step_group_size.reshape(row_shape))
            singletons = out.step_group_size == 1
            if self.estimator == "gigpo" and singletons.numel() and bool(singletons.all()):
                warnings.warn(
                    "GIGPOAdvantage: no anchor state repeats within its episode group in this "
                    f"batch (anchor={self.anchor!r}), so every step advantage is 0 and GIGPO "
                    "equals GRPO here. "
                    + (
                        f"No two {keys.observation!r} texts of a group are near-duplicates."
                        if self._anchor_mode == "similar"
                        else f"Check that the environment fills {keys.state_hash!r} with a "
                        "hash of its state."
                    ),
                    stacklevel=2,
                )
        return tensordict
