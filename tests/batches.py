"""Build step-row batches from readable trajectory specs, and a slow loop reference."""

from __future__ import annotations

import statistics
from collections import defaultdict

import torch
from tensordict import TensorDict


def make_batch(trajectories, *, order=None, dtype=torch.float64) -> TensorDict:
    """Step rows of ``trajectories``, a list of ``(group, traj, steps)`` where each step is
    ``(state_hash, reward)`` or ``(state_hash, reward, action_valid)`` (valid by default).

    Rows come trajectory by trajectory, step by step, unless ``order`` (a permutation of the
    rows) is given.
    """
    rows = [
        (group, traj, t, spec[0], spec[1], t == len(steps) - 1, spec[2] if len(spec) > 2 else True)
        for group, traj, steps in trajectories
        for t, spec in enumerate(steps)
    ]
    if order is not None:
        rows = [rows[i] for i in order]
    columns = zip(*rows, strict=True) if rows else ([],) * 7
    group, traj, step, state, reward, done, valid = columns
    n = len(rows)
    return TensorDict(
        {
            "group_id": torch.tensor(group, dtype=torch.long),
            "traj_id": torch.tensor(traj, dtype=torch.long),
            "step": torch.tensor(step, dtype=torch.long),
            "state_hash": torch.tensor(state, dtype=torch.long),
            ("next", "reward"): torch.tensor(reward, dtype=dtype).reshape(n, 1),
            ("next", "done"): torch.tensor(done, dtype=torch.bool).reshape(n, 1),
            "action_valid": torch.tensor(valid, dtype=torch.bool).reshape(n, 1),
        },
        batch_size=[n],
    )


def _normalize(value, values, *, norm, eps, add_eps, leave_one_out=False):
    """One member's relative value against its group's ``values`` (the member included)."""
    if len(set(values)) == 1:
        return 0.0
    if leave_one_out:
        baseline = (sum(values) - value) / (len(values) - 1)
    else:
        baseline = statistics.fmean(values)
    if norm == "none":
        return value - baseline
    std = statistics.stdev(values)
    return (value - baseline) / (std + eps if add_eps else max(std, eps))


def reference(
    td,
    *,
    estimator="gigpo",
    gamma=0.95,
    weight=1.0,
    norm="std",
    eps=1e-6,
    compat=None,
    penalty=0.0,
):
    """docs/semantics.md's semantics written as plain loops over rows: (advantage, A_E, A_S) lists.

    With ``compat="verl-agent"`` it follows the reference's rules (gigpo/core_gigpo.py as wired
    by its ray_trainer.py): every step row is scored with its trajectory's return; step returns
    come from the rewards; then each invalid row (``action_valid`` False) has ``penalty``
    subtracted from its own score and its own step return. Episode statistics are over the
    rows of the group; only a group of one row keeps its raw score (mean 0, std 1).
    """
    valid = td.get("action_valid", None)
    rows = [
        dict(
            group=int(td["group_id"][i]),
            traj=int(td["traj_id"][i]),
            step=int(td["step"][i]),
            state=int(td["state_hash"][i]),
            reward=float(td["next", "reward"][i]),
            invalid=valid is not None and not bool(valid[i]),
        )
        for i in range(td.shape[0])
    ]
    by_traj = defaultdict(list)
    for i, row in enumerate(rows):
        by_traj[row["traj"]].append(i)
    step_return = [0.0] * len(rows)
    traj_return = {}
    for traj, idx in by_traj.items():
        idx.sort(key=lambda i: rows[i]["step"])
        running = 0.0
        for i in reversed(idx):
            running = rows[i]["reward"] + gamma * running
            step_return[i] = running
        traj_return[traj] = sum(rows[i]["reward"] for i in idx)
    if compat == "verl-agent":
        # the penalty is applied after the returns: each invalid row's own return only
        for i, row in enumerate(rows):
            if row["invalid"]:
                step_return[i] -= penalty
    else:
        assert penalty == 0, "the invalid-action penalty is a verl-agent compat option"

    episode_adv = [0.0] * len(rows)
    if compat == "verl-agent":
        score = [traj_return[row["traj"]] - penalty * row["invalid"] for row in rows]
        group_rows = defaultdict(list)
        for i, row in enumerate(rows):
            group_rows[row["group"]].append(i)
        for idx in group_rows.values():
            values = [score[i] for i in idx]
            for i in idx:
                if len(idx) == 1:  # one row: mean 0, std 1
                    episode_adv[i] = score[i] / (1.0 if norm == "none" else 1.0 + eps)
                else:
                    episode_adv[i] = _normalize(score[i], values, norm=norm, eps=eps, add_eps=True)
    else:
        group_trajs = defaultdict(list)
        for traj, idx in by_traj.items():
            group_trajs[rows[idx[0]]["group"]].append(traj)
        episode = {}
        for trajs in group_trajs.values():
            returns = [traj_return[t] for t in trajs]
            for t in trajs:
                if len(trajs) == 1:
                    episode[t] = 0.0
                else:
                    episode[t] = _normalize(
                        traj_return[t],
                        returns,
                        norm=norm,
                        eps=eps,
                        add_eps=False,
                        leave_one_out=estimator == "rloo",
                    )
        episode_adv = [episode[row["traj"]] for row in rows]

    step_groups = defaultdict(list)
    for i, row in enumerate(rows):
        step_groups[(row["group"], row["state"])].append(i)
    step_adv = [0.0] * len(rows)
    for idx in step_groups.values():
        if len(idx) == 1:
            continue
        values = [step_return[i] for i in idx]
        for i in idx:
            step_adv[i] = _normalize(
                step_return[i], values, norm=norm, eps=eps, add_eps=compat == "verl-agent"
            )
    combined = [
        e + weight * s if estimator == "gigpo" else e
        for e, s in zip(episode_adv, step_adv, strict=True)
    ]
    return combined, episode_adv, step_adv
