"""The environment registry: names → ``TextGame`` factories, and ``make_env``.

Environments come from three places, all through the same API:

- ``@register_env("name")`` (or ``register_env("name", factory)``) in user code;
- installed packages that declare an entry point in the group ``gigpo_torchrl.envs``; the
  entry point names a module (imported: its ``register_env`` calls run) or a function
  (called with no arguments). The shipped ``gigpo_envs`` package registers this way;
- ``gym:<id>``: any registered gymnasium id, wrapped by the gymnasium adapter;
- ``<module>:<name>``: import ``module`` (a dotted module name, importable from the
  installed packages or the current folder, or a ``.py`` file path), whose ``register_env``
  calls register ``name``; for example ``my_games:keydoor`` or ``games/keydoor.py:keydoor``.
  This is how ``gigpo-train --env`` reaches a game that is not packaged.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
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
_FILE_MODULES: dict[str, Any] = {}  # absolute .py path -> its module, imported once


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


def split_env_name(name: str) -> tuple[str | None, str]:
    """``"module:env"`` → ``("module", "env")``; a plain or ``gym:`` name → ``(None, name)``."""
    if name.startswith(GYM_PREFIX) or ":" not in name:
        return None, name
    module, _, env = name.rpartition(":")
    return module, env


def import_env_module(module: str):
    """Import the module of a ``module:env`` name (once) so that its environments register.

    ``module`` is a dotted module name (tried from the installed packages, then from the
    current folder, as ``python -m`` would) or the path of a ``.py`` file (its folder is
    added to ``sys.path`` so that it can import its neighbours).

    Raises:
        ValueError: the module or file cannot be found. Errors raised by the module's own
            code propagate unchanged, with their traceback.
    """
    if module.endswith(".py") or os.sep in module or "/" in module:
        path = os.path.abspath(os.path.expanduser(module))
        if path in _FILE_MODULES:
            return _FILE_MODULES[path]
        if not os.path.isfile(path):
            raise ValueError(f"env module file {module!r} does not exist")
        folder = os.path.dirname(path)
        if folder not in sys.path:
            sys.path.append(folder)
        stem = os.path.splitext(os.path.basename(path))[0]
        spec = importlib.util.spec_from_file_location(
            f"gigpo_env_file_{len(_FILE_MODULES)}_{stem}", path
        )
        if spec is None or spec.loader is None:
            raise ValueError(f"env module file {module!r} cannot be imported as Python")
        loaded = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = loaded
        _FILE_MODULES[path] = loaded
        try:
            spec.loader.exec_module(loaded)
        except BaseException:
            del sys.modules[spec.name], _FILE_MODULES[path]
            raise
        return loaded
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name is None or not module.startswith(error.name):
            raise  # the module itself was found; something it imports was not
        if os.getcwd() not in sys.path:  # console scripts do not put the current folder there
            sys.path.append(os.getcwd())
            try:
                return importlib.import_module(module)
            except ModuleNotFoundError as again:
                if again.name is None or not module.startswith(again.name):
                    raise
        raise ValueError(
            f"no module named {module!r} (neither installed nor in the current folder "
            f"{os.getcwd()}); give a dotted module name or a .py file path"
        ) from None


def list_envs() -> list[str]:
    """Names of the registered environments, sorted (``gym:<id>`` names are not listed)."""
    _load_entry_points()
    return sorted(_REGISTRY)


def env_spec(name: str) -> EnvSpec:
    """The :class:`EnvSpec` of a registered name (or ``module:name``, importing ``module``
    first); ``ValueError`` listing the known ones."""
    _load_entry_points()
    module, name = split_env_name(name)
    if module is not None:
        before = set(_REGISTRY)
        import_env_module(module)
        if name not in _REGISTRY:
            added = sorted(set(_REGISTRY) - before)
            raise ValueError(
                f"module {module!r} registers no env {name!r}"
                + (f"; it registered: {', '.join(added)}" if added else "")
            )
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
        name: a registered name, ``gym:<id>`` for any gymnasium id, or ``module:name``
            (``module`` imported first: a dotted module name or a ``.py`` file path).
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
