"""GIGPOAdvantage: hand-computed cases, key handling and errors."""

import math
import warnings

import pytest
import torch

from gigpo_torchrl import GIGPOAdvantage
from tests.batches import make_batch

S = math.sqrt(0.5)  # (x - mean) / std for a pair of distinct values is ±sqrt(1/2)


def flat(td, key):
    return td[key].reshape(-1).tolist()


def two_paths():
    # Both trajectories start in state 10. Trajectory 0 goes to 11 and earns 1; trajectory 1
    # goes to 12 and earns nothing.
    return make_batch([(0, 0, [(10, 0.0), (11, 1.0)]), (0, 1, [(10, 0.0), (12, 0.0)])])


def test_hand_computed_gigpo():
    td = GIGPOAdvantage(gamma=0.5)(two_paths())
    assert flat(td, "episode_advantage") == pytest.approx([S, S, -S, -S])
    # state 10: step returns 0.5 and 0 -> ±S ; states 11 and 12 are alone -> 0
    assert flat(td, "step_advantage") == pytest.approx([S, 0, -S, 0])
    assert flat(td, "advantage") == pytest.approx([2 * S, S, -2 * S, -S])
    assert flat(td, "step_group_size") == [2, 1, 2, 1]
    assert flat(td, "value_target") == pytest.approx([0.5, 1.0, 0.0, 0.0])


def test_step_advantage_weight_and_norm_none():
    td = GIGPOAdvantage(gamma=0.5, step_advantage_weight=0.8, norm="none")(two_paths())
    # A_E = R - mean = ±0.5 ; A_S at state 10 = 0.5 - 0.25 = ±0.25
    assert flat(td, "advantage") == pytest.approx([0.5 + 0.8 * 0.25, 0.5, -0.5 - 0.2, -0.5])


def test_a_revisited_state_joins_its_own_step_group():
    # trajectory 0: 10 -> 11 -> 10 (revisit) -> end ; trajectory 1: 10 -> end
    td = make_batch([(0, 0, [(10, 0.0), (11, 0.0), (10, 1.0)]), (0, 1, [(10, 0.0)])])
    td = GIGPOAdvantage(gamma=1.0, norm="none")(td)
    # state 10 rows: returns 1 (step 0), 1 (step 2), 0 (traj 1); mean 2/3
    assert flat(td, "step_group_size") == [3, 1, 3, 3]
    assert flat(td, "step_advantage") == pytest.approx([1 / 3, 0.0, 1 / 3, -2 / 3])


@pytest.mark.filterwarnings("ignore:.*no anchor state repeats")
def test_states_are_compared_within_their_episode_group_only():
    td = make_batch([(0, 0, [(10, 1.0)]), (1, 1, [(10, 0.0)])])
    td = GIGPOAdvantage()(td)
    assert flat(td, "step_group_size") == [1, 1]
    assert flat(td, "advantage") == [0.0, 0.0]  # two singleton groups of one trajectory


def test_rloo_by_hand():
    td = make_batch([(3, 0, [(1, 1.0)]), (3, 1, [(1, 0.0)]), (3, 2, [(1, 0.0)])])
    out = GIGPOAdvantage("rloo", norm="none")(td.clone())
    assert flat(out, "advantage") == pytest.approx([1.0, -0.5, -0.5])
    out = GIGPOAdvantage("rloo")(td.clone())
    std = math.sqrt(1 / 3)
    assert flat(out, "advantage") == pytest.approx([1 / std, -0.5 / std, -0.5 / std])


def test_degenerate_groups_give_exact_zeros():
    td = make_batch(
        [
            (0, 0, [(1, 0.1), (2, 0.1), (3, 0.1)]),  # equal returns: 0.3 vs 0.3
            (0, 1, [(1, 0.1), (2, 0.1), (3, 0.1)]),
            (1, 2, [(5, 7.0)]),  # a group of one trajectory
        ],
        dtype=torch.float32,
    )
    td = GIGPOAdvantage(eps=1e-30)(td)
    assert flat(td, "advantage") == [0.0] * 7
    assert not torch.isnan(td["advantage"]).any()


def test_verl_agent_compat_by_hand():
    # trajectory 0 has two steps and return 1, trajectory 1 one step and return 0:
    # the reference scores rows [1, 1, 0] -> mean 2/3, unbiased std sqrt(1/3), F = std + eps
    td = make_batch([(0, 0, [(1, 0.0), (2, 1.0)]), (0, 1, [(1, 0.0)]), (5, 2, [(9, 2.0)])])
    out = GIGPOAdvantage("grpo", compat="verl-agent", eps=1e-6)(td.clone())
    scale = math.sqrt(1 / 3) + 1e-6
    # the lone trajectory of group 5 keeps its raw return over (1 + eps)
    expected = [(1 / 3) / scale, (1 / 3) / scale, -(2 / 3) / scale, 2.0 / (1 + 1e-6)]
    assert flat(out, "advantage") == pytest.approx(expected, rel=1e-12)
    out = GIGPOAdvantage("grpo", compat="verl-agent", norm="none")(td.clone())
    assert flat(out, "advantage") == pytest.approx([1 / 3, 1 / 3, -2 / 3, 2.0])
    # the paper's statistics weigh each trajectory once: ±sqrt(1/2)
    out = GIGPOAdvantage("grpo")(td.clone())
    assert flat(out, "advantage") == pytest.approx([S, S, -S, 0.0])


