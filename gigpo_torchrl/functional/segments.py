"""Segment primitives: dense ids for tuples of integer keys and per-segment reductions.

Everything here works on flat 1-D tensors of ``N`` rows (values may carry trailing
feature dims), in O(N log N) with sorts and ``index_add_``/``scatter_reduce``: no Python
loop over rows or segments, the same code on CPU and CUDA.
"""

from __future__ import annotations

import torch
from torch import Tensor


def lexsort(*keys: Tensor) -> Tensor:
    """Row order sorting ``N`` rows by ``keys[0]``, then ``keys[1]``, and so on.

    Args:
        *keys: integer tensors of shape ``[N]``; the first key is the most significant.

    Returns:
        int64 permutation ``[N]`` such that ``keys[k][order]`` is lexicographically sorted.
    """
    order = torch.arange(keys[0].numel(), device=keys[0].device)
    # Stable sorts from the least to the most significant key give lexicographic order.
    for key in reversed(keys):
        order = order[torch.argsort(key[order], stable=True)]
    return order


def segment_ids(*keys: Tensor) -> tuple[Tensor, int]:
    """Dense id of each row's key tuple.

    Rows whose tuples ``(keys[0][i], keys[1][i], ...)`` are equal share an id; ids run
    from 0 to ``num_segments - 1`` in lexicographic order of the tuples. Arbitrary int64
    values are fine (nothing is packed into a single integer, so nothing can overflow).

    Args:
        *keys: integer tensors of shape ``[N]``.

    Returns:
        ``(ids, num_segments)`` with ``ids`` int64 ``[N]``.
    """
    n = keys[0].numel()
    if n == 0:
        return keys[0].new_zeros(0, dtype=torch.long), 0
    order = lexsort(*keys)
    starts = torch.zeros(n, dtype=torch.bool, device=keys[0].device)
    starts[0] = True
    for key in keys:
        sorted_key = key[order]
        starts[1:] |= sorted_key[1:] != sorted_key[:-1]
    sorted_ids = starts.cumsum(0) - 1
    ids = torch.empty_like(sorted_ids)
    ids[order] = sorted_ids
    return ids, int(sorted_ids[-1]) + 1


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
    deviation = values - mean[ids]
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
