"""GIGPOTransform: trajectories wait in a replay buffer's write path until their group is whole."""

import pytest
from torchrl.data import LazyTensorStorage, ReplayBuffer

from gigpo_torchrl import GIGPOAdvantage, GIGPOTransform
from tests.batches import make_batch

GROUP_A = [
    (7, 0, [(1, 0.0), (2, 1.0)]),
    (7, 1, [(1, 0.0), (3, 0.0), (4, 0.0)]),
    (7, 2, [(1, 0.5)]),
]
GROUP_B = [(9, 3, [(5, 1.0)]), (9, 4, [(5, 0.0), (6, 2.0)]), (9, 5, [(6, 0.0)])]


def by_traj(td, key="advantage"):
    """{(traj, step): value} so results compare whatever the row order."""
    return {
        (t, s): v
        for t, s, v in zip(
            td["traj_id"].tolist(), td["step"].tolist(), td[key].reshape(-1).tolist(), strict=True
        )
    }


def test_groups_are_released_whole_with_the_batch_advantage():
    transform = GIGPOTransform(group_size=3, estimator=GIGPOAdvantage(gamma=0.9))
    rb = ReplayBuffer(storage=LazyTensorStorage(100))
    rb.append_transform(transform)
    # interleaved writes: two trajectories of A and one of B, then the rest, shuffled rows
    rb.extend(make_batch([GROUP_A[0], GROUP_B[1], GROUP_A[1]], order=[5, 0, 3, 1, 2, 4, 6]))
    assert len(rb) == 0
    stats = transform.get_stats()
    assert stats["pending"] == {7: 2, 9: 1}
    assert (stats["queued_groups"], stats["queued_trajectories"]) == (2, 3)

    rb.extend(make_batch([GROUP_A[2]]))
    assert len(rb) == 6  # group 7 (2 + 3 + 1 rows) released
    rb.extend(make_batch([GROUP_B[0], GROUP_B[2]]))
    assert len(rb) == 10
    stats = transform.get_stats()
    assert stats["queued_groups"] == 0 and stats["released_groups"] == 2
    assert stats["released_trajectories"] == 6

    expected = GIGPOAdvantage(gamma=0.9)(make_batch(GROUP_A + GROUP_B))
    stored = rb[:]
    assert by_traj(stored) == pytest.approx(by_traj(expected))
    assert by_traj(stored, "step_advantage") == pytest.approx(by_traj(expected, "step_advantage"))


def test_a_faulty_write_leaves_the_queue_intact():
    transform = GIGPOTransform(group_size=3)
    transform.inv(make_batch([GROUP_A[0]]))
    incomplete = make_batch([GROUP_A[1]])[:2]  # last step missing: not done
    with pytest.raises(ValueError, match="trajectory 1 is not done"):
        transform.inv(incomplete)
    with pytest.raises(ValueError, match="trajectory 0 of group 7 was already written"):
        transform.inv(make_batch([GROUP_A[0]]))
    # group 9 is fine, group 7 is not: nothing of the write is queued
    with pytest.raises(ValueError, match="trajectory 0 of group 7"):
        transform.inv(make_batch([GROUP_B[0], GROUP_A[0]]))
    no_hash = make_batch([GROUP_B[0]])
    del no_hash["state_hash"]
    with pytest.raises(ValueError, match="'state_hash'"):
        transform.inv(no_hash)
    assert transform.get_stats()["pending"] == {7: 1}
    out = transform.inv(make_batch(GROUP_A[1:]))
    assert out.shape == (6,)
    assert out["advantage"].shape == (6, 1)


def test_too_many_trajectories_for_a_group_is_an_error():
    transform = GIGPOTransform(group_size=2)
    with pytest.raises(ValueError, match="group 7 would have 3 trajectories"):
        transform.inv(make_batch(GROUP_A))
    assert transform.get_stats()["queued_groups"] == 0


def test_clear_queues_and_bad_arguments():
    transform = GIGPOTransform(group_size=3)
    assert transform.inv(make_batch(GROUP_A[:2])) is None
    transform.clear_queues()
    assert transform.get_stats()["queued_trajectories"] == 0
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="group_size="):
            GIGPOTransform(group_size=bad)
    with pytest.raises(ValueError, match="GIGPOAdvantage"):
        GIGPOTransform(group_size=2, estimator="gigpo")


def test_a_verl_agent_penalty_estimator_reads_action_valid_when_queuing():
    estimator = GIGPOAdvantage(compat="verl-agent", invalid_action_penalty=0.1)
    group = [(3, 0, [(1, 0.0, False), (1, 1.0)]), (3, 1, [(1, 0.0), (2, 0.0)])]
    transform = GIGPOTransform(group_size=2, estimator=estimator)
    no_valid = make_batch(group[:1])
    del no_valid["action_valid"]
    with pytest.raises(ValueError, match="'action_valid'"):
        transform.inv(no_valid)
    assert transform.inv(make_batch(group[:1])) is None
    out = transform.inv(make_batch(group[1:]))
    expected = GIGPOAdvantage(compat="verl-agent", invalid_action_penalty=0.1)(make_batch(group))
    assert by_traj(out) == pytest.approx(by_traj(expected))