def test_compat_step_term_uses_std_plus_eps():
    td = GIGPOAdvantage(gamma=0.5, compat="verl-agent", eps=0.1)(two_paths())
    std = math.sqrt(0.125)  # of step returns 0.5 and 0
    assert flat(td, "step_advantage") == pytest.approx(
        [0.25 / (std + 0.1), 0, -0.25 / (std + 0.1), 0]
    )


def test_multi_dim_batch_and_float32_keep_shapes_and_dtype():
    td = two_paths()
    td = td.apply(lambda x: x.float() if x.is_floating_point() else x).reshape(2, 2)
    td = GIGPOAdvantage(gamma=0.5)(td)
    assert td["advantage"].shape == (2, 2, 1)
    assert td["advantage"].dtype == torch.float32
    assert td["advantage"].reshape(-1).tolist() == pytest.approx([2 * S, S, -2 * S, -S])


def test_llm_batches_get_a_token_axis():
    td = two_paths()
    td["tokens", "full"] = torch.zeros(4, 3, dtype=torch.long)
    assert GIGPOAdvantage()(td.clone())["advantage"].shape == (4, 1, 1)
    assert GIGPOAdvantage(token_axis=False)(td.clone())["advantage"].shape == (4, 1)
    assert GIGPOAdvantage(token_axis=True)(two_paths())["advantage"].shape == (4, 1, 1)


def test_an_empty_batch_gives_empty_outputs():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        td = GIGPOAdvantage()(make_batch([]))
    assert td["advantage"].shape == (0, 1)
    assert td["step_group_size"].shape == (0, 1)


def test_set_keys_renames_every_key():
    td = two_paths()
    renamed = td.empty()
    for old, new in [
        ("group_id", "gid"),
        ("traj_id", "tid"),
        ("step", "t"),
        ("state_hash", ("obs", "hash")),
        (("next", "reward"), ("next", "r")),
        (("next", "done"), ("next", "d")),
    ]:
        renamed.set(new, td.get(old))
    adv = GIGPOAdvantage(gamma=0.5)
    adv.set_keys(
        group_id="gid",
        traj_id="tid",
        step="t",
        state_hash=("obs", "hash"),
        reward="r",
        done="d",
        advantage="A",
        episode_advantage="AE",
        step_advantage="AS",
        step_group_size="n",
        value_target="ret",
    )
    assert ("obs", "hash") in adv.in_keys and "A" in adv.out_keys
    out = adv(renamed)
    assert flat(out, "A") == pytest.approx([2 * S, S, -2 * S, -S])
    assert {"AE", "AS", "n", "ret"} <= set(out.keys())
    assert "advantage" not in out


def test_grpo_needs_no_state_hash():
    td = two_paths()
    del td["state_hash"]
    out = GIGPOAdvantage("grpo")(td)
    assert flat(out, "advantage") == pytest.approx([S, S, -S, -S])
    assert "step_advantage" not in out


def test_warns_when_no_state_repeats():
    td = make_batch([(0, 0, [(1, 1.0), (2, 0.0)]), (0, 1, [(3, 0.0)])])
    with pytest.warns(UserWarning, match="GIGPO equals GRPO"):
        GIGPOAdvantage()(td)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"estimator": "ppo"}, "estimator='ppo'"),
        ({"norm": "batch"}, "norm='batch'"),
        ({"compat": "swift"}, "compat='swift'"),
        ({"gamma": 1.5}, "gamma=1.5"),
        ({"gamma": float("nan")}, "gamma=nan"),
        ({"step_advantage_weight": -0.1}, "step_advantage_weight=-0.1"),
        ({"eps": 0.0}, "eps=0.0"),
        ({"estimator": "rloo", "compat": "verl-agent"}, "rloo"),
        ({"token_axis": "yes"}, "token_axis='yes'"),
    ],
)
def test_bad_options_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        GIGPOAdvantage(**kwargs)


def _drop(key):
    def edit(td):
        del td[key]

    return edit


