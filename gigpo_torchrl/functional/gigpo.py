"""GIGPO advantages of a flat batch of step rows (arXiv 2505.10978, Eqs. 3, 5, 7, 8).

See ``docs/semantics.md`` for the exact semantics. All inputs are flat ``[N]`` tensors, one entry
per (trajectory, step) row, in any order; every trajectory must be complete.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from gigpo_torchrl.functional.normalize import Norm, group_normalize
from gigpo_torchrl.functional.returns import (
    TrajectoryLayout,
    check_done,
    check_finite,
    reverse_discounted_cumsum,
    trajectory_layout,
)
from gigpo_torchrl.functional.segments import dense_ids, segment_ids

Estimator = Literal["gigpo", "grpo", "rloo"]
Compat = Literal["verl-agent"] | None

ESTIMATORS = ("gigpo", "grpo", "rloo")
NORMS = ("std", "none")
COMPATS = (None, "verl-agent")


class GIGPOOutput(NamedTuple):
    """Per-row results, each ``[N]`` in the input row order.

    Attributes:
        advantage: the advantage to train on (``A_E + ω·A_S`` for gigpo, ``A_E`` otherwise).
        episode_advantage: ``A_E`` of the row's trajectory (in verl-agent compat with an
            invalid-action penalty, of the row itself: its score carries its own penalty).
        step_advantage: ``A_S`` of the row, or None when no state hash was given.
        step_group_size: int64 number of rows sharing the row's anchor state in its group,
            or None when no state hash was given.
        step_return: discounted return-to-go ``R_t`` of the row (in verl-agent compat, less
            the row's own invalid-action penalty).
        episode_return: undiscounted return ``R(τ)`` of the row's trajectory.
    """

    advantage: Tensor
    episode_advantage: Tensor
    step_advantage: Tensor | None
    step_group_size: Tensor | None
    step_return: Tensor
    episode_return: Tensor


def check_options(
    estimator: str,
    gamma: float,
    step_advantage_weight: float,
    norm: str,
    eps: float,
    compat,
    invalid_action_penalty: float = 0.0,
) -> None:
    """Raise ``ValueError`` naming the first invalid option value."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator={estimator!r} is not one of {ESTIMATORS}")
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r} is not one of {NORMS}")
    if compat not in COMPATS:
        raise ValueError(f"compat={compat!r} is not one of {COMPATS}")
    if compat == "verl-agent" and estimator == "rloo":
        raise ValueError(
            "compat='verl-agent' reproduces the reference's gigpo and grpo estimators; "
            "estimator='rloo' has no verl-agent counterpart"
        )
    for name, value in (("gamma", gamma), ("step_advantage_weight", step_advantage_weight)):
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise ValueError(f"{name}={value!r} must be a finite number")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma={gamma!r} must be in [0, 1]")
    if step_advantage_weight < 0:
        raise ValueError(f"step_advantage_weight={step_advantage_weight!r} must be >= 0")
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not eps > 0:
        raise ValueError(f"eps={eps!r} must be a positive number")
    penalty = invalid_action_penalty
    if (
        isinstance(penalty, bool)
        or not isinstance(penalty, int | float)
        or not math.isfinite(penalty)
        or penalty < 0
    ):
        raise ValueError(f"invalid_action_penalty={penalty!r} must be a finite number >= 0")
    if penalty != 0 and compat != "verl-agent":
        raise ValueError(
            f"invalid_action_penalty={penalty!r} applies only with compat='verl-agent' (the "
            "reference subtracts it after the returns are computed); otherwise put the penalty "
            "in the reward itself, as TextEnv does"
        )


def check_trajectories(
    traj_id: Tensor, step: Tensor, done: Tensor, group_id: Tensor
) -> TrajectoryLayout:
    """Check that every trajectory is complete and belongs to a single group.

    Returns:
        The :class:`~gigpo_torchrl.functional.returns.TrajectoryLayout` of the rows.

    Raises:
        ValueError: naming the first faulty trajectory.
    """
    layout = trajectory_layout(traj_id, step)
    check_done(layout, done, traj_id)
    mixed = group_id != group_id[layout.first].index_select(0, layout.traj_index)
    if bool(mixed.any()):
        row = int(torch.nonzero(mixed)[0, 0])
        raise ValueError(
            f"trajectory {int(traj_id[row])} has rows in several groups "
            f"({int(group_id[layout.first][layout.traj_index[row]])} and {int(group_id[row])})"
        )
    return layout


