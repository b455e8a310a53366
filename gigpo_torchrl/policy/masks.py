"""4-D attention masks in the form a transformers model's attention implementation takes.

The sampler's decoders and the packed training forward build their own ``[B, 1, Q, K]``
boolean masks (true where a query attends). transformers passes a 4-D mask to the
attention function as it is: SDPA reads a boolean mask, but eager attention adds the mask
to its scores, so a boolean one would mask nothing. Nor does transformers apply a sliding
attention window to a mask it did not build, so sequences must stay within the window of
a model that has one (:func:`check_window`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from gigpo_torchrl.policy.folded_attention import FOLDED


def for_attention(config, mask: Tensor) -> Tensor:
    """``mask`` (boolean ``[B, 1, Q, K]``) as ``config``'s attention implementation takes it:
    as is for ``sdpa`` (and its folded form, :data:`~gigpo_torchrl.policy.folded_attention.
    FOLDED`); for ``eager``, float32, 0 where true and the most negative float32
    elsewhere (added to the scores).

    Raises:
        ValueError: for any other implementation (flash attention takes no 4-D mask).
    """
    attention = getattr(config, "_attn_implementation", None) or "sdpa"
    if attention in ("sdpa", FOLDED):
        return mask
    if attention == "eager":
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(
            ~mask, torch.finfo(torch.float32).min
        )
    raise ValueError(
        f"attention implementation {attention!r} does not take a 4-D attention mask; load "
        "the model with attn_implementation='sdpa' or 'eager'"
    )


def sliding_window(config) -> int | None:
    """The window of ``config``'s sliding-window attention layers, or None when it has none
    (``sliding_window`` unset, or ``layer_types`` naming no ``sliding_attention`` layer)."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not window or (types and "sliding_attention" not in types):
        return None
    return int(window)


def check_window(config, longest: int) -> None:
    """Raise a ``ValueError`` when ``config`` has sliding-window layers and a sequence of
    ``longest`` tokens would reach past their window: the masks given here span whole
    sequences, so those layers would attend further than the model does."""
    window = sliding_window(config)
    if window is not None and longest > window:
        raise ValueError(
            f"sequences of up to {longest} tokens reach past the model's sliding attention "
            f"window of {window} tokens (config.sliding_window), which the 4-D masks given to "
            "it do not apply: keep prompts plus replies within the window"
        )
