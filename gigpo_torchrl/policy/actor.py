"""``LLMPolicy``: replies to prompts with torchrl's LLM wrappers, with exact behaviour log-probs."""

from __future__ import annotations

import tempfile

import torch
from tensordict import NonTensorStack, TensorDict, TensorDictBase, lazy_stack
from tensordict.nn import TensorDictModuleBase
from torchrl.modules.llm import TransformersWrapper

from gigpo_torchrl.policy.prefix_cache import PrefixCache
from gigpo_torchrl.policy.sampling import Replies, SamplingSettings, sample_replies


def policy_inputs(prompts: list[str], actions: list | None = None) -> TensorDict:
    """The ``[len(prompts)]`` batch an :class:`LLMPolicy` answers: ``("text", "prompt")``
    and, for a policy that chooses among them, each prompt's ``admissible_actions``."""
    inputs = TensorDict({("text", "prompt"): NonTensorStack.from_list(prompts)}, [len(prompts)])
    if actions is not None:
        # tuples: from_list reads lists as nested stacks, and all-empty ones as no rows
        inputs["admissible_actions"] = NonTensorStack.from_list([tuple(a) for a in actions])
    return inputs


def read_actions(tensordict: TensorDictBase) -> list[list[str]] | None:
    """Each row's ``admissible_actions`` as a list of strings (None when the key is absent)."""
    actions = tensordict.get("admissible_actions", None)
    if actions is None:
        return None
    return [list(a) for a in (actions.tolist() if hasattr(actions, "tolist") else actions)]


def action_choices(tokenizer, actions: list[list[str]]) -> list[list[list[int]]]:
    """Per row, the token sequences of its actions, each followed by eos: the ``choices``
    of :func:`~gigpo_torchrl.policy.sampling.sample_replies`."""
    eos = tokenizer.eos_token_id
    return [[tokenizer.encode(a, add_special_tokens=False) + [eos] for a in row] for row in actions]


def scoring_wrapper(model, tokenizer) -> TransformersWrapper:
    """torchrl's wrapper computing teacher-forced log-probs of ``("tokens", "full")`` rows.

    Ragged rows stay unpadded (``pad_output=False``): padded output misaligns the "sft" mask
    of rows with different prompt lengths. This is also the actor ``GRPOLoss`` trains.
    """
    return TransformersWrapper(
        model,
        tokenizer=tokenizer,
        input_mode="tokens",
        generate=False,
        return_log_probs=True,
        pad_output=False,
    )


@torch.no_grad()
def score_tokens(wrapper: TransformersWrapper, full_tokens: list[torch.Tensor]) -> list:
    """Log-probs of every token of each sequence under ``wrapper`` (a :func:`scoring_wrapper`).

    Returns:
        One float tensor per sequence, as long as it (0 at position 0).
    """
    batch = lazy_stack([TensorDict({("tokens", "full"): t}) for t in full_tokens])
    # A fresh output TensorDict: in-place scoring would drop the prompt tokens (pitfall 6).
    out = wrapper(batch, tensordict_out=lazy_stack([TensorDict() for _ in full_tokens]))
    return out.get(("log_probs", "full"), as_list=True)


