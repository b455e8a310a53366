"""TextEnv: batched stepping, seeds, invalid actions, faulty games, specs of every env."""

import re
import unicodedata
import warnings

import pytest
import torch
from tensordict import TensorDict
from torchrl.envs.utils import check_env_specs

from gigpo_torchrl.envs import TextEnv, list_envs, make_env, stable_hash
from tests.envs_helpers import BadReward, Counter, FreeText


def seeds(*values):
    return TensorDict({"seed": torch.tensor(values)}, [len(values)])


def act(env, td, *actions):
    td["action_text"] = list(actions)
    return env.step(td)["next"]


@pytest.mark.parametrize("name", list_envs())
def test_every_registered_env_passes_check_env_specs(name):
    env = make_env(name, batch_size=2, seed=0)
    check_env_specs(env, seed=0)
    env.close()


@pytest.mark.parametrize("name", list_envs())
def test_same_seed_same_initial_state_hash(name):
    env = make_env(name, batch_size=3)
    first = env.reset(seeds(5, 5, 6))
    again = make_env(name, batch_size=1).reset(seeds(5))
    assert first["state_hash"][0] == first["state_hash"][1] == again["state_hash"][0]
    assert first["observation"][0] == again["observation"][0]


def test_elements_finish_independently_and_stay_finished():
    env = TextEnv(Counter, batch_size=3, max_steps=10)
    td = env.reset(seeds(2, 1, 0))  # start at 2, 1 and 0; the target is 3
    out = act(env, td, "inc", "inc", "inc")
    assert out["done"].reshape(-1).tolist() == [True, False, False]
    assert out["success"].reshape(-1).tolist() == [True, False, False]
    out = act(env, out, "inc", "inc", "inc")
    assert out["done"].reshape(-1).tolist() == [True, True, False]
    # the finished element is frozen: same observation and hash, no reward, no step counted
    assert out["observation"][0] == "n = 3"
    assert out["reward"][0].item() == 0.0 and out["step"][0].item() == 1
    assert out["reward"].reshape(-1).tolist() == [0.0, 1.0, 0.0]
    assert out["step"].tolist() == [1, 2, 2]


def test_revisiting_a_state_gives_its_hash_again():
    env = TextEnv(Counter, batch_size=1)
    td = env.reset(seeds(0))
    start = td["state_hash"].clone()
    out = act(env, td, "inc")
    assert out["state_hash"] != start
    out = act(env, out, "dec")
    assert out["state_hash"] == start
    assert start.item() == stable_hash(0)  # Counter.state() is the number itself


def test_observation_hash_without_a_state_ignores_layout():
    env = TextEnv(FreeText, batch_size=2)
    td = env.reset(seeds(0, 1))
    out = act(env, td, "hello", "  hello ")
    assert out["state_hash"][0] == out["state_hash"][1]
    assert out["admissible_actions"][0] == ()


@pytest.mark.parametrize(
    "action",
    ["", "   ", "x" * 10_000, "fly", "wait", "\x00\x1b[31m", "𝕚𝕟𝕔", "inc\u200b\u200b?", None, 3],
)
def test_invalid_and_hostile_actions_never_crash(action):
    env = TextEnv(Counter, batch_size=2, invalid_action_penalty=0.25)
    td = env.reset(seeds(0, 0))
    before = td["state_hash"].clone()
    td["action_text"] = [action, "inc"]
    out = env.step(td)["next"]
    assert out["action_valid"].reshape(-1).tolist() == [False, True]
    assert out["reward"].reshape(-1).tolist() == [-0.25, 0.0]
    assert out["state_hash"][0] == before[0]
    assert "Invalid action" in out["observation"][0]
    # whatever came in, the next observation holds no control characters but newlines
    assert all(c == "\n" or unicodedata.category(c)[0] != "C" for c in out["observation"][0])
    assert not out["done"].any()