def anchor_groups(row_group: Tensor, state_hash: Tensor) -> tuple[Tensor, int, Tensor]:
    """Step groups: the rows that share an episode group and an anchor state hash.

    Args:
        row_group: int64 ``[N]`` dense episode group of each row.
        state_hash: int64 ``[N]`` anchor state of each row.

    Returns:
        ``(ids, num_step_groups, counts)`` as :func:`~gigpo_torchrl.functional.segment_ids`
        (ids numbered in no particular order).
    """
    state, state_counts = dense_ids(state_hash)
    num_states = state_counts.numel()
    low = row_group.new_full((num_states,), row_group.numel())
    low = low.scatter_reduce(0, state, row_group, reduce="amin")
    high = torch.zeros_like(low).scatter_reduce(0, state, row_group, reduce="amax")
    # Usually no state hash occurs in two episode groups (they start from different
    # seeds); then the hash alone is the key and a second sort is saved.
    if bool((low == high).all()):
        return state, num_states, state_counts
    ids, counts = dense_ids(row_group * num_states + state)
    return ids, counts.numel(), counts


def episode_advantage(
    episode_return: Tensor,
    traj_group: Tensor,
    num_groups: int,
    *,
    length: Tensor,
    leave_one_out: bool = False,
    norm: Norm = "std",
    eps: float = 1e-6,
    compat: Compat = None,
) -> Tensor:
    """Episode-level relative advantage ``A_E`` of each trajectory (Eq. 3).

    Args:
        episode_return: float ``[T]`` return of each trajectory.
        traj_group: int64 ``[T]`` dense episode group of each trajectory.
        num_groups: number of episode groups.
        length: int64 ``[T]`` number of steps of each trajectory (used by verl-agent's
            length-weighted statistics).
        leave_one_out: RLOO baseline (mean of the other trajectories).
        norm: ``"std"`` or ``"none"``.
        eps: std floor.
        compat: None (paper) or ``"verl-agent"``.

    Returns:
        float ``[T]``.
    """
    if compat == "verl-agent":
        # The reference scores every step row with its trajectory's return, so each
        # trajectory counts once per step (weight L); only a group of one row (a lone
        # trajectory of one step) keeps its raw return. See verl_agent_episode_advantage
        # for the per-row form that takes the invalid-action penalty.
        return group_normalize(
            episode_return,
            traj_group,
            num_groups,
            norm=norm,
            eps=eps,
            std_floor="add",
            singleton="raw",
            weights=length.to(episode_return.dtype),
        )
    return group_normalize(
        episode_return, traj_group, num_groups, norm=norm, eps=eps, leave_one_out=leave_one_out
    )


def verl_agent_episode_advantage(
    row_score: Tensor,
    row_group: Tensor,
    num_groups: int,
    *,
    norm: Norm = "std",
    eps: float = 1e-6,
) -> Tensor:
    """verl-agent's episode advantage of each step row.

    The reference scores each step row (its trajectory's return, less the invalid-action
    penalty when the row's action was invalid) and normalises the scores over all rows of the
    episode group: ``(score - mean) / (std + eps)``, unbiased std; a group of one row keeps its
    raw score (mean 0, std 1); a group of equal scores (such as a lone trajectory of several
    valid steps) gives exactly 0.

    Args:
        row_score: float ``[N]`` score of each row.
        row_group: int64 ``[N]`` dense episode group of each row.
        num_groups: number of episode groups.
        norm: ``"std"`` (their ``mean_std_norm``) or ``"none"`` (their ``mean_norm``).
        eps: added to the std.

    Returns:
        float ``[N]``.
    """
    return group_normalize(
        row_score, row_group, num_groups, norm=norm, eps=eps, std_floor="add", singleton="raw"
    )


def step_advantage(
    step_return: Tensor,
    step_group: Tensor,
    num_step_groups: int,
    *,
    norm: Norm = "std",
    eps: float = 1e-6,
    compat: Compat = None,
) -> Tensor:
    """Step-level relative advantage ``A_S`` of each row among rows of the same anchor (Eq. 7).

    Args:
        step_return: float ``[N]`` discounted return-to-go of each row.
        step_group: int64 ``[N]`` dense (episode group, state hash) id of each row.
        num_step_groups: number of step groups.
        norm: ``"std"`` or ``"none"``.
        eps: std floor.
        compat: None (paper) or ``"verl-agent"``.

    Returns:
        float ``[N]``; 0 for rows alone in their step group.
    """
    return group_normalize(
        step_return,
        step_group,
        num_step_groups,
        norm=norm,
        eps=eps,
        std_floor="add" if compat == "verl-agent" else "clamp",
    )