class LLMPolicy(TensorDictModuleBase):
    """Samples one reply per prompt and scores it by teacher forcing.

    Reads ``("text", "prompt")`` (one string per row of a ``[n]`` TensorDict) and returns a
    new ``[n]`` TensorDict of ragged rows (lazily stacked) holding the prompt text and:

    - ``("tokens", "prompt")``, ``("tokens", "response")``, ``("tokens", "full")`` int64;
    - ``("log_probs", "full")`` float: the behaviour log-prob of every reply token under the
      model that generated it (equal to teacher-forced scoring), NaN at prompt positions;
      this is what ``GRPOLoss`` reads as the sampling log-probs;
    - ``("log_probs", "response")``: the same log-probs, reply tokens only (what
      :class:`~gigpo_torchrl.objectives.GIGPOLoss` reads);
    - ``("text", "response")``: the decoded reply (special tokens removed).

    Args:
        model: a transformers causal LM.
        tokenizer: its tokenizer, with a pad token distinct from eos.
        temperature, top_p, max_new_tokens: sampling settings (``temperature=0`` is greedy).
        forbid_special: forbid generating special tokens other than eos (useful for tiny
            random models, whose samples would otherwise not round-trip through text).
        constrain_actions: when the input holds ``admissible_actions`` (a list of strings
            per row, as :class:`~gigpo_torchrl.collector.GroupCollector` passes), every
            reply is one of them followed by eos: a choice among the actions, never an
            invalid one. The policy is then the model's distribution renormalised over the
            tokens that continue an action; the rows carry the allowed sets as
            ``("allowed_tokens", "response")`` (int64 ``[len(reply), K]``, -1 padded) so
            that :class:`~gigpo_torchrl.objectives.GIGPOLoss` trains that same
            distribution.
        compile_decode: on CUDA, where decode steps replay a CUDA graph of a static
            cache, build that graph from a ``torch.compile``'d step (its small kernels
            fused; the first call compiles, about a minute at SmolLM2's size).
        sampler: a torchrl LLM wrapper that generates from ``("tokens", "prompt")`` instead
            of ``model.generate`` (e.g. a ``vLLMWrapper`` serving the same weights;
            :func:`make_policy` builds it for ``backend="vllm"``). Its replies are then
            scored by a teacher-forced pass of ``model``, so that the behaviour log-probs
            are exactly those of the model being trained.

    Attributes:
        prefix_cache: the keys and values of the last call's prompts, which the next
            call's prompts continue where they open the same way (the system prompt and
            task, an episode's history)
            (:class:`~gigpo_torchrl.policy.prefix_cache.PrefixCache`); emptied when the
            weights change in place and by :class:`~gigpo_torchrl.collector.GroupCollector`
            at every batch. Call its ``clear()`` after writing weights through
            ``tensor.data``; set it to None to encode every prompt whole at every call.
    """

    in_keys = [("text", "prompt")]
    out_keys = [
        ("tokens", "prompt"),
        ("tokens", "response"),
        ("tokens", "full"),
        ("log_probs", "full"),
        ("log_probs", "response"),
        ("text", "response"),
    ]

    def __init__(
        self,
        model,
        tokenizer,
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 64,
        forbid_special: bool = False,
        constrain_actions: bool = False,
        compile_decode: bool = False,
        sampler: TensorDictModuleBase | None = None,
    ):
        super().__init__()
        if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
            raise ValueError(
                "the tokenizer needs a pad token distinct from eos: masks built from the pad "
                "id would otherwise drop the reply's final eos"
            )
        if not temperature >= 0:
            raise ValueError(f"temperature={temperature!r} must be >= 0")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p={top_p!r} must be in (0, 1]")
        if (
            isinstance(max_new_tokens, bool)
            or not isinstance(max_new_tokens, int)
            or (max_new_tokens < 1)
        ):
            raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        generate_kwargs = {"max_new_tokens": max_new_tokens}
        if temperature > 0:
            generate_kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
        else:
            generate_kwargs.update(do_sample=False)
        if forbid_special:
            special = set(tokenizer.all_special_ids) - {tokenizer.eos_token_id}
            generate_kwargs["bad_words_ids"] = [[i] for i in sorted(special)]
        self.generate_kwargs = generate_kwargs
        stop = model.generation_config.eos_token_id
        stop = stop if isinstance(stop, list) else [stop]
        self.sampling = SamplingSettings(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            eos_ids=tuple(
                dict.fromkeys(i for i in [tokenizer.eos_token_id, *stop] if i is not None)
            ),
            forbidden_ids=tuple(i for (i,) in generate_kwargs.get("bad_words_ids", [])),
            compile_decode=compile_decode,
        )
        self.sampler = sampler
        self.prefix_cache: PrefixCache | None = PrefixCache()
        self.constrain_actions = constrain_actions
        self.scorer = scoring_wrapper(model, tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, prompts: list[str]) -> list[torch.Tensor]:
        """Token ids of each prompt text (no special tokens added: the template has them)."""
        if not prompts:
            return []
        # one batched call: the fast tokenizers encode a batch in parallel
        ids = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        return [torch.tensor(i, dtype=torch.long) for i in ids]

    @torch.no_grad()
    def score(self, full_tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        """Teacher-forced log-probs of each full sequence, as the training loss computes them."""
        return score_tokens(self.scorer, full_tokens)

    @torch.no_grad()
    def sync_sampler_weights(self) -> None:
        """Copy ``model``'s weights into a vLLM sampler after an update (no-op without one).

        Uses torchrl's direct vLLM weight loading; requires a GPU (not exercised on CPU CI).
        """
        if self.sampler is None:
            return
        from torchrl.weight_update.llm import VLLMDoubleBufferSyncScheme

        with tempfile.TemporaryDirectory() as scratch:
            receiver = VLLMDoubleBufferSyncScheme(remote_addr=scratch).create_receiver(
                self.sampler.model
            )
            receiver.apply_weights(TensorDict(dict(self.model.state_dict()), []))

    @torch.no_grad()
    def generate(
        self, prompt_tokens: list[torch.Tensor], actions: list[list[str]] | None = None
    ) -> Replies:
        """Sample replies (:func:`~gigpo_torchrl.policy.sampling.sample_replies`: identical
        prompts prefilled once, finished replies leave the batch) and keep each reply
        token's log-prob from the raw logits that sampled it — its teacher-forced log-prob,
        so no second forward pass over the prompts is needed. (torchrl's generate path
        zeroes the first reply token's log-prob, pitfall 2, hence our own loop.)

        With ``actions`` (per prompt, the admissible actions; used when the policy was built
        with ``constrain_actions=True``) each reply is one of them followed by eos, sampled
        from the model's distribution renormalised over the tokens that continue one.

        Returns:
            :class:`~gigpo_torchrl.policy.sampling.Replies`: per prompt, the reply tokens (up
            to and including eos), their log-probs and, when constrained, the allowed sets.
        """
        choices = None
        if self.constrain_actions and actions is not None:
            choices = action_choices(self.tokenizer, actions)
        return sample_replies(
            self.model,
            prompt_tokens,
            self.sampling,
            pad_id=self.tokenizer.pad_token_id,
            choices=choices,
            prefix_cache=self.prefix_cache,
        )

    @torch.no_grad()
    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        prompts = tensordict.get(("text", "prompt"))
        prompts = prompts.tolist() if hasattr(prompts, "tolist") else list(prompts)
        if isinstance(prompts, str):
            prompts = [prompts]
        prompt_tokens = self.encode(prompts)
        actions = read_actions(tensordict)
        if self.sampler is None:
            responses, response_log_probs, allowed = self.generate(prompt_tokens, actions)
            # Prompt positions are no reply tokens: NaN keeps them out of any ratio, as
            # torchrl does for its generate-path alignment pads.
            log_probs = [
                torch.cat([torch.full((len(p),), float("nan")), lp])
                for p, lp in zip(prompt_tokens, response_log_probs, strict=True)
            ]
            full = [torch.cat([p, r]) for p, r in zip(prompt_tokens, responses, strict=True)]
        else:
            generated = self.sampler(
                lazy_stack([TensorDict({("tokens", "prompt"): t}) for t in prompt_tokens])
            )
            responses = generated.get(("tokens", "response"), as_list=True)
            full = [torch.cat([p, r]) for p, r in zip(prompt_tokens, responses, strict=True)]
            log_probs = self.score(full)
            allowed = None
        rows = [
            TensorDict(
                {
                    ("tokens", "prompt"): p,
                    ("tokens", "response"): r,
                    ("tokens", "full"): f,
                    ("log_probs", "full"): lp,
                    ("log_probs", "response"): lp[len(p) :],
                    ("text", "prompt"): text,
                    ("text", "response"): self.tokenizer.decode(r, skip_special_tokens=True),
                }
            )
            for text, p, r, f, lp in zip(
                prompts, prompt_tokens, responses, full, log_probs, strict=True
            )
        ]
        if allowed is not None:  # the sets a constrained reply was sampled from
            for row, ids in zip(rows, allowed, strict=True):
                row.set(("allowed_tokens", "response"), ids)
        return lazy_stack(rows)