def test_actions_match_admissible_ones_leniently():
    env = TextEnv(Counter, batch_size=1)
    out = act(env, env.reset(seeds(0)), "  INC\t")
    assert out["action_valid"].item() and out["observation"][0] == "n = 1"


def test_a_game_that_raises_ends_only_its_own_episode():
    env = TextEnv(lambda: Counter(fail_at=2), batch_size=2)
    td = env.reset(seeds(1, 0))
    with pytest.warns(UserWarning, match="RuntimeError: the counter broke at 2"):
        out = act(env, td, "inc", "inc")  # element 0 reaches 2 and breaks
    assert out["truncated"].reshape(-1).tolist() == [True, False]
    assert out["error"][0] == "RuntimeError: the counter broke at 2"
    assert out["error"][1] == ""
    out = act(env, out, "inc", "dec")
    assert out["observation"][1] == "n = 0"
    assert out["done"].reshape(-1).tolist() == [True, False]


def test_step_limit_truncates():
    env = TextEnv(Counter, batch_size=1, max_steps=2)
    out = act(env, env.reset(seeds(0)), "dec")
    assert not out["done"].item()
    out = act(env, out, "dec")
    assert out["truncated"].item() and not out["terminated"].item()


def test_partial_reset_keeps_the_other_elements():
    env = TextEnv(Counter, batch_size=2)
    out = act(env, env.reset(seeds(0, 0)), "inc", "dec")
    out["_reset"] = torch.tensor([[True], [False]])
    out["seed"] = torch.tensor([2, 2])
    reset = env.reset(out)
    assert reset["observation"][0] == "n = 2"
    assert reset["observation"][1] == "n = -1"


def test_rollout_with_random_actions():
    env = make_env("frozenlake", batch_size=2, seed=1)
    rollout = env.rollout(5, break_when_any_done=False)
    assert rollout.batch_size == (2, 5)
    assert rollout["next", "reward"].shape == (2, 5, 1)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="batch_size=0"):
        TextEnv(Counter, batch_size=0)
    with pytest.raises(ValueError, match="max_steps=-1"):
        TextEnv(Counter, batch_size=1, max_steps=-1)
    with pytest.raises(ValueError, match="invalid_action_penalty=-1"):
        TextEnv(Counter, batch_size=1, invalid_action_penalty=-1)
    with pytest.raises(ValueError, match="TextGame instances"):
        TextEnv(lambda: object(), batch_size=1)


def test_repeated_invalid_actions_show_only_the_latest_reason():
    env = TextEnv(Counter, batch_size=1)
    td = env.reset(seeds(0))
    out = act(env, td, "wait")
    once = out["observation"][0]
    assert once == "n = 0\n\nInvalid action: waiting is not allowed"
    for _ in range(5):
        out = act(env, out, "fly")
    assert (
        out["observation"][0]
        == "n = 0\n\nInvalid action: 'fly' is not one of the admissible actions"
    )
    out = act(env, out, "inc")
    assert out["observation"][0] == "n = 1"


@pytest.mark.parametrize(
    ("reward", "error"),
    [
        (None, "TypeError: the game's reward must be a number, got None"),
        (float("nan"), "ValueError: the game's reward must be finite, got nan"),
        (float("inf"), "ValueError: the game's reward must be finite, got inf"),
        (-float("inf"), "ValueError: the game's reward must be finite, got -inf"),
        ("1", "TypeError: the game's reward must be a number, got '1'"),
    ],
)
def test_a_bad_reward_ends_only_its_own_episode(reward, error):
    env = TextEnv(lambda: BadReward(reward, fail_at=2), batch_size=2)
    td = env.reset(seeds(1, 0))
    with pytest.warns(UserWarning, match="first failure") as caught:
        out = act(env, td, "inc", "inc")  # element 0 reaches 2: a bad reward
    assert len(caught) == 1
    assert out["truncated"].reshape(-1).tolist() == [True, False]
    assert out["error"][0] == error and out["error"][1] == ""
    assert out["reward"].reshape(-1).tolist() == [0.0, 0.0]
    assert torch.isfinite(out["reward"]).all()
    assert env.env_errors == 1
    out = act(env, out, "inc", "dec")  # the other element goes on
    assert out["observation"][1] == "n = 0" and out["done"].reshape(-1).tolist() == [True, False]


