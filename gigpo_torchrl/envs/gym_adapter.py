"""Any gymnasium environment with discrete actions and a text rendering, as a ``TextGame``."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym

from gigpo_torchrl.envs.game import InvalidAction, StepResult, TextGame

_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def ansi_render(env: gym.Env) -> str:
    """``env.render()`` of an env made with ``render_mode="ansi"``, colour codes removed."""
    text = env.render()
    if not isinstance(text, str):
        raise ValueError(
            f"{env.spec.id if env.spec else env} does not render text: make it with "
            "render_mode='ansi' or pass render=<callable(env) -> str>"
        )
    return _ANSI_ESCAPE.sub("", text)


def reached_reward(reward: float, terminated: bool, info: dict) -> bool:
    """Default success rule: the episode terminated on a positive reward."""
    return bool(info.get("success", terminated and reward > 0))


class GymTextGame(TextGame):
    """A gymnasium ``Env`` with a ``Discrete`` action space played through text.

    Args:
        env: a gymnasium id (made once with ``render_mode="ansi"``), or a callable
            ``seed -> gymnasium.Env`` called at every reset (for envs whose layout depends on
            the seed, e.g. random FrozenLake maps).
        render: ``(env) -> str``, the observation text; default :func:`ansi_render`.
        action_names: the text name of each action index (default ``"0"``, ``"1"``, ...),
            matched case-insensitively.
        state: ``(env, observation) -> value`` hashed into the anchor state; default the
            gymnasium observation itself.
        success: ``(reward, terminated, info) -> bool``; default :func:`reached_reward`.
        task: the task description shown to the agent.
        make_kwargs: extra ``gymnasium.make`` arguments when ``env`` is an id.
    """

    def __init__(
        self,
        env: str | Callable[[int], gym.Env],
        *,
        render: Callable[[gym.Env], str] = ansi_render,
        action_names: Sequence[str] | None = None,
        state: Callable[[gym.Env, Any], Any] | None = None,
        success: Callable[[float, bool, dict], bool] = reached_reward,
        task: str = "",
        make_kwargs: dict | None = None,
    ):
        if isinstance(env, str):
            made = gym.make(env, render_mode="ansi", **(make_kwargs or {}))
            self._make = lambda seed: made
            self.task = task or f"Play the gymnasium environment {env}."
        elif callable(env):
            self._make = env
            self.task = task
        else:
            raise ValueError(f"env must be a gymnasium id or a callable seed -> Env, got {env!r}")
        self._render = render
        self._state = state
        self._success = success
        self._action_names = None if action_names is None else [str(a) for a in action_names]
        self.env: gym.Env | None = None
        self._observation: Any = None

    def reset(self, seed: int) -> str:
        self.env = self._make(seed)
        space = self.env.action_space
        if not isinstance(space, gym.spaces.Discrete):
            raise ValueError(f"GymTextGame needs a Discrete action space, got {space}")
        names = self._action_names or [str(i) for i in range(space.n)]
        if len(names) != space.n:
            raise ValueError(f"action_names has {len(names)} names for {space.n} actions")
        self._names = names
        self._observation, _ = self.env.reset(seed=seed)
        return self._render(self.env)

    def step(self, action: str) -> StepResult:
        wanted = action.casefold()
        index = next((i for i, n in enumerate(self._names) if n.casefold() == wanted), None)
        if index is None:
            raise InvalidAction(f"{action[:80]!r} is not one of {', '.join(self._names)}")
        observation, reward, terminated, truncated, info = self.env.step(index)
        self._observation = observation
        return StepResult(
            observation=self._render(self.env),
            reward=float(reward),
            terminated=bool(terminated),
            truncated=bool(truncated),
            success=self._success(float(reward), bool(terminated), info),
            info=info,
        )

    def admissible_actions(self) -> list[str]:
        return list(self._names)

    def state(self) -> Any:
        if self._state is not None:
            return self._state(self.env, self._observation)
        return self._observation

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
