"""Any gymnasium environment with discrete actions and a text rendering, as a ``TextGame``.

``make_env("gym:<id>", **env_kwargs)`` builds a :class:`GymTextGame` per batch element with
``GymTextGame(<id>, **env_kwargs)``; the keyword arguments it takes (``action_names``,
``task``, ``make_kwargs``, and from Python ``render``, ``state``, ``success``) are listed in
its docstring.

What the agent reads: gymnasium's toy-text games mark the agent (FrozenLake) and the taxi
(Taxi) only with ANSI colour, so their text rendering without colour loses the position.
:func:`text_render` therefore draws FrozenLake, Taxi and CliffWalking with letters (``P``
you, ``T`` the taxi, ``x`` you) and a legend; for any other env it is :func:`ansi_render`,
which removes the colour codes and lists what they marked.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym
from gymnasium.envs.registration import load_env_creator
from gymnasium.envs.toy_text.cliffwalking import CliffWalkingEnv
from gymnasium.envs.toy_text.frozen_lake import FrozenLakeEnv
from gymnasium.envs.toy_text.taxi import TaxiEnv

from gigpo_torchrl.envs.game import InvalidAction, StepResult, TextGame

_SGR = re.compile(r"\x1b\[([0-9;]*)m")
_OTHER_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_COLOURS = ("black", "red", "green", "yellow", "blue", "magenta", "cyan", "white")


def _style_after(style: tuple[str, ...], codes: str) -> tuple[str, ...]:
    """The style (words such as ``"bold"``, ``"red background"``) after an SGR sequence."""
    words = list(style)
    for code in (int(c) if c else 0 for c in codes.split(";")):
        if code == 0:
            words = []
        elif code == 1:
            words = [w for w in words if w != "bold"] + ["bold"]
        elif code == 22:
            words = [w for w in words if w != "bold"]
        elif 30 <= code <= 39 or 90 <= code <= 97:
            words = [w for w in words if not w.endswith(" text")]
            if code != 39:
                words.append(f"{_COLOURS[code % 10]} text")
        elif 40 <= code <= 49 or 100 <= code <= 107:
            words = [w for w in words if not w.endswith(" background")]
            if code != 49:
                words.append(f"{_COLOURS[code % 10]} background")
    return tuple(words)


def _describe(style: tuple[str, ...]) -> str:
    """``("bold", "blue text")`` → ``"bold blue"``; with a background: ``"red on white
    background"``."""
    text = " ".join(
        (["bold"] if "bold" in style else [])
        + [w[: -len(" text")] for w in style if w.endswith(" text")]
    )
    background = " ".join(w for w in style if w.endswith(" background"))
    return " on ".join(part for part in (text, background) if part)


def strip_colours(text: str) -> tuple[str, list[str]]:
    """``text`` without ANSI codes, and a description of each coloured run of characters.

    Leading and trailing blank lines are dropped; lines and columns are counted from 1 in
    the returned text. Each description reads ``"'S' at line 1, column 1 (red background)"``.
    """
    text = _OTHER_ESCAPES.sub(lambda m: m.group() if m.group().endswith("m") else "", text)
    text = text.lstrip("\n")
    plain: list[str] = []
    marks: list[list[Any]] = []
    style: tuple[str, ...] = ()
    line, column = 1, 1
    run: list[Any] | None = None  # [characters, line, column, style]
    position = 0
    for match in [*_SGR.finditer(text), None]:  # the text before each code, then the rest
        end = len(text) if match is None else match.start()
        for char in text[position:end]:
            if char == "\n":
                line, column, run = line + 1, 1, None
                plain.append(char)
                continue
            # a coloured background marks even a blank (gymnasium's Taxi on an empty square)
            if style and (char.strip() or any(w.endswith(" background") for w in style)):
                if run is not None and run[3] == style and run[1] == line:
                    run[0] += char
                else:
                    run = [char, line, column, style]
                    marks.append(run)
            else:
                run = None
            plain.append(char)
            column += 1
        if match is not None:
            style = _style_after(style, match.group(1))
            run = None
            position = match.end()
    described = [
        f"{chars!r} at line {ln}, column {col} ({_describe(st)})" for chars, ln, col, st in marks
    ]
    return "".join(plain).rstrip("\n"), described


