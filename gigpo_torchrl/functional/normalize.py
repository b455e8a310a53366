"""Group-relative normalisation: ``(x - baseline) / F`` within groups of members."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from gigpo_torchrl.functional.segments import (
    segment_count,
    segment_is_constant,
    segment_mean_std,
    segment_sum,
)

Norm = Literal["std", "none"]
StdFloor = Literal["clamp", "add"]
Singleton = Literal["zero", "raw"]


def group_normalize(
    values: Tensor,
    groups: Tensor,
    num_groups: int,
    *,
    norm: Norm = "std",
    eps: float = 1e-6,
    std_floor: StdFloor = "clamp",
    leave_one_out: bool = False,
    singleton: Singleton = "zero",
    weights: Tensor | None = None,
) -> Tensor:
    """Relative value of each member against the other members of its group.

    ``out = (x - baseline) / F`` where the baseline is the group mean (weighted by
    ``weights``) or, with ``leave_one_out``, the mean of the *other* members; ``F`` is 1 for
    ``norm="none"`` and, for ``norm="std"``, the unbiased group std floored at ``eps``
    (``std_floor="clamp"``: ``max(std, eps)``, the paper's and torchrl's rule) or offset by it
    (``"add"``: ``std + eps``, the verl-agent rule).

    Degenerate groups never blow up:

    - a group whose members are all exactly equal gives exactly 0;
    - a group of a single observation (one member; with ``weights``, a total weight of 1)
      gives 0 (``singleton="zero"``) or its raw value as if the group had mean 0 and std 1
      (``singleton="raw"``, verl-agent's rule for an episode group of one step row). A
      member of weight ``w > 1`` stands for ``w`` equal observations: alone in its group it
      gives 0.

    Args:
        values: float ``[M]``, one value per member.
        groups: int64 ``[M]`` dense group id of each member, in ``[0, num_groups)``.
        num_groups: number of groups.
        norm: ``"std"`` or ``"none"``.
        eps: floor of the std (``norm="std"`` only).
        std_floor: ``"clamp"`` or ``"add"``.
        leave_one_out: baseline excludes the member itself (RLOO); needs ``weights=None``.
        singleton: ``"zero"`` or ``"raw"``.
        weights: optional float ``[M]`` frequency weights for the mean and std.

    Returns:
        float ``[M]``.
    """
    if leave_one_out and weights is not None:
        raise ValueError("leave_one_out=True does not take weights")
    mean, std, total = segment_mean_std(values, groups, num_groups, weights)
    count = segment_count(groups, num_groups)
    single = count == 1 if weights is None else total <= 1
    # Per-group constants, gathered to the members in one indexing call.
    if norm == "none":
        scale = torch.ones_like(std)
    else:
        # A lone member is scored as if its group had mean 0 and std 1.
        std = torch.where(single, 1.0, std)
        scale = std + eps if std_floor == "add" else std.clamp_min(eps)
    zero = segment_is_constant(values, groups, num_groups) & ~single
    if singleton == "zero":
        zero |= single
    if leave_one_out:
        total = segment_sum(values, groups, num_groups)
        others = (count - 1).clamp_min(1).to(values.dtype)
        params = torch.stack([total, others, scale, zero.to(values.dtype)], 1)
        params = params.index_select(0, groups)
        baseline = (params[:, 0] - values) / params[:, 1]
    else:
        params = torch.stack([torch.where(single, 0.0, mean), scale, zero.to(values.dtype)], 1)
        params = params.index_select(0, groups)
        baseline = params[:, 0]
    out = (values - baseline) / params[:, -2]
    return torch.where(params[:, -1] != 0, 0.0, out)
