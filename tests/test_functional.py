"""The pure tensor functions against hand-computed values."""

import math

import pytest
import torch

from gigpo_torchrl.functional import (
    discounted_returns,
    gigpo_advantage,
    group_normalize,
    segment_ids,
    segment_mean_std,
    trajectory_layout,
)


def test_segment_ids_number_tuples_in_lexicographic_order():
    group = torch.tensor([2, 1, 2, 1, 2])
    state = torch.tensor([-5, 7, -5, 3, 2**62])
    ids, n, counts = segment_ids(group, state)
    # tuples: (1,3) < (1,7) < (2,-5) < (2,2**62)
    assert n == 4
    assert ids.tolist() == [2, 1, 2, 0, 3]
    assert counts.tolist() == [1, 1, 2, 1]


def test_segment_ids_of_empty_input():
    ids, n, counts = segment_ids(torch.zeros(0, dtype=torch.long))
    assert n == 0 and ids.numel() == 0 and counts.numel() == 0


def test_segment_mean_std_is_unbiased_and_weighted():
    values = torch.tensor([1.0, 2.0, 4.0, 10.0], dtype=torch.float64)
    ids = torch.tensor([0, 0, 0, 1])
    mean, std, total = segment_mean_std(values, ids, 2)
    assert mean.tolist() == pytest.approx([7 / 3, 10.0])
    expected = math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    assert std.tolist() == pytest.approx([expected, 0.0])
    assert total.tolist() == [3.0, 1.0]
    # weight 2 on a value is the same as repeating it
    weights = torch.tensor([2.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    wmean, wstd, _ = segment_mean_std(values, ids, 2, weights)
    rmean, rstd, _ = segment_mean_std(
        torch.tensor([1.0, 1.0, 2.0, 4.0], dtype=torch.float64), torch.zeros(4, dtype=torch.long), 1
    )
    assert wmean[0].item() == pytest.approx(rmean[0].item())
    assert wstd[0].item() == pytest.approx(rstd[0].item())


def test_discounted_returns_in_any_row_order():
    # trajectory 7: rewards 1, 0, 2 ; trajectory -3: rewards 5 ; rows shuffled
    traj = torch.tensor([7, -3, 7, 7])
    step = torch.tensor([2, 0, 0, 1])
    reward = torch.tensor([2.0, 5.0, 1.0, 0.0], dtype=torch.float64)
    out = discounted_returns(reward, traj, step, gamma=0.5)
    # R_2 = 2, R_1 = 0 + 0.5*2 = 1, R_0 = 1 + 0.5*1 = 1.5
    assert out.tolist() == [2.0, 5.0, 1.5, 1.0]
    assert discounted_returns(reward, traj, step, gamma=0.0).tolist() == reward.tolist()
    assert discounted_returns(reward, traj, step, gamma=1.0).tolist() == [2.0, 5.0, 3.0, 2.0]


def test_discounted_returns_of_a_long_trajectory_match_the_recursion():
    torch.manual_seed(0)
    reward = torch.randn(1000, dtype=torch.float64)
    expected, running = [0.0] * 1000, 0.0
    for t in reversed(range(1000)):
        running = reward[t].item() + 0.95 * running
        expected[t] = running
    out = discounted_returns(reward, torch.zeros(1000, dtype=torch.long), torch.arange(1000), 0.95)
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize(
    ("traj", "step", "message"),
    [
        ([4, 4], [0, 2], "trajectory 4 is incomplete"),
        ([4, 4, 9], [0, 0, 0], "trajectory 4 is incomplete or has repeated steps"),
        ([9, 9], [1, 2], "trajectory 9"),
    ],
)
def test_trajectory_layout_names_an_incomplete_trajectory(traj, step, message):
    with pytest.raises(ValueError, match=message):
        trajectory_layout(torch.tensor(traj), torch.tensor(step))


def test_group_normalize_modes_by_hand():
    values = torch.tensor([1.0, 0.0, 0.0, 3.0], dtype=torch.float64)
    groups = torch.tensor([0, 0, 0, 1])
    std = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0]
    out = group_normalize(values, groups, 2)
    assert out.tolist() == pytest.approx([(2 / 3) / std, -(1 / 3) / std, -(1 / 3) / std, 0.0])
    out = group_normalize(values, groups, 2, norm="none", leave_one_out=True)
    assert out.tolist() == pytest.approx([1.0, -0.5, -0.5, 0.0])
    out = group_normalize(values, groups, 2, std_floor="add", singleton="raw", eps=0.5)
    assert out.tolist() == pytest.approx(
        [(2 / 3) / (std + 0.5), -(1 / 3) / (std + 0.5), -(1 / 3) / (std + 0.5), 3.0 / 1.5]
    )


def test_group_normalize_degenerate_groups_are_exactly_zero():
    # 0.1 three times: the float mean is not exactly 0.1, the answer must still be 0
    values = torch.tensor([0.1, 0.1, 0.1, 1e9, 1e9], dtype=torch.float64)
    groups = torch.tensor([0, 0, 0, 1, 1])
    for floor in ("clamp", "add"):
        out = group_normalize(values, groups, 2, std_floor=floor, eps=1e-12)
        assert out.tolist() == [0.0] * 5


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_discounted_returns_reject_a_non_finite_reward(bad):
    # trajectory 0: [0, 0]; trajectory 1: [bad, 1]. Unchecked, 0 * inf = nan leaked into
    # trajectory 0's last row: [0.0, nan, inf, 1.0].
    reward = torch.tensor([0.0, 0.0, bad, 1.0], dtype=torch.float64)
    traj = torch.tensor([0, 0, 1, 1])
    step = torch.tensor([0, 1, 0, 1])
    with pytest.raises(
        ValueError, match=r"non-finite reward \((nan|-?inf)\) at row 2, in trajectory 1"
    ):
        discounted_returns(reward, traj, step, gamma=0.95)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_gigpo_advantage_rejects_a_non_finite_reward(bad):
    reward = torch.tensor([0.0, 0.0, 1.0, bad], dtype=torch.float32)
    done = torch.tensor([False, True, False, True])
    with pytest.raises(ValueError, match="non-finite reward .* at row 3, in trajectory 8"):
        gigpo_advantage(
            reward,
            done,
            torch.zeros(4, dtype=torch.long),
            torch.tensor([7, 7, 8, 8]),
            torch.tensor([0, 1, 0, 1]),
            torch.tensor([1, 2, 1, 3]),
        )


def test_group_normalize_singleton_means_one_observation_of_weight_one():
    # verl-agent: a group of one *row* keeps its raw value; one member of weight 3 is three
    # equal rows, so its group is constant and gives 0.
    values = torch.tensor([2.0, 5.0], dtype=torch.float64)
    groups = torch.tensor([0, 1])
    weights = torch.tensor([1.0, 3.0], dtype=torch.float64)
    out = group_normalize(values, groups, 2, std_floor="add", singleton="raw", weights=weights)
    assert out.tolist() == [2.0 / (1 + 1e-6), 0.0]
