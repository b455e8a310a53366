"""The ``gym:`` adapter on real gymnasium envs: positions shown, clear errors, env_kwargs."""

import re

import gymnasium as gym
import pytest
import torch
from tensordict import TensorDict

from gigpo_torchrl.envs import GymTextGame, make_env
from gigpo_torchrl.envs.gym_adapter import ansi_render


def reset(env, *seeds):
    return env.reset(TensorDict({"seed": torch.tensor(seeds)}, [len(seeds)]))


def play(env, td, *actions):
    td["action_text"] = list(actions)
    return env.step(td)["next"]


def test_gym_frozenlake_shows_where_the_agent_is():
    env = make_env("gym:FrozenLake-v1", batch_size=1, make_kwargs={"is_slippery": False})
    td = reset(env, 0)
    grid = td["observation"][0].splitlines()
    assert grid[0].split() == ["P", "F", "F", "F"]  # the agent stands on S
    out = play(env, td, "2")  # right
    grid = out["observation"][0].splitlines()
    assert grid[0].split() == ["S", "P", "F", "F"]
    assert "P you" in out["observation"][0]


def test_gym_taxi_shows_the_taxi_the_passenger_and_the_destination():
    env = make_env("gym:Taxi-v4", batch_size=1)
    observation = reset(env, 0)["observation"][0]
    rows = observation.splitlines()
    row, col = (int(n) for n in re.search(r"row (\d), column (\d)", observation).groups())
    assert rows[1 + row][2 * col + 1] == "T"
    assert "The passenger is at" in observation and "the destination is" in observation
    game = env.games[0]
    taxi_row, taxi_col, *_ = game.env.unwrapped.decode(int(game.env.unwrapped.s))
    assert (row, col) == (taxi_row, taxi_col)


def test_gym_taxi_v3_says_which_version_to_use():
    with pytest.raises(ValueError, match=r"gym:Taxi-v3: .*Taxi-v4"):
        make_env("gym:Taxi-v3")


class Colours(gym.Env):
    """A one-line ANSI-rendered env that marks its agent only with colour, as gymnasium's
    toy-text envs do."""

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(self, render_mode=None):
        self.render_mode = render_mode
        self.action_space = gym.spaces.Discrete(2, start=5)  # actions 5 and 6
        self.observation_space = gym.spaces.Discrete(4)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.position = 0
        return self.position, {}

    def step(self, action):
        assert self.action_space.contains(action)
        self.position = min(3, max(0, self.position + (1 if action == 6 else -1)))
        done = self.position == 3
        return self.position, float(done), done, False, {}

    def render(self):
        cells = ["." for _ in range(4)]
        cells[self.position] = gym.utils.colorize(cells[self.position], "red", highlight=True)
        return "\n" + "".join(cells) + "\x1b[34;1m!\x1b[0m\n"


gym.register("GigpoTestColours-v0", entry_point=Colours, max_episode_steps=10)


def test_any_ansi_env_keeps_what_its_colours_marked():
    env = make_env("gym:GigpoTestColours-v0", batch_size=1, action_names=["left", "right"])
    td = reset(env, 0)
    observation = td["observation"][0]
    assert "\x1b" not in observation
    assert observation.startswith("....!")
    assert "'.' at line 1, column 1 (red background)" in observation
    assert "'!' at line 1, column 5 (bold blue)" in observation
    out = play(env, td, "right")  # Discrete(start=5): "right" is action 6
    assert "'.' at line 1, column 2 (red background)" in out["observation"][0]


def test_ansi_render_of_an_env_without_colours_is_its_text():
    env = gym.make("CliffWalking-v1", render_mode="ansi")
    env.reset(seed=0)
    assert ansi_render(env) == env.render().strip("\n")


@pytest.mark.parametrize("gym_id", ["CartPole-v1", "Blackjack-v1"])
def test_an_env_without_text_rendering_is_refused_saying_what_it_needs(gym_id):
    with pytest.raises(ValueError) as caught:
        make_env(f"gym:{gym_id}")
    message = str(caught.value)
    assert f"gym:{gym_id}" in message
    assert "render_mode='ansi'" in message and "render=" in message
    assert "'human', 'rgb_array'" in message


def test_a_non_text_env_plays_with_a_render_function():
    env = make_env(
        "gym:CartPole-v1",
        batch_size=1,
        render=lambda env: f"pole angle {env.unwrapped.state[2]:+.3f}",
        action_names=["push left", "push right"],
    )
    td = reset(env, 0)
    assert td["observation"][0].startswith("pole angle")
    assert play(env, td, "push right")["action_valid"].item()


def test_a_continuous_action_space_is_refused_saying_what_it_needs():
    with pytest.raises(ValueError, match=r"gym:MountainCarContinuous-v0 .*Discrete action space"):
        make_env("gym:MountainCarContinuous-v0", render=lambda env: "a car")


@pytest.mark.parametrize("gym_id", ["NoSuchEnv-v0", "FrozenLake-v9"])
def test_unknown_gym_ids_are_refused(gym_id):
    with pytest.raises(ValueError, match=f"gym:{gym_id}: "):
        make_env(f"gym:{gym_id}")


def test_env_kwargs_of_gym_ids():
    env = make_env(
        "gym:FrozenLake-v1",
        batch_size=1,
        action_names=["left", "down", "right", "up"],
        task="Cross the lake.",
        make_kwargs={"map_name": "8x8", "is_slippery": False},
    )
    td = reset(env, 0)
    assert td["task"][0] == "Cross the lake."
    assert td["admissible_actions"][0] == ("left", "down", "right", "up")
    assert len(td["observation"][0].splitlines()[0].split()) == 8
    assert play(env, td, "down")["observation"][0].splitlines()[1].split()[0] == "P"
    with pytest.raises(ValueError, match="action_names has 2 names for 4 actions"):
        make_env("gym:FrozenLake-v1", action_names=["a", "b"])


def test_a_callable_env_is_checked_at_reset():
    game = GymTextGame(lambda seed: gym.make("MountainCarContinuous-v0"), render=str)
    with pytest.raises(ValueError, match="Discrete action space"):
        game.reset(0)
    assert "P" in GymTextGame("FrozenLake-v1").reset(0)


def test_ansi_render_keeps_the_position_gymnasium_marks_with_colour_only():
    env = gym.make("Taxi-v4", render_mode="ansi")
    env.reset(seed=0)
    row, col, _, _ = env.unwrapped.decode(int(env.unwrapped.s))
    text = ansi_render(env)
    assert f"at line {2 + row}, column {2 * col + 2} (yellow background)" in text
    assert "\x1b" not in text
