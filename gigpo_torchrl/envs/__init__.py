"""Text environments: ``TextEnv``, ``TextGame``, adapters, state hashing and the registry."""

from gigpo_torchrl.envs.game import InvalidAction, StepResult, TextGame
from gigpo_torchrl.envs.gym_adapter import GymTextGame
from gigpo_torchrl.envs.hashing import normalize_text, stable_hash
from gigpo_torchrl.envs.pettingzoo_adapter import PettingZooTextGame
from gigpo_torchrl.envs.registry import env_spec, list_envs, make_env, register_env
from gigpo_torchrl.envs.swift_adapter import SwiftEnvGame, register_swift_envs
from gigpo_torchrl.envs.text_env import TextEnv

__all__ = [
    "PettingZooTextGame",
    "GymTextGame",
    "InvalidAction",
    "StepResult",
    "SwiftEnvGame",
    "TextEnv",
    "TextGame",
    "env_spec",
    "list_envs",
    "make_env",
    "normalize_text",
    "register_env",
    "register_swift_envs",
    "stable_hash",
]