def _set(key, value):
    def edit(td):
        td.set(key, value)

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_drop("state_hash"), "'state_hash'"),
        (_drop("traj_id"), "'traj_id'"),
        (_drop(("next", "reward")), r"\('next', 'reward'\)"),
        (_drop(("next", "done")), r"\('next', 'done'\)"),
        (_set("group_id", torch.zeros(4)), "'group_id' has dtype torch.float32"),
        (_set("step", torch.zeros(4, 2, dtype=torch.long)), r"'step' has shape \(4, 2\)"),
        (_set(("next", "done"), torch.zeros(4, 1, dtype=torch.long)), "expected a bool"),
        (_set(("next", "reward"), torch.ones(4, 1, dtype=torch.long)), "expected a floating"),
        (
            _set(("next", "reward"), torch.tensor([[0.0], [float("nan")], [0.0], [0.0]])),
            "non-finite reward .* in trajectory 0",
        ),
        (_set("step", torch.tensor([0, 1, 0, 2])), "trajectory 1 is incomplete"),
        (
            _set(("next", "done"), torch.tensor([[False], [False], [False], [True]])),
            "trajectory 0 is not done at its last step",
        ),
        (
            _set(("next", "done"), torch.tensor([[True], [True], [False], [True]])),
            "trajectory 0 is done before its last step",
        ),
        (_set("group_id", torch.tensor([0, 1, 0, 0])), "trajectory 0 has rows in several groups"),
    ],
)
def test_bad_batches_are_named(edit, message):
    td = two_paths()
    edit(td)
    with pytest.raises(ValueError, match=message):
        GIGPOAdvantage()(td)


# -- verl-agent compat: the reference's singleton rule and invalid-action penalty ---------
#
# Rules read from verl-agent (gigpo/core_gigpo.py and its ray_trainer.py): each step row is
# scored with its trajectory's summed environment reward; episode mean and unbiased std are
# over the score of every row of the group, A_E = (score - mean) / (std + eps); only a group
# of ONE ROW uses mean 0 and std 1. Step returns are discounted sums of the environment
# rewards; apply_invalid_action_penalty then subtracts the penalty from an invalid row's own
# score and its own step return. A step group of one row gives 0.

EPS = 1e-6


def test_verl_agent_lone_trajectory_of_several_steps_gets_zero():
    # group 0: one trajectory of three steps, rows score [1, 1, 1]: mean 1, std 0 -> 0.
    # group 1: one trajectory of one step: one row, mean 0 and std 1 -> 2 / (1 + eps).
    td = make_batch([(0, 0, [(1, 0.0), (2, 0.0), (3, 1.0)]), (1, 1, [(9, 2.0)])])
    out = GIGPOAdvantage("grpo", compat="verl-agent")(td.clone())
    assert flat(out, "advantage") == [0.0, 0.0, 0.0, pytest.approx(2.0 / (1 + EPS), rel=1e-12)]
    out = GIGPOAdvantage("grpo", compat="verl-agent", norm="none")(td.clone())
    assert flat(out, "advantage") == [0.0, 0.0, 0.0, 2.0]


def issue_case():
    """Two trajectories from state 10; trajectory 1's first action is invalid (state kept).

    traj 0: 10 -> 11 -> goal (reward 1);  traj 1: 10 (invalid) -> 10 -> 11 -> goal (reward 1).
    """
    return make_batch(
        [
            (0, 0, [(10, 0.0), (11, 1.0)]),
            (0, 1, [(10, 0.0, False), (10, 0.0), (11, 1.0)]),
        ]
    )


def test_verl_agent_invalid_action_penalty_reproduces_the_reference():
    td = GIGPOAdvantage(compat="verl-agent", invalid_action_penalty=0.1)(issue_case())
    # Row scores [1, 1, 0.9, 1, 1]: mean 0.98, deviations [.02, .02, -.08, .02, .02],
    # unbiased variance (4 * .02**2 + .08**2) / 4 = 0.002.
    scale = math.sqrt(0.002) + EPS
    episode = [0.02 / scale, 0.02 / scale, -0.08 / scale, 0.02 / scale, 0.02 / scale]
    # Step returns (gamma 0.95) from the rewards: traj 0 [0.95, 1], traj 1 [0.9025, 0.95, 1];
    # then row 2 loses 0.1 -> 0.8025. State 10 holds [0.95, 0.8025, 0.95]: deviations
    # d * [1, -2, 1] with d = 0.1475 / 3, unbiased std d * sqrt(3). State 11 holds [1, 1] -> 0.
    d = 0.1475 / 3
    s = d * math.sqrt(3) + EPS
    step = [d / s, 0.0, -2 * d / s, d / s, 0.0]
    assert flat(td, "episode_advantage") == pytest.approx(episode, rel=1e-9)
    assert flat(td, "step_advantage") == pytest.approx(step, rel=1e-9)
    assert flat(td, "value_target") == pytest.approx([0.95, 1.0, 0.8025, 0.95, 1.0], rel=1e-12)
    expected = [e + s for e, s in zip(episode, step, strict=True)]
    assert flat(td, "advantage") == pytest.approx(expected, rel=1e-9)
    # the values quoted in issue 10 (the reference), to two decimals
    assert flat(td, "advantage") == pytest.approx([1.02, 0.45, -2.94, 1.02, 0.45], abs=5e-3)


