"""The environment registry: names → ``TextGame`` factories, and ``make_env``.

Environments come from three places, all through the same API:

- ``@register_env("name")`` (or ``register_env("name", factory)``) in user code;
- installed packages that declare an entry point in the group ``gigpo_torchrl.envs``; the
  entry point names a module (imported: its ``register_env`` calls run) or a function
  (called with no arguments). The shipped ``gigpo_envs`` package registers this way;
- ``gym:<id>``: any registered gymnasium id, wrapped by the gymnasium adapter.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from gigpo_torchrl.envs.game import TextGame

ENTRY_POINT_GROUP = "gigpo_torchrl.envs"
GYM_PREFIX = "gym:"
DEFAULT_MAX_STEPS = 50


@dataclass(frozen=True)
class EnvSpec:
    """A registered environment.

    Attributes:
        name: the registry name.
        factory: ``factory(**kwargs) -> TextGame``, called once per batch element.
        max_steps: the default step limit of an episode.
        description: first paragraph of the factory's docstring.
    """

    name: str
    factory: Callable[..., TextGame]
    max_steps: int
    description: str


_REGISTRY: dict[str, EnvSpec] = {}
_entry_points_loaded = False


def register_env(
    name: str,
    factory: Callable[..., TextGame] | None = None,
    *,
    max_steps: int = DEFAULT_MAX_STEPS,
    overwrite: bool = False,
):
    """Register a ``TextGame`` factory under ``name``; usable as a decorator.

    Args:
        name: the name ``make_env`` will take (not starting with ``gym:``).
        factory: a callable returning a fresh :class:`TextGame` (a subclass works).
        max_steps: default episode step limit for this environment.
        overwrite: replace an existing registration instead of raising.

    Returns:
        The factory (so that the decorator leaves it usable).

    Examples:
        >>> @register_env("my-maze", max_steps=30)
        ... class Maze(TextGame): ...
    """
    if not isinstance(name, str) or not name or name.startswith(GYM_PREFIX):
        raise ValueError(f"env name {name!r} must be a non-empty string not starting with 'gym:'")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps={max_steps!r} must be a positive integer")

    def add(fn: Callable[..., TextGame]) -> Callable[..., TextGame]:
        if not callable(fn):
            raise ValueError(f"the factory for env {name!r} must be callable, got {fn!r}")
        if name in _REGISTRY and not overwrite and _REGISTRY[name].factory is not fn:
            raise ValueError(f"env {name!r} is already registered (pass overwrite=True)")
        doc = inspect.getdoc(fn) or ""
        _REGISTRY[name] = EnvSpec(name, fn, max_steps, doc.split("\n\n")[0].replace("\n", " "))
        return fn

    return add if factory is None else add(factory)


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        loaded = entry.load()
        if callable(loaded) and not inspect.ismodule(loaded):
            loaded()


def list_envs() -> list[str]:
    """Names of the registered environments, sorted (``gym:<id>`` names are not listed)."""
    _load_entry_points()
    return sorted(_REGISTRY)


def env_spec(name: str) -> EnvSpec:
    """The :class:`EnvSpec` of a registered name; ``ValueError`` listing the known ones."""
    _load_entry_points()
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise ValueError(
            f"unknown env {name!r}; registered envs: {known} (or 'gym:<gymnasium id>')"
        )
    return _REGISTRY[name]


def make_env(
    name: str,
    batch_size: int | Sequence[int] = 1,
    seed: int | None = None,
    *,
    max_steps: int | None = None,
    invalid_action_penalty: float = 0.1,
    **kwargs: Any,
):
    """Build a batched :class:`~gigpo_torchrl.envs.TextEnv` of a registered environment.

    Args:
        name: a registered name, or ``gym:<id>`` for any gymnasium id.
        batch_size: number of environments stepped together: an int, ``[n]`` or
            ``torch.Size([n])`` (text envs batch along one dimension).
        seed: seeds the env's RNG (used when ``reset`` is not given explicit seeds); an
            integer in ``[0, 2**63)``, as every reset seed must be.
        max_steps: episode step limit; defaults to the registered one.
        invalid_action_penalty: subtracted from the reward of an invalid action.
        **kwargs: passed to the environment's factory (the CLI's ``env_kwargs``). For
            ``gym:<id>`` they go to :class:`~gigpo_torchrl.envs.GymTextGame`:
            ``action_names`` (a name per action index, e.g. ``["left", "down", "right",
            "up"]``), ``task`` (the task text shown to the agent), ``make_kwargs`` (extra
            ``gymnasium.make`` arguments, e.g. ``{"map_name": "8x8"}``), and from Python
            ``render``, ``state``, ``success`` callables.

    Returns:
        A :class:`~gigpo_torchrl.envs.TextEnv` (a torchrl ``EnvBase``) of batch size
        ``[batch_size]``.
    """
    from gigpo_torchrl.envs.text_env import TextEnv

    if name.startswith(GYM_PREFIX):
        from gigpo_torchrl.envs.gym_adapter import GymTextGame

        gym_id = name[len(GYM_PREFIX) :]
        spec = EnvSpec(name, lambda **kw: GymTextGame(gym_id, **kw), DEFAULT_MAX_STEPS, "")
    else:
        spec = env_spec(name)
    return TextEnv(
        lambda: spec.factory(**kwargs),
        batch_size=batch_size,
        max_steps=spec.max_steps if max_steps is None else max_steps,
        invalid_action_penalty=invalid_action_penalty,
        seed=seed,
        name=name,
    )
