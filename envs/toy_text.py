"""Gymnasium's toy-text games as text environments: frozenlake, taxi, cliffwalking.

Each is registered through the public API with the gymnasium adapter, exactly as a user
would wrap a gymnasium environment of their own.
"""

from __future__ import annotations

import gymnasium as gym
from gymnasium.envs.toy_text.frozen_lake import generate_random_map

from gigpo_torchrl.envs import register_env
from gigpo_torchrl.envs.gym_adapter import GymTextGame, ansi_render


def _grid(rows: list[str]) -> str:
    return "\n".join(" ".join(row) for row in rows)


def render_frozenlake(env: gym.Env) -> str:
    """The lake with the agent as ``P``, and a legend."""
    lake = env.unwrapped
    rows = [[c.decode() for c in row] for row in lake.desc]
    row, col = divmod(int(lake.s), lake.ncol)
    rows[row][col] = "P"
    return (
        _grid(["".join(r) for r in rows])
        + "\nLegend: P you, S start, F frozen (safe), H hole, G goal."
    )


@register_env("frozenlake", max_steps=20)
def frozenlake(size: int = 4, frozen_prob: float = 0.8, slippery: bool = False) -> GymTextGame:
    """FrozenLake on a random map per seed: walk from S to G without falling into a hole.

    Observation: the ``size``×``size`` grid (``P`` you, ``F`` frozen, ``H`` hole, ``G`` goal)
    and a legend. Actions: left, down, right, up. Reward: 1 on reaching G (success), 0
    otherwise; falling into a hole ends the episode. Max steps: 20. Each seed draws its own
    solvable map (``generate_random_map``); not slippery unless ``slippery=True``.
    """

    def make(seed: int) -> gym.Env:
        desc = generate_random_map(size=size, p=frozen_prob, seed=seed)
        return gym.make("FrozenLake-v1", desc=desc, is_slippery=slippery)

    return GymTextGame(
        make,
        render=render_frozenlake,
        # the map belongs to the state: the same square on another map is another state
        state=lambda env, position: (int(position), env.unwrapped.desc.tobytes()),
        action_names=["left", "down", "right", "up"],
        task="Walk across the frozen lake from S to the goal G without stepping into a hole H.",
    )


def render_taxi(env: gym.Env) -> str:
    """The map with the taxi as ``T``, and where the passenger and destination are."""
    taxi = env.unwrapped
    taxi_row, taxi_col, passenger, destination = taxi.decode(int(taxi.s))
    rows = [[c.decode() for c in row] for row in taxi.desc]
    rows[1 + taxi_row][2 * taxi_col + 1] = "T"
    names = ["R", "G", "Y", "B"]
    where = "in the taxi" if passenger == 4 else f"at {names[passenger]}"
    return (
        "\n".join("".join(r) for r in rows)
        + f"\nThe taxi T is at row {taxi_row}, column {taxi_col}. The passenger is {where}; "
        f"the destination is {names[destination]}. Walls are '|'."
    )


@register_env("taxi", max_steps=50)
def taxi() -> GymTextGame:
    """Taxi: pick the passenger up and drop them off at the destination.

    Observation: the 5×5 map (``T`` the taxi, ``R``/``G``/``Y``/``B`` the stops, ``|``
    walls) and a sentence saying where the passenger and the destination are. Actions:
    south, north, east, west, pickup, dropoff. Reward: −1 per step, −10 for a wrong
    pickup/dropoff, +20 for the right dropoff (success, ends the episode). Max steps: 50.
    """
    return GymTextGame(
        "Taxi-v4",
        render=render_taxi,
        action_names=["south", "north", "east", "west", "pickup", "dropoff"],
        task="Drive the taxi to the passenger, pick them up, and drop them off at the destination.",
    )


def render_cliffwalking(env: gym.Env) -> str:
    """gymnasium's text rendering of the cliff, and a legend."""
    return ansi_render(env).strip("\n") + "\nLegend: x you, o safe ground, C cliff, T target."


@register_env("cliffwalking", max_steps=50)
def cliffwalking() -> GymTextGame:
    """CliffWalking: reach the target T along the cliff's edge without falling off.

    Observation: the 4×12 grid (``x`` you, ``o`` ground, ``C`` cliff, ``T`` target) and a
    legend. Actions: up, right, down, left. Reward: −1 per step, −100 for stepping into the
    cliff (which sends you back to the start). Reaching T ends the episode (success).
    Max steps: 50.
    """
    return GymTextGame(
        "CliffWalking-v1",
        render=render_cliffwalking,
        action_names=["up", "right", "down", "left"],
        success=lambda reward, terminated, info: terminated,
        task="Walk from the bottom-left corner to the target T without falling off the cliff C.",
    )
