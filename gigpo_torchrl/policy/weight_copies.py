"""The linear layers' weights copied into autocast's dtype once, not cast at every call.

Under autocast a linear layer casts its float32 weight and bias to the autocast dtype at
every forward call. autocast keeps those casts for as long as its context lasts, but only
for weights that require grad: a frozen weight (with ``--train_layers``, every layer below
the top ones, and the LM head) is cast again at every call. On a CPU that was about a quarter
of a small call (SmolLM2-135M under bfloat16: ~25 ms of a 93 ms prefill call of 4 × 8 tokens,
and as much at every decode step; see the README's Speed section). :func:`copies` keeps one
copy of each weight per model, copied again only when the weight has changed since (an
optimizer step or a loaded state dict moves the tensor's in-place version); :func:`call`
runs a module with them in place of its weights. autocast's cast and the copy are the same
conversion, so the numbers are the ones autocast computes.
"""

from __future__ import annotations

import itertools
import weakref

import torch
from torch import Tensor

# Benchmarks switch it off to measure what the copies save.
ENABLED = True

_GENERATIONS = itertools.count()


class _Copies:
    """One model's copies: ``tensors`` (name -> copy) of ``sources`` (name -> parameter)."""

    def __init__(self, dtype: torch.dtype, sources: dict[str, Tensor]):
        self.dtype, self.sources = dtype, sources
        # normal tensors even when made under inference mode: an update's forward, with grad
        # on, reads them too
        with torch.inference_mode(False):
            self.tensors = {n: torch.empty_like(t, dtype=dtype) for n, t in sources.items()}
        self.copied: dict[str, tuple[int, int]] = {}  # name -> (version, address) copied
        # tells a captured CUDA graph (which reads these tensors by address) they were replaced
        self.generation = next(_GENERATIONS)

    def matches(self, dtype: torch.dtype, sources: dict[str, Tensor]) -> bool:
        # the same parameters, and each where its copy can follow it (``module.to(device)``
        # keeps a parameter and swaps its data)
        return (
            dtype == self.dtype
            and sources.keys() == self.sources.keys()
            and all(
                t is self.sources[n]
                and t.shape == self.tensors[n].shape
                and t.device == self.tensors[n].device
                for n, t in sources.items()
            )
        )

    def refresh(self) -> None:
        """Copy again the weights changed since they were copied."""
        now = {n: (t._version, t.data_ptr()) for n, t in self.sources.items()}
        stale = [n for n, seen in now.items() if self.copied.get(n) != seen]
        if stale:
            with torch.no_grad():
                torch._foreach_copy_(
                    [self.tensors[n] for n in stale], [self.sources[n] for n in stale]
                )
            self.copied.update((n, now[n]) for n in stale)


_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _linear_weights(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, Tensor]:
    """name -> tensor of each linear layer's weight and bias not already in ``dtype``."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            for kind in ("weight", "bias"):
                tensor = getattr(module, kind)
                if tensor is not None and tensor.is_floating_point() and tensor.dtype != dtype:
                    out[f"{name}.{kind}" if name else kind] = tensor
    return out


def copies(model: torch.nn.Module, *, make: bool = True) -> _Copies | None:
    """``model``'s linear weights in the autocast dtype of its device, up to date; None when
    autocast is off there (or :data:`ENABLED` is false), when no weight needs a copy, or
    (``make=False``) when none are kept for it: the update reads the sampler's copies but
    makes none, so that after :func:`release` it takes no more memory than before."""
    device = next(model.parameters()).device.type
    if not (ENABLED and torch.is_autocast_enabled(device)):
        return None
    dtype = torch.get_autocast_dtype(device)
    sources = _linear_weights(model, dtype)
    if not sources:
        return None
    kept = _COPIES.get(model)
    if kept is None or not kept.matches(dtype, sources):
        if not make:
            return None
        _COPIES.pop(model, None)
        del kept  # its memory is free before the new copies are taken
        kept = _COPIES[model] = _Copies(dtype, sources)
    kept.refresh()
    return kept


def tensors(model: torch.nn.Module) -> dict[str, Tensor] | None:
    """``copies(model).tensors`` (name -> copy, made or refreshed here), or None where
    :func:`copies` gives none: what :func:`call` takes for a forward of ``model``."""
    kept = copies(model)
    return kept.tensors if kept is not None else None


def call(module: torch.nn.Module, tensors: dict[str, Tensor] | None, **inputs):
    """``module(**inputs)`` with ``tensors`` (name -> tensor, such as
    ``copies(model).tensors``) in place of its weights of those names; as it is when
    there are none. The tied input embedding keeps its own table: only the output layer
    reads the copy."""
    if not tensors:
        return module(**inputs)
    return torch.func.functional_call(module, tensors, kwargs=inputs, tie_weights=False)


def frozen_within(
    kept: _Copies | None, model: torch.nn.Module, module: torch.nn.Module
) -> dict[str, Tensor]:
    """The copies (``copies(model)``) of the weights inside ``model``'s
    submodule ``module`` that require no grad, named as in ``module``: for a forward with
    grad on, where the trained weights must stay the parameters themselves."""
    path = next((name for name, m in model.named_modules() if m is module), None)
    if kept is None or path is None:
        return {}
    prefix = f"{path}." if path else ""
    return {
        name.removeprefix(prefix): tensor
        for name, tensor in kept.tensors.items()
        if name.startswith(prefix) and not kept.sources[name].requires_grad
    }


def held_bytes(model: torch.nn.Module) -> int:
    """Bytes of the copies kept for ``model`` (0 when none)."""
    kept = _COPIES.get(model)
    if kept is None:
        return 0
    return sum(t.numel() * t.element_size() for t in kept.tensors.values())


def release(model: torch.nn.Module) -> None:
    """Drop ``model``'s copies; the next :func:`copies` makes them again."""
    _COPIES.pop(model, None)
