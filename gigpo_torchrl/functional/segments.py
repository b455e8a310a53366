"""Segment primitives: dense ids for tuples of integer keys and per-segment reductions.

Everything here works on flat 1-D tensors of ``N`` rows (values may carry trailing
feature dims), in O(N log N) with sorts and ``index_add_``/``scatter_reduce``: no Python
loop over rows or segments, the same code on CPU and CUDA.
"""

from __future__ import annotations

import torch
from torch import Tensor


def dense_ids(key: Tensor) -> tuple[Tensor, Tensor]:
    """Dense id of each row's value, in increasing order of the values, and the counts.

    Compact keys (values spanning at most ``2N`` integers, as trajectory and group ids
    usually do) are numbered by counting in O(N); others by a sort.

    Args:
        key: integer ``[N]``.

    Returns:
        ``(ids, counts)``: ids int64 ``[N]`` in ``[0, K)``, counts int64 ``[K]``.
    """
    n = key.numel()
    if n:
        low, high = int(key.min()), int(key.max())
        if high - low < 2 * n:
            present = torch.bincount(key - low, minlength=high - low + 1)
            rank = torch.cumsum(present > 0, 0) - 1
            return rank.index_select(0, key - low), present[present > 0]
    return torch.unique(key, return_inverse=True, return_counts=True)[1:]


def segment_ids(*keys: Tensor) -> tuple[Tensor, int, Tensor]:
    """Dense id of each row's key tuple.

    Rows whose tuples ``(keys[0][i], keys[1][i], ...)`` are equal share an id; ids run
    from 0 to ``num_segments - 1`` in lexicographic order of the tuples. Arbitrary int64
    values are fine: each key is first made dense (< N), so packing two dense ids into one
    int64 cannot overflow for any batch below 3·10⁹ rows.

    Args:
        *keys: integer tensors of shape ``[N]``.

    Returns:
        ``(ids, num_segments, counts)``: ids int64 ``[N]``, counts int64 ``[num_segments]``.
    """
    ids, counts = dense_ids(keys[0])
    for key in keys[1:]:
        dense, key_counts = dense_ids(key)
        ids, counts = dense_ids(ids * key_counts.numel() + dense)
    return ids, counts.numel(), counts


def segment_sum(values: Tensor, ids: Tensor, num_segments: int) -> Tensor:
    """Sum of ``values`` (``[N, *F]``) per segment: ``[num_segments, *F]``."""
    out = values.new_zeros((num_segments, *values.shape[1:]))
    return out.index_add_(0, ids, values)


def segment_count(ids: Tensor, num_segments: int) -> Tensor:
    """Number of rows per segment: int64 ``[num_segments]``."""
    return torch.bincount(ids, minlength=num_segments)


def segment_mean_std(
    values: Tensor, ids: Tensor, num_segments: int, weights: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Weighted mean and unbiased standard deviation per segment.

    With frequency weights ``w`` (a row of weight 3 counts as three equal rows):
    ``mean = Σ w x / Σ w`` and ``std = sqrt(Σ w (x - mean)² / (Σ w - 1))``. The deviation
    is summed in a second pass, which stays accurate when the values are large and close.

    Args:
        values: float ``[N]``.
        ids: int64 ``[N]`` segment of each row.
        num_segments: number of segments.
        weights: optional float ``[N]`` frequency weights (default 1 per row).

    Returns:
        ``(mean, std, total_weight)``, each ``[num_segments]``; ``std`` is 0 for segments
        whose total weight is at most 1 (a single observation has no spread).
    """
    if weights is None:
        weights = torch.ones_like(values)
    total = segment_sum(weights, ids, num_segments)
    mean = segment_sum(weights * values, ids, num_segments) / total.clamp_min(1)
    deviation = values - mean.index_select(0, ids)
    squares = segment_sum(weights * deviation * deviation, ids, num_segments)
    std = torch.where(total > 1, (squares / (total - 1).clamp_min(1)).sqrt(), 0.0)
    return mean, std, total


def segment_is_constant(values: Tensor, ids: Tensor, num_segments: int) -> Tensor:
    """Whether all values of each segment are exactly equal: bool ``[num_segments]``.

    Max and min are exact whatever the reduction order, so this is the reliable test for
    a zero-variance group (a float std of equal values need not come out exactly 0).
    """
    high = values.new_full((num_segments,), float("-inf"))
    low = values.new_full((num_segments,), float("inf"))
    high = high.scatter_reduce(0, ids, values, reduce="amax")
    low = low.scatter_reduce(0, ids, values, reduce="amin")
    return high == low