def gigpo_advantage(
    reward: Tensor,
    done: Tensor,
    group_id: Tensor,
    traj_id: Tensor,
    step: Tensor,
    state_hash: Tensor | None = None,
    *,
    estimator: Estimator = "gigpo",
    gamma: float = 0.95,
    step_advantage_weight: float = 1.0,
    norm: Norm = "std",
    eps: float = 1e-6,
    compat: Compat = None,
    action_valid: Tensor | None = None,
    invalid_action_penalty: float = 0.0,
) -> GIGPOOutput:
    """Advantages of a batch of complete trajectories.

    Computed in float64 and returned in ``reward``'s dtype. Cost O(N log N): a few sorts
    and segment reductions.

    With ``compat="verl-agent"`` and ``invalid_action_penalty > 0``, ``reward`` is the
    environment's reward *without* the penalty (as the reference's step returns are): the
    step returns and trajectory returns are computed from it, then each row whose
    ``action_valid`` is False has the penalty subtracted from its own episode score and its
    own step return only.

    Args:
        reward: float ``[N]`` step reward of each row, finite.
        done: bool ``[N]`` whether the episode ended at this row.
        group_id: int64 ``[N]`` episode group (same task and seed).
        traj_id: int64 ``[N]`` trajectory, unique in the batch.
        step: int64 ``[N]`` step index inside the trajectory, from 0.
        state_hash: int64 ``[N]`` anchor state before the action; required for gigpo.
        estimator: ``"gigpo"``, ``"grpo"`` or ``"rloo"``.
        gamma: discount of the step return (Eq. 5).
        step_advantage_weight: ω in ``A = A_E + ω·A_S``.
        norm: ``"std"`` or ``"none"``.
        eps: std floor.
        compat: None or ``"verl-agent"``.
        action_valid: bool ``[N]``, whether each row's action was valid; read only when
            ``invalid_action_penalty`` is not 0.
        invalid_action_penalty: verl-agent compat only (their ``invalid_action_penalty_coef``,
            0.1 in their examples); must be 0 otherwise.

    Returns:
        :class:`GIGPOOutput`.

    Raises:
        ValueError: naming a bad option, a trajectory with a non-finite reward, an
            incomplete trajectory, or a missing or non-bool ``action_valid``.
    """
    check_options(
        estimator, gamma, step_advantage_weight, norm, eps, compat, invalid_action_penalty
    )
    if estimator == "gigpo" and state_hash is None:
        raise ValueError("estimator='gigpo' needs state_hash (the anchor state of each row)")
    penalize = invalid_action_penalty != 0
    if penalize and (
        action_valid is None
        or action_valid.dtype != torch.bool
        or action_valid.numel() != reward.numel()
    ):
        got = "none"
        if action_valid is not None:
            got = f"dtype {action_valid.dtype}, shape {tuple(action_valid.shape)}"
        raise ValueError(
            f"invalid_action_penalty={invalid_action_penalty!r} needs a bool action_valid per "
            f"row, got {got}"
        )
    if reward.numel() == 0:
        empty = reward.new_zeros(0)
        has_step = state_hash is not None
        size = group_id.new_zeros(0) if has_step else None
        return GIGPOOutput(empty, empty, empty if has_step else None, size, empty, empty)
    check_finite(reward, traj_id)
    layout = check_trajectories(traj_id, step, done, group_id)
    order, length = layout.order, layout.length

    # Work in trajectory order (each trajectory's rows together, by step), where per-
    # trajectory values spread to rows by repeat_interleave instead of random gathers;
    # the results go back to the input order at the end.
    sorted_reward = reward.to(torch.float64).index_select(0, order)
    step_return = reverse_discounted_cumsum(sorted_reward, length, gamma)
    # A sequential sum per trajectory: equal trajectories give bit-equal returns.
    returns = torch.segment_reduce(sorted_reward, "sum", lengths=length)
    traj_group, num_groups, _ = segment_ids(group_id[layout.first])
    row_group = torch.repeat_interleave(traj_group, length)
    if compat == "verl-agent":
        # The reference's per-row scores; its penalty hits the invalid row itself only.
        row_score = torch.repeat_interleave(returns, length)
        if penalize:
            invalid = ~action_valid.reshape(-1).index_select(0, order)
            penalty = invalid.to(torch.float64) * invalid_action_penalty
            row_score = row_score - penalty
            step_return = step_return - penalty
        episode_adv = verl_agent_episode_advantage(
            row_score, row_group, num_groups, norm=norm, eps=eps
        )
    else:
        traj_advantage = episode_advantage(
            returns,
            traj_group,
            num_groups,
            length=length,
            leave_one_out=estimator == "rloo",
            norm=norm,
            eps=eps,
        )
        episode_adv = torch.repeat_interleave(traj_advantage, length)
    advantage = episode_adv
    step_adv = group_size = None
    if state_hash is not None:
        step_group, num_step_groups, counts = anchor_groups(
            row_group, state_hash.index_select(0, order)
        )
        step_adv = step_advantage(
            step_return, step_group, num_step_groups, norm=norm, eps=eps, compat=compat
        )
        if estimator == "gigpo":
            advantage = episode_adv + step_advantage_weight * step_adv
        step_adv = step_adv.index_select(0, layout.position).to(reward.dtype)
        group_size = counts.index_select(0, step_group).index_select(0, layout.position)
    return GIGPOOutput(
        advantage=advantage.index_select(0, layout.position).to(reward.dtype),
        episode_advantage=episode_adv.index_select(0, layout.position).to(reward.dtype),
        step_advantage=step_adv,
        step_group_size=group_size,
        step_return=step_return.index_select(0, layout.position).to(reward.dtype),
        episode_return=returns.index_select(0, layout.traj_index).to(reward.dtype),
    )
