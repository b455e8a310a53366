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

from gigpo_torchrl.functional.segments import lexsort, segment_ids


class TrajectoryLayout(NamedTuple):
    """Where each trajectory's rows are.

    Attributes:
        order: int64 ``[N]``: row indices sorted by (trajectory, step).
        traj_index: int64 ``[N]``: dense trajectory index of each row, in input order.
        num_trajectories: ``T``.
        first: int64 ``[T]``: input row of each trajectory's step 0.
        last: int64 ``[T]``: input row of each trajectory's last step.
        length: int64 ``[T]``: number of steps of each trajectory.
    """

    order: Tensor
    traj_index: Tensor
    num_trajectories: int
    first: Tensor
    last: Tensor
    length: Tensor


def trajectory_layout(traj_id: Tensor, step: Tensor) -> TrajectoryLayout:
    """Sort step rows into trajectories and check that each one has steps ``0..L-1``.

    Args:
        traj_id: int64 ``[N]`` trajectory of each row (any values).
        step: int64 ``[N]`` step index of each row inside its trajectory.

    Returns:
        The :class:`TrajectoryLayout`.

    Raises:
        ValueError: naming the first trajectory with a missing or repeated step.
    """
    traj_index, num_traj = segment_ids(traj_id)
    order = lexsort(traj_index, step)
    sorted_traj = traj_index[order]
    starts = torch.ones_like(sorted_traj, dtype=torch.bool)
    starts[1:] = sorted_traj[1:] != sorted_traj[:-1]
    start_positions = torch.nonzero(starts).squeeze(-1)
    length = torch.diff(
        start_positions, append=torch.tensor([sorted_traj.numel()], device=step.device)
    )
    # A whole trajectory sorted by step reads 0, 1, ..., L-1.
    position = torch.arange(sorted_traj.numel(), device=step.device)
    expected = position - start_positions[sorted_traj]
    wrong = step[order] != expected
    if bool(wrong.any()):
        row = int(order[torch.nonzero(wrong)[0, 0]])
        bad = sorted_traj[torch.nonzero(wrong)[0, 0]]
        steps = step[order][sorted_traj == bad].tolist()
        raise ValueError(
            f"trajectory {int(traj_id[row])} is incomplete or has repeated steps: its rows "
            f"have steps {steps[:20]}{'...' if len(steps) > 20 else ''}, expected 0..L-1 "
            "with every step exactly once (each trajectory must be complete in the batch)"
        )
    return TrajectoryLayout(
        order=order,
        traj_index=traj_index,
        num_trajectories=num_traj,
        first=order[start_positions],
        last=order[start_positions + length - 1],
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


def reverse_discounted_cumsum(values: Tensor, continues: Tensor, gamma: float) -> Tensor:
    """``out[i] = values[i] + gamma * continues[i] * out[i + 1]`` over rows in order.

    Rows are in trajectory order; ``continues[i]`` is False at a trajectory's last row, so
    the sum never crosses into the next trajectory. Computed by recursive doubling: after the
    pass with offset ``d`` every row holds the discounted sum of its next ``2d`` rows, so
    ``ceil(log2(L_max))`` vectorised passes suffice (loop over passes, not rows).

    Args:
        values: float ``[N]``.
        continues: bool ``[N]``.
        gamma: discount in ``[0, 1]``.

    Returns:
        float ``[N]``, the discounted return-to-go of each row.
    """
    total = values.clone()
    factor = continues.to(values.dtype) * gamma
    offset = 1
    while bool((factor != 0).any()):
        # In-place updates would read entries already overwritten in this pass.
        new_total = total.clone()
        new_total[:-offset] += factor[:-offset] * total[offset:]
        new_factor = torch.zeros_like(factor)
        new_factor[:-offset] = factor[:-offset] * factor[offset:]
        total, factor = new_total, new_factor
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
        reward: float ``[N]`` reward of each row.
        traj_id: int64 ``[N]`` trajectory of each row.
        step: int64 ``[N]`` step of each row; rows may be in any order.
        gamma: discount in ``[0, 1]``.
        layout: a precomputed :func:`trajectory_layout` of ``(traj_id, step)``.

    Returns:
        float ``[N]`` in the input row order and ``reward``'s dtype.
    """
    if layout is None:
        layout = trajectory_layout(traj_id, step)
    order = layout.order
    sorted_traj = layout.traj_index[order]
    continues = torch.zeros_like(sorted_traj, dtype=torch.bool)
    continues[:-1] = sorted_traj[1:] == sorted_traj[:-1]
    sorted_returns = reverse_discounted_cumsum(reward[order], continues, gamma)
    out = torch.empty_like(sorted_returns)
    out[order] = sorted_returns
    return out