def _rendered_text(env: gym.Env) -> str:
    text = env.render()
    if not isinstance(text, str):
        name = env.spec.id if env.spec else type(env.unwrapped).__name__
        raise ValueError(
            f"{name} does not render text (its render() gave {type(text).__name__}): make it "
            "with render_mode='ansi', or pass GymTextGame(..., render=<callable(env) -> str>)"
        )
    return text


def ansi_render(env: gym.Env) -> str:
    """``env.render()`` of an env made with ``render_mode="ansi"``, colour codes removed.

    What the colours marked (an agent's square, say) is kept: a last line lists each
    coloured run, e.g. ``Marked in colour: 'S' at line 1, column 1 (red background).``
    """
    text, marks = strip_colours(_rendered_text(env))
    return text + (f"\nMarked in colour: {'; '.join(marks)}." if marks else "")


def _grid(rows: list[str]) -> str:
    return "\n".join(" ".join(row) for row in rows)


def render_frozenlake(env: gym.Env) -> str:
    """The lake with the agent as ``P``, a legend, and where the agent and the goal are."""
    lake = env.unwrapped
    rows = [[c.decode() for c in row] for row in lake.desc]
    row, col = divmod(int(lake.s), lake.ncol)
    goal = next((r, c) for r, line in enumerate(rows) for c, v in enumerate(line) if v == "G")
    rows[row][col] = "P"
    return (
        _grid(["".join(r) for r in rows])
        + "\nLegend: P you, S start, F frozen (safe), H hole, G goal."
        # small models read coordinates and directions far more easily than a grid
        + f"\nYou are at row {row + 1}, column {col + 1}; the goal is at row {goal[0] + 1}, "
        f"column {goal[1] + 1}{_direction(goal[0] - row, goal[1] - col)}."
    )


def _direction(rows: int, cols: int) -> str:
    """``": 1 row down and 2 columns left"`` (nothing when there is no way to go)."""
    parts = [
        f"{abs(n)} {unit}{'s' if abs(n) > 1 else ''} {way}"
        for n, unit, way in (
            (rows, "row", "down" if rows > 0 else "up"),
            (cols, "column", "right" if cols > 0 else "left"),
        )
        if n
    ]
    return ": " + " and ".join(parts) if parts else ""


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


def render_cliffwalking(env: gym.Env) -> str:
    """gymnasium's text rendering of the cliff (``x`` marks you), and a legend."""
    return ansi_render(env) + "\nLegend: x you, o safe ground, C cliff, T target."


#: text renderers of gymnasium classes whose ANSI rendering needs colour to be read
TEXT_RENDERERS: dict[type, Callable[[gym.Env], str]] = {
    FrozenLakeEnv: render_frozenlake,
    TaxiEnv: render_taxi,
    CliffWalkingEnv: render_cliffwalking,
}


def _known_renderer(env_class: Any) -> Callable[[gym.Env], str] | None:
    for known, render in TEXT_RENDERERS.items():
        if isinstance(env_class, type) and issubclass(env_class, known):
            return render
    return None


def text_render(env: gym.Env) -> str:
    """The default observation text: a :data:`TEXT_RENDERERS` entry for the env's class
    (FrozenLake, Taxi, CliffWalking), else :func:`ansi_render`."""
    render = _known_renderer(type(env.unwrapped))
    return render(env) if render is not None else ansi_render(env)


def reached_reward(reward: float, terminated: bool, info: dict) -> bool:
    """Default success rule: the episode terminated on a positive reward."""
    return bool(info.get("success", terminated and reward > 0))


def _make_by_id(gym_id: str, own_render: bool, make_kwargs: dict) -> gym.Env:
    """``gymnasium.make(gym_id)`` for text play, or a ``ValueError`` saying what is missing."""
    name = f"gym:{gym_id}"
    try:
        spec = gym.spec(gym_id)
    except gym.error.Error as error:  # unknown, deprecated or missing version
        raise ValueError(f"{name}: {error}") from None
    creator = spec.entry_point
    if isinstance(creator, str):
        creator = load_env_creator(creator)
    kwargs = dict(make_kwargs)
    metadata = getattr(creator, "metadata", None)
    if not isinstance(metadata, dict):  # a factory function: make it to read its metadata
        probe = gym.make(gym_id, **kwargs)
        metadata = probe.metadata
        probe.close()
    modes = list(metadata.get("render_modes", []))
    if not own_render and _known_renderer(creator) is None and "ansi" not in modes:
        raise ValueError(
            f"{name} cannot be played as text: it has no text rendering (render_mode='ansi'; "
            f"its render modes are {modes}). From Python, pass render=<callable(env) -> str> "
            "(make_env(..., render=...) or GymTextGame(..., render=...)) to describe its state."
        )
    if "ansi" in modes:  # a render function of one's own may read env.render() too
        kwargs.setdefault("render_mode", "ansi")
    env = gym.make(gym_id, **kwargs)
    _check_discrete(env, name)
    return env


