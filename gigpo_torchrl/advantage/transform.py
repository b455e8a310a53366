"""``GIGPOTransform``: the replay-buffer form of :class:`GIGPOAdvantage`."""

from __future__ import annotations

import torch
from tensordict import TensorDictBase, lazy_stack
from torchrl.envs import Transform

from gigpo_torchrl.advantage.estimator import GIGPOAdvantage
from gigpo_torchrl.functional import check_trajectories


def _cat(chunks: list[TensorDictBase]) -> TensorDictBase:
    """Concatenate step-row chunks; ragged LLM entries fall back to a lazy stack of rows."""
    try:
        return torch.cat([chunk.contiguous() for chunk in chunks], 0)
    except RuntimeError:
        return lazy_stack([row for chunk in chunks for row in chunk.unbind(0)], 0)


class GIGPOTransform(Transform):
    """Holds trajectories until their episode group of ``group_size`` is complete.

    Attach it to a torchrl replay buffer with ``rb.append_transform(transform)``. Each write
    (``rb.extend(batch)``) must hold complete trajectories (any number, of any groups, rows in
    any order). Trajectories are queued per ``group_id``; when a group has ``group_size``
    distinct trajectories its advantages are computed with ``estimator`` and the whole group
    is written to the buffer. Incomplete groups stay queued: see :meth:`get_stats`.
    This is what torchrl's ``MCAdvantage`` does for GRPO, with GIGPO's step-level term.

    Args:
        group_size: number of trajectories per episode group (``num_generations``).
        estimator: the :class:`GIGPOAdvantage` to run (its keys are used to read
            ``group_id``, ``traj_id``, ``step`` and ``done``). Default ``GIGPOAdvantage()``.

    Examples:
        >>> rb = ReplayBuffer(storage=LazyStackStorage(10_000))
        >>> rb.append_transform(GIGPOTransform(group_size=8))
        >>> rb.extend(step_rows)            # written once every group has 8 trajectories
    """

    def __init__(self, group_size: int, estimator: GIGPOAdvantage | None = None):
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size={group_size!r} must be a positive integer")
        estimator = GIGPOAdvantage() if estimator is None else estimator
        if not isinstance(estimator, GIGPOAdvantage):
            raise ValueError(f"estimator must be a GIGPOAdvantage, got {type(estimator).__name__}")
        super().__init__(in_keys=[], out_keys=[])
        self.group_size = group_size
        self.estimator = estimator
        self._queues: dict[int, list[TensorDictBase]] = {}
        self._queued_traj: dict[int, set[int]] = {}
        self.released_groups = 0
        self.released_trajectories = 0

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        return tensordict

    def _inv_call(self, tensordict: TensorDictBase) -> TensorDictBase | None:
        rows = tensordict.reshape(-1)
        if rows.numel() == 0:
            return None
        # Checked before queuing, so that a faulty write never corrupts a queued group.
        step_rows = self.estimator.read_step_rows(rows)
        group_id, traj_id = step_rows.group_id, step_rows.traj_id
        check_trajectories(traj_id, step_rows.step, step_rows.done, group_id)
        # Every group of the write is checked before any queue changes.
        arrivals = []
        for group in torch.unique(group_id).tolist():
            in_group = group_id == group
            new_traj = set(torch.unique(traj_id[in_group]).tolist())
            queued = self._queued_traj.get(group, set())
            if new_traj & queued:
                raise ValueError(
                    f"trajectory {min(new_traj & queued)} of group {group} was already "
                    "written: write each trajectory once, whole"
                )
            if len(queued) + len(new_traj) > self.group_size:
                raise ValueError(
                    f"group {group} would have {len(queued) + len(new_traj)} trajectories, "
                    f"more than group_size={self.group_size}: give each episode group its "
                    "own group_id"
                )
            arrivals.append((group, in_group, queued | new_traj))
        released = []
        for group, in_group, trajectories in arrivals:
            self._queues.setdefault(group, []).append(rows[in_group])
            self._queued_traj[group] = trajectories
            if len(trajectories) == self.group_size:
                released.append(self.estimator(_cat(self._queues.pop(group))))
                del self._queued_traj[group]
                self.released_groups += 1
                self.released_trajectories += self.group_size
        return _cat(released) if released else None

    def get_stats(self) -> dict:
        """Counters: groups and trajectories queued (incomplete) and released so far.

        Returns:
            ``{"queued_groups", "queued_trajectories", "released_groups",
            "released_trajectories", "pending"}`` where ``pending`` maps each incomplete
            ``group_id`` to its number of queued trajectories.
        """
        pending = {group: len(trajs) for group, trajs in self._queued_traj.items()}
        return {
            "queued_groups": len(pending),
            "queued_trajectories": sum(pending.values()),
            "released_groups": self.released_groups,
            "released_trajectories": self.released_trajectories,
            "pending": pending,
        }

    def clear_queues(self) -> None:
        """Drop every incomplete group."""
        self._queues.clear()
        self._queued_traj.clear()
