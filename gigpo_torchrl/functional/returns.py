"""Trajectories inside a flat batch of step rows, and their discounted returns.

A batch holds one row per (trajectory, step) in any order. ``trajectory_layout`` sorts the
rows into trajectory order once and checks that every trajectory is whole; the returns are
then computed in that order with a log-depth scan, so identical reward sequences always give
bit-identical returns wherever they sit in the batch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from gigpo_torchrl.functional.segments import segment_ids


class TrajectoryLayout(NamedTuple):
    """Where each trajectory's rows are.

    Attributes:
        order: int64 ``[N]``: row indices sorted by (trajectory, step).
        position: int64 ``[N]``: where each row stands in that order (``order``'s inverse).
        traj_index: int64 ``[N]``: dense trajectory index of each row, in input order.
        num_trajectories: ``T``.
        first: int64 ``[T]``: input row of each trajectory's step 0.
        last: int64 ``[T]``: input row of each trajectory's last step.
        length: int64 ``[T]``: number of steps of each trajectory.
    """

    order: Tensor
    position: Tensor
    traj_index: Tensor
    num_trajectories: int
    first: Tensor
    last: Tensor
    length: Tensor


def trajectory_layout(traj_id: Tensor, step: Tensor) -> TrajectoryLayout:
    """Sort step rows into trajectories and check that each one has steps ``0..L-1``.

    No comparison sort is needed: a whole trajectory of ``L`` rows holds steps ``0..L-1``, so
    row ``(k, t)`` goes to position ``start_k + t`` (a counting sort, O(N)).

    Args:
        traj_id: int64 ``[N]`` trajectory of each row (any values).
        step: int64 ``[N]`` step index of each row inside its trajectory.

    Returns:
        The :class:`TrajectoryLayout`.

    Raises:
        ValueError: naming the first trajectory with a missing, repeated or negative step.
    """
    n = step.numel()
    traj_index, num_traj, length = segment_ids(traj_id)
    start = torch.cumsum(length, 0) - length
    row_length = length.index_select(0, traj_index)
    in_range = (step >= 0) & (step < row_length)
    position = start.index_select(0, traj_index) + step
    bad = None
    if not bool(in_range.all()):
        bad = traj_index[torch.nonzero(~in_range)[0, 0]]
    else:
        filled = torch.bincount(position, minlength=n)
        if bool((filled != 1).any()):
            # A repeated step leaves a hole in its trajectory's block of positions.
            hole = torch.nonzero(filled != 1)[0, 0]
            bad = torch.searchsorted(start, hole, right=True) - 1
    if bad is not None:
        bad_rows = traj_index == bad
        steps = torch.sort(step[bad_rows]).values.tolist()
        raise ValueError(
            f"trajectory {int(traj_id[bad_rows][0])} is incomplete or has repeated steps: its "
            f"rows have steps {steps[:20]}{'...' if len(steps) > 20 else ''}, expected 0..L-1 "
            "with every step exactly once (each trajectory must be complete in the batch)"
        )
    order = torch.empty_like(position)
    order[position] = torch.arange(n, device=step.device)
    return TrajectoryLayout(
        order=order,
        position=position,
        traj_index=traj_index,
        num_trajectories=num_traj,
        first=order[start],
        last=order[start + length - 1],
        length=length,
    )


def check_done(layout: TrajectoryLayout, done: Tensor, traj_id: Tensor) -> None:
    """Check that each trajectory is done at its last step and only there.

    Args:
        layout: from :func:`trajectory_layout`.
        done: bool ``[N]`` (``("next", "done")`` of each row).
        traj_id: int64 ``[N]``, used to name a faulty trajectory.

    Raises:
        ValueError: naming the first trajectory that does not end with done, or that is
            done before its last step.
    """
    is_last = torch.zeros_like(done)
    is_last[layout.last] = True
    wrong = done != is_last
    if bool(wrong.any()):
        row = int(torch.nonzero(wrong)[0, 0])
        traj = int(traj_id[row])
        if bool(is_last[row]):
            raise ValueError(
                f"trajectory {traj} is not done at its last step: each trajectory must be "
                "complete in the batch (its last row has done=True)"
            )
        raise ValueError(
            f"trajectory {traj} is done before its last step: a trajectory id must not be "
            "reused after its episode ended"
        )


def check_finite(reward: Tensor, traj_id: Tensor, name: str = "reward") -> None:
    """Check that every reward is finite.

    A NaN or infinite reward would otherwise leak into the neighbouring trajectory (the scan
    multiplies it by the zero that ends a trajectory: ``0 * inf = nan``).

    Args:
        reward: float ``[N]``.
        traj_id: int64 ``[N]``, used to name the faulty trajectory.
        name: how the error message names the rewards.

    Raises:
        ValueError: naming the first non-finite value, its row and its trajectory.
    """
    finite = torch.isfinite(reward)
    if not bool(finite.all()):
        row = int(torch.nonzero(~finite)[0, 0])
        raise ValueError(
            f"{name} holds a non-finite reward ({float(reward[row])}) at row {row}, "
            f"in trajectory {int(traj_id[row])}"
        )


def reverse_discounted_cumsum(values: Tensor, length: Tensor, gamma: float) -> Tensor:
    """Discounted return-to-go of rows in trajectory order (each trajectory's rows together,
    by step): ``out[i] = values[i] + gamma * out[i + 1]`` inside a trajectory.

    The sum never crosses into the next trajectory. Computed by recursive doubling: after the
    pass with offset ``d`` every row holds the discounted sum of its next ``2d`` rows, so
    ``ceil(log2(max(length)))`` vectorised passes suffice (a loop over passes, not rows), and
    each row's result depends only on its own trajectory's rewards after it — provided the
    values are finite (``0 * inf`` is NaN): callers check them with :func:`check_finite`.

    Args:
        values: float ``[N]``, trajectory after trajectory.
        length: int64 ``[T]`` number of rows of each trajectory, in the same order.
        gamma: discount in ``[0, 1]``.

    Returns:
        float ``[N]``, the discounted return-to-go of each row.
    """
    total = values.clone()
    factor = torch.full_like(values, gamma)
    factor[torch.cumsum(length, 0) - 1] = 0.0  # a trajectory's last row continues nowhere
    max_length = int(length.max()) if length.numel() else 0
    offset = 1
    while offset < max_length:
        # The right-hand sides are computed before the slices are written, so the in-place
        # updates read this pass's old values. factor[i] is already 0 wherever i + offset
        # would leave the trajectory, hence also past the end of the array.
        total[:-offset] += factor[:-offset] * total[offset:]
        factor[:-offset] = factor[:-offset] * factor[offset:]
        offset *= 2
    return total


def discounted_returns(
    reward: Tensor,
    traj_id: Tensor,
    step: Tensor,
    gamma: float,
    layout: TrajectoryLayout | None = None,
) -> Tensor:
    """Per-row discounted return ``R_t = Σ_{k≥t} γ^{k-t} r_k`` within each trajectory.

    Args:
        reward: float ``[N]`` reward of each row, finite.
        traj_id: int64 ``[N]`` trajectory of each row.
        step: int64 ``[N]`` step of each row; rows may be in any order.
        gamma: discount in ``[0, 1]``.
        layout: a precomputed :func:`trajectory_layout` of ``(traj_id, step)``.

    Returns:
        float ``[N]`` in the input row order and ``reward``'s dtype.

    Raises:
        ValueError: naming a trajectory with a non-finite reward, or an incomplete one.
    """
    check_finite(reward, traj_id)
    if layout is None:
        layout = trajectory_layout(traj_id, step)
    sorted_returns = reverse_discounted_cumsum(
        reward.index_select(0, layout.order), layout.length, gamma
    )
    return sorted_returns.index_select(0, layout.position)