def _check_discrete(env: gym.Env, name: str) -> None:
    space = env.action_space
    if not isinstance(space, gym.spaces.Discrete):
        raise ValueError(
            f"{name} cannot be played as text: GymTextGame needs a Discrete action space "
            f"(one named action per index), it has {space}"
        )


class GymTextGame(TextGame):
    """A gymnasium ``Env`` with a ``Discrete`` action space played through text.

    ``make_env("gym:<id>", **env_kwargs)`` passes ``env_kwargs`` here (the CLI's
    ``--env_kwargs``/``env_kwargs`` in YAML take the text ones: ``action_names``, ``task``,
    ``make_kwargs``). An env that cannot be played as text (no ``Discrete`` action space, or
    no text rendering and no ``render``) is refused with a ``ValueError`` saying what it
    lacks; so is an unknown or deprecated id.

    Args:
        env: a gymnasium id (made once), or a callable ``seed -> gymnasium.Env`` called at
            every reset (for envs whose layout depends on the seed, e.g. random FrozenLake
            maps; it is checked at reset).
        render: ``(env) -> str``, the observation text; default :func:`text_render`
            (FrozenLake, Taxi and CliffWalking drawn with letters, else :func:`ansi_render`:
            the ANSI text with what its colours marked). An env made by id is made with
            ``render_mode="ansi"`` when it supports it.
        action_names: the text name of each action index, e.g. ``["left", "down", "right",
            "up"]`` for FrozenLake (default ``"0"``, ``"1"``, ...); matched
            case-insensitively, shown to the agent as the admissible actions.
        state: ``(env, observation) -> value`` hashed into the anchor state; default the
            gymnasium observation itself.
        success: ``(reward, terminated, info) -> bool``; default :func:`reached_reward`.
        task: the task description shown to the agent (default: "Play the gymnasium
            environment <id>.").
        make_kwargs: extra ``gymnasium.make`` arguments when ``env`` is an id, e.g.
            ``{"map_name": "8x8", "is_slippery": False}``.
    """

    def __init__(
        self,
        env: str | Callable[[int], gym.Env],
        *,
        render: Callable[[gym.Env], str] | None = None,
        action_names: Sequence[str] | None = None,
        state: Callable[[gym.Env, Any], Any] | None = None,
        success: Callable[[float, bool, dict], bool] = reached_reward,
        task: str = "",
        make_kwargs: dict | None = None,
    ):
        if isinstance(env, str):
            made = _make_by_id(env, render is not None, make_kwargs or {})
            self._make = lambda seed: made
            self.task = task or f"Play the gymnasium environment {env}."
            self._name = f"gym:{env}"
        elif callable(env):
            self._make = env
            self.task = task
            self._name = "the env"
        else:
            raise ValueError(f"env must be a gymnasium id or a callable seed -> Env, got {env!r}")
        self._render = render or text_render
        self._state = state
        self._success = success
        self._action_names = None if action_names is None else [str(a) for a in action_names]
        self.env: gym.Env | None = None
        self._observation: Any = None
        if isinstance(env, str):
            self._check_names(made)

    def _check_names(self, env: gym.Env) -> None:
        _check_discrete(env, self._name)
        space = env.action_space
        names = self._action_names or [str(i) for i in range(space.n)]
        if len(names) != space.n:
            raise ValueError(f"action_names has {len(names)} names for {space.n} actions")
        self._names = names
        self._first_action = int(space.start)

    def reset(self, seed: int) -> str:
        self.env = self._make(seed)
        self._check_names(self.env)
        self._observation, _ = self.env.reset(seed=seed)
        return self._render(self.env)

    def step(self, action: str) -> StepResult:
        wanted = action.casefold()
        index = next((i for i, n in enumerate(self._names) if n.casefold() == wanted), None)
        if index is None:
            raise InvalidAction(f"{action[:80]!r} is not one of {', '.join(self._names)}")
        step = self.env.step(self._first_action + index)
        observation, reward, terminated, truncated, info = step
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
