"""gigpo_envs: the environments shipped with gigpo-torchrl.

Each module registers its environments through gigpo_torchrl's public registration API,
exactly as a user's own package would; gigpo-torchrl finds this package through the
``gigpo_torchrl.envs`` entry point declared in pyproject.toml.
"""

from gigpo_envs import board_games, sokoban, textworld, toy_text

__all__ = ["board_games", "sokoban", "textworld", "toy_text"]
