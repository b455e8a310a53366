"""TextEnv: batched stepping, seeds, invalid actions, faulty games, specs of every env."""

import unicodedata

import pytest
import torch
from tensordict import TensorDict
from torchrl.envs.utils import check_env_specs

from gigpo_torchrl.envs import TextEnv, list_envs, make_env, stable_hash
from tests.envs_helpers import Counter, FreeText


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
