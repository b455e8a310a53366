"""GIGPOAdvantage against a slow loop reference and torchrl's MCAdvantage, on random batches."""

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torchrl.objectives.llm import MCAdvantage

from gigpo_torchrl import GIGPOAdvantage
from tests.batches import make_batch, reference

# Few distinct rewards and states: ties, zero-variance groups and revisits are common.
REWARDS = st.sampled_from([-1.0, -0.1, 0.0, 0.0, 0.5, 1.0, 10.0])
GAMMAS = st.sampled_from([0.0, 0.95, 1.0]) | st.floats(0.0, 1.0)
VALID = st.sampled_from([True, True, True, False])  # action_valid of a step


@st.composite
def batches(draw, min_group_size=1):
    """Trajectory specs: groups of trajectories of variable length with random ids."""
    group_ids = draw(st.lists(st.integers(-(2**40), 2**40), min_size=1, max_size=4, unique=True))
    traj_ids = iter(
        draw(st.lists(st.integers(-(2**62), 2**62), min_size=60, max_size=60, unique=True))
    )
    trajectories = []
    for group in group_ids:
        for _ in range(draw(st.integers(min_group_size, 5))):
            length = draw(st.integers(1, 6))
            steps = [(draw(st.integers(0, 3)), draw(REWARDS), draw(VALID)) for _ in range(length)]
            trajectories.append((group, next(traj_ids), steps))
    return trajectories


def shuffled(trajectories, seed):
    rows = sum(len(steps) for _, _, steps in trajectories)
    order = list(range(rows))
    random.Random(seed).shuffle(order)
    return make_batch(trajectories, order=order)


def assert_matches(actual, expected):
    torch.testing.assert_close(
        actual.reshape(-1), torch.tensor(expected, dtype=actual.dtype), rtol=1e-9, atol=1e-8
    )


settings.register_profile("gigpo", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("gigpo")


@pytest.mark.filterwarnings("ignore:.*no anchor state repeats")
@settings(max_examples=150)
@given(
    trajectories=batches(),
    seed=st.integers(0, 2**32),
    estimator=st.sampled_from(["gigpo", "grpo", "rloo"]),
    gamma=GAMMAS,
    weight=st.sampled_from([0.0, 0.8, 1.0, 2.5]),
    norm=st.sampled_from(["std", "none"]),
    compat=st.sampled_from([None, "verl-agent"]),
    penalty=st.sampled_from([0.0, 0.1, 0.5]),
)
def test_matches_the_loop_reference(
    trajectories, seed, estimator, gamma, weight, norm, compat, penalty
):
    if compat == "verl-agent" and estimator == "rloo":
        estimator = "gigpo"
    if compat is None:
        penalty = 0.0
    td = shuffled(trajectories, seed)
    expected, episode, step = reference(
        td,
        estimator=estimator,
        gamma=gamma,
        weight=weight,
        norm=norm,
        compat=compat,
        penalty=penalty,
    )
    out = GIGPOAdvantage(
        estimator,
        gamma=gamma,
        step_advantage_weight=weight,
        norm=norm,
        compat=compat,
        invalid_action_penalty=penalty,
    )(td)
    assert_matches(out["advantage"], expected)
    assert_matches(out["episode_advantage"], episode)
    assert_matches(out["step_advantage"], step)
    assert torch.isfinite(out["advantage"]).all()


@pytest.mark.filterwarnings("ignore:.*no anchor state repeats")
@settings(max_examples=60)
@given(trajectories=batches(), seed=st.integers(0, 2**32), gamma=GAMMAS)
def test_zero_step_weight_is_grpo(trajectories, seed, gamma):
    td = shuffled(trajectories, seed)
    gigpo = GIGPOAdvantage(gamma=gamma, step_advantage_weight=0.0)(td.clone())
    grpo = GIGPOAdvantage("grpo", gamma=gamma)(td.clone())
    assert torch.equal(gigpo["advantage"], grpo["advantage"])


@settings(max_examples=60)
@given(
    trajectories=batches(),
    norm=st.sampled_from(["std", "none"]),
    estimator=st.sampled_from(["grpo", "rloo"]),
)
def test_episode_advantages_sum_to_zero_per_group(trajectories, norm, estimator):
    td = GIGPOAdvantage(estimator, norm=norm)(make_batch(trajectories))
    first = td["step"] == 0
    sums = {}
    for group, adv in zip(
        td["group_id"][first].tolist(),
        td["episode_advantage"][first].reshape(-1).tolist(),
        strict=True,
    ):
        sums[group] = sums.get(group, 0.0) + adv
    assert list(sums.values()) == pytest.approx([0.0] * len(sums), abs=1e-9)


@pytest.mark.filterwarnings("ignore:.*no anchor state repeats")
@settings(max_examples=60)
@given(trajectories=batches(), seed=st.integers(0, 2**32), gamma=GAMMAS)
def test_permutation_equivariance(trajectories, seed, gamma):
    td = make_batch(trajectories)
    perm = torch.randperm(td.shape[0], generator=torch.Generator().manual_seed(seed))
    straight = GIGPOAdvantage(gamma=gamma)(td.clone())
    permuted = GIGPOAdvantage(gamma=gamma)(td[perm].clone())
    for key in ("advantage", "episode_advantage", "step_advantage", "step_group_size"):
        torch.testing.assert_close(permuted[key], straight[key][perm], rtol=0, atol=1e-12)


@settings(max_examples=40)
@given(trajectories=batches(min_group_size=2))
def test_grpo_equals_torchrl_mc_advantage(trajectories):
    """Each group through MCAdvantage (sum of rewards, std normalisation) vs our grpo."""
    ours = GIGPOAdvantage("grpo")(make_batch(trajectories))
    expected = {}
    sizes = {}
    for group, _, _ in trajectories:
        sizes[group] = sizes.get(group, 0) + 1
    mc = {
        g: MCAdvantage(grpo_size=n, prompt_key="group_id", trajectory_return="sum")
        for g, n in sizes.items()
    }
    for spec in trajectories:
        out = mc[spec[0]].inv(make_batch([spec]))
        if out is not None:
            for traj, adv in zip(
                out["traj_id"].tolist(), out["advantage"].reshape(-1).tolist(), strict=True
            ):
                expected[traj] = adv
    got = dict(zip(ours["traj_id"].tolist(), ours["advantage"].reshape(-1).tolist(), strict=True))
    assert got.keys() == expected.keys()
    for traj in got:
        assert got[traj] == pytest.approx(expected[traj], rel=1e-6, abs=1e-6)
