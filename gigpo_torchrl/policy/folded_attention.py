"""Attention for one new token per row with grouped query heads folded onto their key-value
heads, for decode steps traced by ``torch.compile``.

A model with grouped-query attention (SmolLM2-135M: 9 query heads sharing 3 key-value
heads) keeps one key and value per key-value head. For a single query token transformers'
SDPA path folds each group of query heads into the query-length dimension, ``[B, H, 1, D]``
-> ``[B, H_kv, H / H_kv, D]``, so attention reads the cache as stored; but while dynamo
traces it (``is_torchdynamo_compiling()``), it expands the keys and values to every query
head instead (``repeat_kv``): a copy of three times the cache, written and read again, at
every compiled step of every layer. :data:`FOLDED` names an attention implementation that
folds under tracing too (the same numbers as transformers' eager fold), and
:func:`folding_gqa` switches a model to it around a decode step.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

FOLDED = "gigpo_folded_sdpa"


def folded_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``query`` ``[B, H, Q, D]``, ``key`` and
    ``value`` ``[B, H_kv, K, D]``, ``attention_mask`` a boolean ``[B, 1, Q, K]`` (true where
    a query attends) or None; returns ``[B, Q, H, D]``. With Q = 1 and grouped heads the
    query heads are folded onto their key-value heads; anything else goes to transformers'
    own SDPA function."""
    groups = getattr(module, "num_key_value_groups", 1)
    batch, heads, length, dim = query.shape
    if (
        length != 1
        or groups == 1
        or kwargs.get("position_bias") is not None
        or kwargs.get("softcap") is not None
        or (attention_mask is not None and attention_mask.shape[1] != 1)
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, **kwargs
        )
    # the query heads of a group are consecutive (repeat_kv's order): [B, H_kv, groups, D]
    folded = query.reshape(batch, heads // groups, groups, dim)
    out = torch.nn.functional.scaled_dot_product_attention(
        folded, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling
    )  # the mask [B, 1, 1, K] broadcasts over the heads and the folded queries
    return out.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


AttentionInterface.register(FOLDED, folded_sdpa)


@contextmanager
def folding_gqa(model: torch.nn.Module):
    """Run ``model``'s attention as :func:`folded_sdpa` inside the block when it runs SDPA
    (its config's ``_attn_implementation`` is set for the block, then restored; a model
    with another implementation is left as it is)."""
    config = model.config
    before = config._attn_implementation
    if before != "sdpa":
        yield
        return
    config._attn_implementation = FOLDED
    try:
        yield
    finally:
        config._attn_implementation = before
