"""4-D attention masks in the form a transformers model's attention implementation takes.

The sampler's decoders and the packed training forward build their own ``[B, 1, Q, K]``
boolean masks (true where a query attends). transformers passes a 4-D mask to the
attention function as it is: SDPA reads a boolean mask, but eager attention adds the mask
to its scores, so a boolean one would mask nothing.
"""

from __future__ import annotations

import torch
from torch import Tensor


def for_attention(config, mask: Tensor) -> Tensor:
    """``mask`` (boolean ``[B, 1, Q, K]``) as ``config``'s attention implementation takes it:
    as is for ``sdpa``; for ``eager``, float32, 0 where true and the most negative float32
    elsewhere (added to the scores).

    Raises:
        ValueError: for any other implementation (flash attention takes no 4-D mask).
    """
    attention = getattr(config, "_attn_implementation", None) or "sdpa"
    if attention == "sdpa":
        return mask
    if attention == "eager":
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(
            ~mask, torch.finfo(torch.float32).min
        )
    raise ValueError(
        f"attention implementation {attention!r} does not take a 4-D attention mask; load "
        "the model with attn_implementation='sdpa' or 'eager'"
    )
