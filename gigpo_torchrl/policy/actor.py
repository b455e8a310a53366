"""``LLMPolicy``: replies to prompts with torchrl's LLM wrappers, with exact behaviour log-probs."""

from __future__ import annotations

import torch
from tensordict import TensorDict, TensorDictBase, lazy_stack
from tensordict.nn import TensorDictModuleBase
from torchrl.modules.llm import TransformersWrapper


class LLMPolicy(TensorDictModuleBase):
    """Samples one reply per prompt and scores it by teacher forcing.

    Reads ``("text", "prompt")`` (one string per row of a ``[n]`` TensorDict) and returns a
    new ``[n]`` TensorDict of ragged rows (lazily stacked) holding the prompt text and:

    - ``("tokens", "prompt")``, ``("tokens", "response")``, ``("tokens", "full")`` int64;
    - ``("log_probs", "full")`` float: log-probs of every full-sequence token under the
      model that generated it (0 at position 0), recomputed by a teacher-forced pass because
      torchrl's generate path zeroes the first reply token's log-prob and returns no full
      log-probs (shared/notes/torchrl-llm.md, pitfalls 1-2); these are the behaviour
      log-probs ``GRPOLoss`` reads;
    - ``("text", "response")``: the decoded reply (special tokens removed).

    Args:
        model: a transformers causal LM.
        tokenizer: its tokenizer, with a pad token distinct from eos.
        temperature, top_p, max_new_tokens: sampling settings (``temperature=0`` is greedy).
        forbid_special: forbid generating special tokens other than eos (useful for tiny
            random models, whose samples would otherwise not round-trip through text).
    """

    in_keys = [("text", "prompt")]
    out_keys = [
        ("tokens", "prompt"),
        ("tokens", "response"),
        ("tokens", "full"),
        ("log_probs", "full"),
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
        common = dict(tokenizer=tokenizer, input_mode="tokens", pad_output=False)
        self.sampler = TransformersWrapper(
            model, generate=True, return_log_probs=False, generate_kwargs=generate_kwargs, **common
        )
        self.scorer = TransformersWrapper(model, generate=False, return_log_probs=True, **common)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, prompts: list[str]) -> list[torch.Tensor]:
        """Token ids of each prompt text (no special tokens added: the template has them)."""
        return [
            torch.tensor(self.tokenizer.encode(p, add_special_tokens=False), dtype=torch.long)
            for p in prompts
        ]

    @torch.no_grad()
    def score(self, full_tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        """Teacher-forced log-probs of each full sequence, as the training loss computes them."""
        batch = lazy_stack([TensorDict({("tokens", "full"): t}) for t in full_tokens])
        # A fresh output TensorDict: in-place scoring would drop the prompt tokens (pitfall 6).
        out = self.scorer(batch, tensordict_out=lazy_stack([TensorDict() for _ in full_tokens]))
        return out.get(("log_probs", "full"), as_list=True)

    @torch.no_grad()
    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        prompts = tensordict.get(("text", "prompt"))
        prompts = prompts.tolist() if hasattr(prompts, "tolist") else list(prompts)
        if isinstance(prompts, str):
            prompts = [prompts]
        prompt_tokens = self.encode(prompts)
        generated = self.sampler(
            lazy_stack([TensorDict({("tokens", "prompt"): t}) for t in prompt_tokens])
        )
        responses = generated.get(("tokens", "response"), as_list=True)
        full = [torch.cat([p, r]) for p, r in zip(prompt_tokens, responses, strict=True)]
        log_probs = self.score(full)
        rows = [
            TensorDict(
                {
                    ("tokens", "prompt"): p,
                    ("tokens", "response"): r,
                    ("tokens", "full"): f,
                    ("log_probs", "full"): lp,
                    ("text", "prompt"): text,
                    ("text", "response"): self.tokenizer.decode(r, skip_special_tokens=True),
                }
            )
            for text, p, r, f, lp in zip(
                prompts, prompt_tokens, responses, full, log_probs, strict=True
            )
        ]
        return lazy_stack(rows)
