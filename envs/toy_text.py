"""Gymnasium's toy-text games as text environments: frozenlake, taxi, cliffwalking.

Each is registered through the public API with the gymnasium adapter, exactly as a user
would wrap a gymnasium environment of their own.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium.envs.toy_text.frozen_lake import generate_random_map

from gigpo_torchrl.envs import register_env
from gigpo_torchrl.envs.gym_adapter import (
    GymTextGame,
    render_cliffwalking,
    render_frozenlake,
    render_taxi,
)

__all__ = [
    "cliffwalking",
    "frozenlake",
    "lake_walk",
    "render_cliffwalking",
    "render_frozenlake",
    "render_taxi",
    "taxi",
]


@register_env("frozenlake", max_steps=20)
def frozenlake(
    size: int = 4, frozen_prob: float = 0.8, slippery: bool = False, start_goal: str = "corners"
) -> GymTextGame:
    """FrozenLake on a random map per seed: walk from S to G without falling into a hole.

    Observation: the ``size``×``size`` grid (``P`` you, ``F`` frozen, ``H`` hole, ``G`` goal)
    and a legend. Actions: left, down, right, up. Reward: 1 on reaching G (success), 0
    otherwise; falling into a hole ends the episode. Max steps: 20. Each seed draws its own
    solvable map; not slippery unless ``slippery=True``. ``start_goal="corners"`` is
    gymnasium's layout (``generate_random_map``: S top left, G bottom right);
    ``"random"`` puts S and G on two distinct random squares, so that tasks differ in where
    to go and not only in where the holes are (``frozen_prob=1`` then gives hole-free walks
    to a goal, a task a small untrained model sometimes solves).
    """
    if start_goal not in ("corners", "random"):
        raise ValueError(f"start_goal={start_goal!r} must be 'corners' or 'random'")
    layout = generate_random_map if start_goal == "corners" else random_start_goal_map

    def make(seed: int) -> gym.Env:
        desc = layout(size=size, p=frozen_prob, seed=seed)
        return gym.make("FrozenLake-v1", desc=desc, is_slippery=slippery)

    return _lake_game(make)


def _lake_game(make) -> GymTextGame:
    """A FrozenLake text game over the envs ``make(seed)`` returns."""
    return GymTextGame(
        make,
        render=render_frozenlake,
        # the map belongs to the state: the same square on another map is another state
        state=lambda env, position: (int(position), env.unwrapped.desc.tobytes()),
        action_names=["left", "down", "right", "up"],
        task="Walk across the frozen lake from S to the goal G without stepping into a hole H.",
    )


@register_env("lake-walk", max_steps=20)
def lake_walk(size: int = 3, progress_reward: float = 0.5) -> GymTextGame:
    """FrozenLake without holes: walk from a random square to a random goal square.

    ``frozenlake(size, frozen_prob=1, start_goal="random")``, 3×3 by default: 72 tasks (a
    start and a goal square), the way to the goal said in words in every observation, at most
    4 moves. The README's main job; a task an untrained 135M model solves about one time in
    five, and only by reading the observation can a policy solve it every time.

    ``progress_reward`` adds ``progress_reward × (d − d')`` to each step's reward, d and d'
    the grid distances to the goal before and after the move: a potential-based shaping
    (Ng et al., 1999), so it changes no policy's ranking of whole walks that reach the goal,
    while every single move is scored at once. Success is still reaching the goal. The
    main job's default, 0.5: without it, 24 iterations of the main job learned which move
    to prefer but not to read the way (see the README).
    """

    def make(seed: int) -> gym.Env:
        desc = random_start_goal_map(size=size, p=1.0, seed=seed)
        lake = gym.make("FrozenLake-v1", desc=desc, is_slippery=False)
        return ProgressReward(lake, progress_reward) if progress_reward else lake

    return _lake_game(make)


class ProgressReward(gym.Wrapper):
    """FrozenLake with ``scale × (distance before − distance after)`` added to each reward
    (distance: rows plus columns between the agent and the goal square)."""

    def __init__(self, env: gym.Env, scale: float):
        super().__init__(env)
        self.scale = scale
        desc = env.unwrapped.desc
        self._goal = divmod(int(np.flatnonzero(desc.flatten() == b"G")[0]), desc.shape[1])

    def _distance(self) -> int:
        row, col = divmod(int(self.env.unwrapped.s), self.env.unwrapped.ncol)
        return abs(row - self._goal[0]) + abs(col - self._goal[1])

    def step(self, action):
        before = self._distance()
        observation, reward, terminated, truncated, info = self.env.step(action)
        reward = float(reward) + self.scale * (before - self._distance())
        return observation, reward, terminated, truncated, info


def random_start_goal_map(size: int, p: float, seed: int) -> list[str]:
    """A ``size``×``size`` FrozenLake map with S and G on distinct random squares and every
    other square frozen with probability ``p``, redrawn until G can be reached from S."""
    rng = np.random.default_rng(seed)
    while True:
        board = np.where(rng.random((size, size)) < p, "F", "H")
        start, goal = rng.choice(size * size, size=2, replace=False)
        board.flat[start], board.flat[goal] = "S", "G"
        if _reachable(board, divmod(int(start), size)):
            return ["".join(row) for row in board]


def _reachable(board: np.ndarray, start: tuple[int, int]) -> bool:
    """Whether a walk over frozen squares leads from ``start`` to the G square."""
    seen, frontier = {start}, [start]
    while frontier:
        row, col = frontier.pop()
        if board[row, col] == "G":
            return True
        for r, c in ((row + 1, col), (row - 1, col), (row, col + 1), (row, col - 1)):
            inside = 0 <= r < board.shape[0] and 0 <= c < board.shape[1]
            if inside and (r, c) not in seen and board[r, c] != "H":
                seen.add((r, c))
                frontier.append((r, c))
    return False


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
