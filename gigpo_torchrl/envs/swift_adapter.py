"""Environments written for ms-swift's gym interface, run as ``TextGame``s.

ms-swift's ``Env`` has ``async reset(request) -> (observation, info, system_message)``,
``async step(messages) -> (observation, reward, done, info)`` (it receives the whole
conversation and parses the action itself) and ``close()``. Users coming from ms-swift
keep their environment class unchanged.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import warnings
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from gigpo_torchrl.envs.game import StepResult, TextGame
from gigpo_torchrl.envs.hashing import normalize_text

_warned_static: set[str] = set()


def default_request(seed: int) -> SimpleNamespace:
    """What ``reset`` receives: ms-swift's request fields, with the seed in ``data_dict``."""
    return SimpleNamespace(messages=[], data_dict={"seed": seed}, seed=seed)


class SwiftEnvGame(TextGame):
    """An ms-swift-style gym ``Env`` as a :class:`~gigpo_torchrl.envs.TextGame`.

    The conversation is kept as ms-swift keeps it: the system message from ``reset``, then
    alternating user observations and assistant messages; ``step`` receives a copy of it
    ending with the new assistant message, which is the model's whole reply, exactly as
    generated (``raw_action = True``: the collector does not parse it and ``TextEnv`` does
    not clean or cap it; the env parses the action itself, as under ms-swift). The anchor
    state is ``info["state_hash"]`` when the env reports one, else the observation text. If
    neither changes during a whole episode of several steps, a warning says so once per env
    class: every step would share one anchor and GIGPO's step term would carry no
    information.

    Args:
        env_factory: ``() -> Env`` (the ms-swift env class itself works).
        make_request: ``seed -> request`` passed to ``reset``; default :func:`default_request`.
        success: ``(reward, done, info) -> bool``; default ``info["success"]`` if present,
            else ``done and reward > 0``.
    """

    raw_action = True

    def __init__(
        self,
        env_factory: Callable[[], Any],
        *,
        make_request: Callable[[int], Any] = default_request,
        success: Callable[[float, bool, dict], bool] | None = None,
    ):
        self.env = env_factory()
        self._make_request = make_request
        self._success = success or (
            lambda reward, done, info: bool(info.get("success", done and reward > 0))
        )
        self._loop = asyncio.new_event_loop()
        self.messages: list[dict[str, str]] = []
        self._info: dict = {}
        self._observation = ""
        self._anchors: set = set()
        self._steps = 0

    def _run(self, value):
        return self._loop.run_until_complete(value) if inspect.isawaitable(value) else value

    def reset(self, seed: int) -> str:
        self._check_anchors()  # the previous episode may have been cut by the step limit
        observation, info, system = self._run(self.env.reset(self._make_request(seed)))
        self.task = system or ""
        self.messages = [{"role": "system", "content": system}] if system else []
        self.messages.append({"role": "user", "content": observation})
        self._observation, self._info = observation, dict(info or {})
        self._anchors = {self.state() if self.state() is not None else normalize_text(observation)}
        self._steps = 0
        return observation

    def step(self, action: str) -> StepResult:
        self.messages.append({"role": "assistant", "content": action})
        observation, reward, done, info = self._run(self.env.step(copy.deepcopy(self.messages)))
        self.messages.append({"role": "user", "content": observation})
        self._observation, self._info = observation, dict(info or {})
        self._steps += 1
        state = self.state()
        self._anchors.add(normalize_text(observation) if state is None else state)
        if done:
            self._check_anchors()
        return StepResult(
            observation=observation,
            reward=float(reward),
            terminated=bool(done),
            success=self._success(float(reward), bool(done), self._info),
            info=self._info,
        )

    def _check_anchors(self) -> None:
        name = type(self.env).__qualname__
        if self._steps > 1 and len(self._anchors) == 1 and name not in _warned_static:
            _warned_static.add(name)
            warnings.warn(
                f"{name}: neither info['state_hash'] nor the observation changed during a "
                f"{self._steps}-step episode, so all its steps share one anchor state and "
                "GIGPO's step-level advantage is inactive (it equals GRPO). Report a "
                "state_hash in info or put the state in the observation.",
                stacklevel=3,
            )

    def state(self) -> Any:
        return self._info.get("state_hash")

    def close(self) -> None:
        self._run(self.env.close())
        self._loop.close()


def register_swift_envs(
    envs: dict[str, Callable[[], Any]], *, max_steps: int = 50, **kwargs
) -> None:
    """Register every env of an ms-swift-style ``envs`` dict (name → Env class or factory).

    Args:
        envs: the mapping ms-swift plugins define at module level.
        max_steps: episode step limit for all of them.
        **kwargs: passed to :class:`SwiftEnvGame` (``make_request``, ``success``).
    """
    from gigpo_torchrl.envs.registry import register_env

    for name, factory in envs.items():
        register_env(
            name, lambda factory=factory: SwiftEnvGame(factory, **kwargs), max_steps=max_steps
        )