def test_verl_agent_penalty_stays_on_its_own_row():
    # gamma 0.5, penalty 0.25, norm "none" (the reference's mean_norm).
    # traj 0: s1 -> s2, then an invalid action at s2 (state kept), then s2 -> goal (reward 1)
    # traj 1: s1 -> s3 -> end, no reward.
    td = make_batch(
        [
            (0, 0, [(1, 0.0), (2, 0.0, False), (2, 1.0)]),
            (0, 1, [(1, 0.0), (3, 0.0)]),
        ]
    )
    td = GIGPOAdvantage(gamma=0.5, norm="none", compat="verl-agent", invalid_action_penalty=0.25)(
        td
    )
    # scores [1, 0.75, 1, 0, 0]: mean 0.55 (the penalty does not change the other rows)
    assert flat(td, "episode_advantage") == pytest.approx([0.45, 0.2, 0.45, -0.55, -0.55])
    # step returns from the rewards: traj 0 [0.25, 0.5, 1], traj 1 [0, 0]; the invalid row
    # drops to 0.25, and row 0 keeps 0.25 (the penalty is not discounted into it).
    assert flat(td, "value_target") == pytest.approx([0.25, 0.25, 1.0, 0.0, 0.0])
    # s1: [0.25, 0] -> ±0.125 ; s2: [0.25, 1] -> ∓0.375 ; s3 alone -> 0
    assert flat(td, "step_advantage") == pytest.approx([0.125, -0.375, 0.375, -0.125, 0.0])
    assert flat(td, "advantage") == pytest.approx([0.575, -0.175, 0.825, -0.675, -0.55])


def test_verl_agent_penalty_in_a_lone_trajectory():
    # group 0: one trajectory [invalid, goal 1]: scores [0.9, 1] are no longer equal:
    # mean 0.95, unbiased std sqrt(2 * 0.05**2) -> -/+ 0.05 / (std + eps).
    # group 1: one row, invalid, reward 1: raw score 0.9 / (1 + eps).
    td = make_batch([(0, 0, [(1, 0.0, False), (1, 1.0)]), (1, 1, [(5, 1.0, False)])])
    out = GIGPOAdvantage("grpo", compat="verl-agent", invalid_action_penalty=0.1)(td)
    scale = math.sqrt(2 * 0.05**2) + EPS
    expected = [-0.05 / scale, 0.05 / scale, 0.9 / (1 + EPS)]
    assert flat(out, "advantage") == pytest.approx(expected, rel=1e-9)


def test_penalty_zero_or_all_valid_changes_nothing():
    base = GIGPOAdvantage(compat="verl-agent")(two_paths())
    penalised = GIGPOAdvantage(compat="verl-agent", invalid_action_penalty=0.1)(two_paths())
    assert torch.equal(base["advantage"], penalised["advantage"])
    # penalty 0 does not read action_valid at all
    td = issue_case()
    del td["action_valid"]
    adv = GIGPOAdvantage(compat="verl-agent")
    assert "action_valid" not in adv.in_keys
    adv(td)


def test_penalty_reads_a_renamed_action_valid_key():
    td = issue_case()
    td.rename_key_("action_valid", ("policy", "ok"))
    adv = GIGPOAdvantage(compat="verl-agent", invalid_action_penalty=0.1)
    adv.set_keys(action_valid=("policy", "ok"))
    assert ("policy", "ok") in adv.in_keys
    expected = GIGPOAdvantage(compat="verl-agent", invalid_action_penalty=0.1)(issue_case())
    torch.testing.assert_close(adv(td)["advantage"], expected["advantage"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"invalid_action_penalty": 0.1}, "only with compat='verl-agent'"),
        ({"invalid_action_penalty": -0.1, "compat": "verl-agent"}, "invalid_action_penalty=-0.1"),
        ({"invalid_action_penalty": float("inf"), "compat": "verl-agent"}, "=inf"),
        ({"invalid_action_penalty": True, "compat": "verl-agent"}, "=True"),
    ],
)
def test_bad_penalty_options_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GIGPOAdvantage(**kwargs)


def test_penalty_needs_a_bool_action_valid():
    adv = GIGPOAdvantage(compat="verl-agent", invalid_action_penalty=0.1)
    td = issue_case()
    del td["action_valid"]
    with pytest.raises(ValueError, match="'action_valid'"):
        adv(td)
    td = issue_case()
    td["action_valid"] = torch.ones(5, 1)
    with pytest.raises(ValueError, match="'action_valid' has dtype torch.float32"):
        adv(td)