def test_game_failures_warn_once_with_the_first_traceback():
    env = TextEnv(lambda: Counter(fail_at=1), batch_size=3)
    td = env.reset(seeds(0, 0, 0))
    with pytest.warns(UserWarning) as caught:
        out = act(env, td, "inc", "inc", "dec")
    (warning,) = caught
    text = str(warning.message)
    assert "Traceback (most recent call last)" in text
    assert "RuntimeError: the counter broke at 1" in text
    assert "seed 0" in text
    assert out["truncated"].reshape(-1).tolist() == [True, True, False]
    assert env.env_errors == 2
    out = env.reset(seeds(0, 0, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # later failures are counted, not shown
        act(env, out, "inc", "dec", "dec")
    assert env.env_errors == 3


def test_a_step_that_returns_no_step_result_is_a_game_failure():
    class Sloppy(Counter):
        def step(self, action):
            return "n = 1", 0.0, False

    env = TextEnv(Sloppy, batch_size=1)
    with pytest.warns(UserWarning, match="first failure"):
        out = act(env, env.reset(seeds(0)), "inc")
    assert out["truncated"].item()
    assert out["error"][0] == "TypeError: TextGame.step must return a StepResult, got tuple"


@pytest.mark.parametrize("size", [3, [3], (3,), torch.Size([3])])
def test_batch_size_as_torchrl_takes_it(size):
    for env in (make_env("frozenlake", batch_size=size), TextEnv(Counter, batch_size=size)):
        assert env.batch_size == torch.Size([3])
        assert env.reset().batch_size == torch.Size([3])


@pytest.mark.parametrize("size", [0, -1, 1.5, True, "3", [], [2, 3], torch.Size([2, 3]), None])
def test_bad_batch_sizes_are_refused(size):
    with pytest.raises(ValueError, match="batch_size="):
        make_env("frozenlake", batch_size=size)


BAD_SEEDS = [-1, 2**63, 2**64, 1.5, 3.0, True, "7", float("nan")]


@pytest.mark.parametrize("seed", BAD_SEEDS)
def test_bad_seeds_are_refused_at_construction_and_set_seed(seed):
    with pytest.raises(ValueError, match=re.escape(f"seed={seed!r}")):
        make_env("frozenlake", seed=seed)
    with pytest.raises(ValueError, match=re.escape(f"seed={seed!r}")):
        TextEnv(Counter, batch_size=1, seed=seed)
    with pytest.raises(ValueError, match=re.escape(f"seed={seed!r}")):
        TextEnv(Counter, batch_size=1).set_seed(seed)


@pytest.mark.parametrize("name", [*list_envs(), "gym:FrozenLake-v1"])
def test_every_env_refuses_bad_reset_seeds_the_same_way(name):
    env = make_env(name, batch_size=2)
    with pytest.raises(ValueError, match=re.escape("seed=-1 must be an integer in [0, 2**63)")):
        env.reset(seeds(3, -1))
    with pytest.raises(ValueError, match="seed must hold integers, got a torch.float32 tensor"):
        env.reset(TensorDict({"seed": torch.tensor([1.0, 2.0])}, [2]))
    largest = 2**63 - 1
    td = env.reset(seeds(largest, 0))  # the whole range is accepted
    assert td["step"].tolist() == [0, 0]
    env.close()


def test_good_seeds_of_every_integer_kind():
    import numpy as np

    for seed in (0, 2**63 - 1, np.int64(5), np.uint8(5), torch.tensor(5)):
        assert TextEnv(Counter, batch_size=1, seed=seed).reset()["step"].item() == 0
