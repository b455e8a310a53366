"""TextWorld household games, generated offline and cached: the env ``textworld``.

ALFWorld's household tasks are the GiGPO paper's main benchmark, but their data must be
downloaded. TextWorld (``pip install 'gigpo-torchrl[textworld]'``) generates games of the same
kind offline: rooms of a house (kitchen, bedroom, attic, ...), containers and supporters to
open, objects to take, put and insert, doors and keys, and a quest of a given length. Each
seed is one game (the same seed gives the same game); a generated game is compiled once and
kept on disk, under ``<cache>/textworld/`` (``<cache>`` is ``$GIGPO_CACHE`` or
``~/.cache/gigpo-torchrl``; ``cache_dir=`` overrides the folder).

The env registers only when the ``textworld`` package is installed, through the same public
``register_env`` a user's own environment would use.
"""

from __future__ import annotations

import importlib.util
import os
import re
import tempfile
import warnings
from pathlib import Path

from gigpo_torchrl.envs import StepResult, TextGame, register_env

__all__ = [
    "MAX_STEPS",
    "PRESETS",
    "SUCCESS_REWARD",
    "TextWorldGame",
    "clean_feedback",
    "game_file",
    "textworld_available",
    "textworld_cache_dir",
]

#: reward of the step that completes the quest (ALFWorld's); every other step earns 0
SUCCESS_REWARD = 10.0
#: step limit of an episode (ALFWorld's, the paper's); ``--max_turns`` overrides it
MAX_STEPS = 50
#: difficulty presets: rooms in the house, objects in it, actions the quest needs
PRESETS: dict[str, dict[str, int]] = {
    "trivial": {"nb_rooms": 1, "nb_objects": 3, "quest_length": 1},
    "easy": {"nb_rooms": 2, "nb_objects": 5, "quest_length": 2},
    "medium": {"nb_rooms": 4, "nb_objects": 10, "quest_length": 4},
    "hard": {"nb_rooms": 6, "nb_objects": 15, "quest_length": 6},
    # ALFWorld-like: a quest of 8 actions among 20 objects; its expert plans take 5-20
    "paper": {"nb_rooms": 8, "nb_objects": 20, "quest_length": 8},
}
#: how many other seeds are tried, deterministically, when TextWorld finds no quest
_GENERATION_ATTEMPTS = 20
_BLANK_LINES = re.compile(r"\n\s*\n(\s*\n)+")


def textworld_available() -> bool:
    """Whether the optional ``textworld`` package is installed."""
    try:
        return importlib.util.find_spec("textworld") is not None
    except (ImportError, ValueError):  # e.g. blocked with sys.modules["textworld"] = None
        return False


def textworld_cache_dir() -> Path:
    """``<cache>/textworld``: ``$GIGPO_CACHE`` or ``~/.cache/gigpo-torchrl``, as the models'."""
    from gigpo_torchrl.policy.models import default_cache_dir

    return default_cache_dir() / "textworld"


def _options(seed: int, nb_rooms: int, nb_objects: int, quest_length: int):
    from textworld import GameOptions

    options = GameOptions()
    options.nb_rooms = nb_rooms
    options.nb_objects = nb_objects
    options.quest_length = quest_length
    options.grammar.theme = "house"
    options.grammar.include_adj = True  # "a wooden chest", not "a TextWorld style chest"
    options.seeds = int(seed)  # an int seeds a generator of the map/objects/quest/text seeds
    return options


def game_file(
    seed: int,
    *,
    nb_rooms: int,
    nb_objects: int,
    quest_length: int,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """The compiled game of ``seed`` (a ``.z8`` file with its ``.json`` beside it), generated
    and compiled on first use and read from the cache afterwards.

    The game depends only on ``seed`` (taken modulo 2**32, TextWorld's seed range), the three
    sizes and the TextWorld version, which are part of the cache path. When TextWorld finds no
    quest of the asked length for a seed, the next candidate seeds are tried in a fixed order,
    so the result is still a function of ``seed``. Writes are atomic (a temporary folder,
    then a rename): processes that generate the same game at once are safe.
    """
    import textworld
    from textworld.generator import compile_game, make_game
    from textworld.generator.chaining import QuestGenerationError

    root = Path(cache_dir) if cache_dir is not None else textworld_cache_dir()
    folder = (
        root
        / f"tw{textworld.__version__}-house"
        / (f"rooms{nb_rooms}-objects{nb_objects}-quest{quest_length}")
    )
    base = int(seed) % 2**32
    path = folder / f"{base}.z8"
    if path.is_file() and path.with_suffix(".json").is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    game = None
    for attempt in range(_GENERATION_ATTEMPTS):
        options = _options((base + attempt * 1_000_003) % 2**32, nb_rooms, nb_objects, quest_length)
        try:
            game = make_game(options)
            break
        except QuestGenerationError:
            continue
    if game is None:
        raise ValueError(
            f"TextWorld found no quest of length {quest_length} in {_GENERATION_ATTEMPTS} "
            f"attempts (seed {seed}, {nb_rooms} rooms, {nb_objects} objects)"
        )
    with tempfile.TemporaryDirectory(dir=folder, prefix=".tmp-") as tmp:
        options.path = os.path.join(tmp, "game.z8")
        options.force_recompile = True
        compiled = Path(compile_game(game, options))
        # the .json first: a .z8 in the cache means both are complete
        os.replace(compiled.with_suffix(".json"), path.with_suffix(".json"))
        os.replace(compiled, path)
    return path


def clean_feedback(text: str) -> str:
    """TextWorld's output without its banner, prompt and status line (``> ... -= Room =-0/3``,
    which counts moves, so it would differ at every step), blank runs collapsed."""
    text = text.replace("\r", "")
    if "$$$$" in text:  # the ASCII-art banner of the first screen: keep what follows it
        text = text[text.rfind("$$") :].partition("\n")[2]
    lines = [line.rstrip() for line in text.split("\n") if not line.lstrip().startswith(">")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def _squash(text: str) -> str:
    return " ".join(text.split())


class TextWorldGame(TextGame):
    """One TextWorld game per seed; see :func:`textworld_game` for the options."""

    def __init__(
        self,
        preset: str = "easy",
        *,
        nb_rooms: int | None = None,
        nb_objects: int | None = None,
        quest_length: int | None = None,
        num_games: int | None = None,
        observation: str = "full",
        cache_dir: str | os.PathLike | None = None,
    ):
        if preset not in PRESETS:
            raise ValueError(f"preset={preset!r} is not one of {tuple(PRESETS)}")
        sizes = dict(PRESETS[preset])
        for name, value in (
            ("nb_rooms", nb_rooms),
            ("nb_objects", nb_objects),
            ("quest_length", quest_length),
        ):
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"{name}={value!r} must be a positive integer")
                sizes[name] = value
        if num_games is not None and (
            isinstance(num_games, bool) or not isinstance(num_games, int) or num_games < 1
        ):
            raise ValueError(f"num_games={num_games!r} must be None or a positive integer")
        if observation not in ("full", "feedback"):
            raise ValueError(f"observation={observation!r} must be 'full' or 'feedback'")
        if not textworld_available():
            raise ValueError(
                "the textworld env needs the textworld package: pip install "
                "'gigpo-torchrl[textworld]'"
            )
        self.sizes = sizes
        self.num_games = num_games
        self.observation_mode = observation
        self.cache_dir = cache_dir
        self.task = ""
        self._env = None
        self._path: Path | None = None
        self._state = None

    # -- TextGame -----------------------------------------------------------------------

    def reset(self, seed: int) -> str:
        import textworld

        index = seed if self.num_games is None else seed % self.num_games
        path = game_file(index, cache_dir=self.cache_dir, **self.sizes)
        if path != self._path:
            self.close()
            infos = textworld.EnvInfos(
                facts=True,
                admissible_commands=True,
                objective=True,
                inventory=True,
                description=True,
                score=True,
                max_score=True,
                won=True,
                lost=True,
            )
            with warnings.catch_warnings():
                # jericho does not know TextWorld's games; TextWorld tracks their state itself
                warnings.filterwarnings("ignore", message=".*is not fully supported")
                self._env = textworld.start(str(path), request_infos=infos)
                self._state = self._env.reset()
            self._path = path
        else:
            self._state = self._env.reset()
        self.task = _squash(self._state.objective)
        return self._observe(None)

    def step(self, action: str) -> StepResult:
        self._state, _, done = self._env.step(action)
        won = bool(self._state.won)
        return StepResult(
            self._observe(clean_feedback(self._state.feedback)),
            reward=SUCCESS_REWARD if won else 0.0,
            terminated=bool(done or won or self._state.lost),
            success=won,
            info={"inventory": self.inventory(), "score": int(self._state.score)},
        )

    def admissible_actions(self) -> list[str]:
        return list(self._state.admissible_commands)

    def state(self) -> tuple:
        """TextWorld's exact facts (sorted propositions such as ``open(wooden chest: c)``)
        and the score: a revisited state gives the same value, whatever the text said."""
        facts = sorted(str(fact) for fact in self._state.facts)
        return ("facts", tuple(facts), "score", int(self._state.score))

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
        self._env = self._path = None

    # -- helpers ------------------------------------------------------------------------

    def walkthrough(self) -> list[str]:
        """The commands that complete the current game's quest from its start (TextWorld's
        own solution), e.g. for tests and scripted baselines."""
        from textworld import Game

        return list(Game.load(str(self._path.with_suffix(".json"))).walkthrough or [])

    def inventory(self) -> str:
        """What the player carries, as the game says it (``You are carrying: ...``)."""
        return clean_feedback(self._state.inventory or "")

    def _observe(self, feedback: str | None) -> str:
        """The observation: the game's answer to the last action (none after a reset), then,
        unless ``observation="feedback"`` or the answer already says them, the current room's
        description and the inventory."""
        parts = [feedback] if feedback else []
        if self.observation_mode == "full" or not parts:
            said = _squash(feedback or "")
            for extra in (clean_feedback(self._state.description or ""), self.inventory()):
                if extra and _squash(extra) not in said:
                    parts.append(extra)
        return "\n\n".join(parts)


def textworld_game(
    preset: str = "easy",
    *,
    nb_rooms: int | None = None,
    nb_objects: int | None = None,
    quest_length: int | None = None,
    num_games: int | None = None,
    observation: str = "full",
    cache_dir: str | None = None,
) -> TextWorldGame:
    """TextWorld household games: complete the quest the task states (optional extra).

    Task: TextWorld's objective (``First, go east. Then, take the wooden key ...``).
    Observation: the game's answer to the last action, then the current room's description
    and the inventory (``observation="feedback"``: the answer alone). Actions: the admissible
    commands (go/take/drop/put/insert/open/close/lock/unlock/examine/eat/look/inventory).
    Reward: 10 on completing the quest (success, ends the episode), 0 otherwise; an invalid
    action costs the env's invalid-action penalty. Max steps: 50. One game per seed (the same
    seed gives the same game, generated once and cached on disk); ``num_games=K`` plays only
    the games of seeds ``seed % K``, a fixed set as ALFWorld's. ``preset``: ``trivial`` (1 room,
    3 objects, quest of 1 action), ``easy`` (2, 5, 2), ``medium`` (4, 10, 4), ``hard`` (6, 15,
    6), ``paper`` (8, 20, 8); ``nb_rooms``, ``nb_objects`` and ``quest_length`` override it.
    The anchor state is TextWorld's set of facts plus the score, not the text. Needs
    ``pip install 'gigpo-torchrl[textworld]'``.
    """
    return TextWorldGame(
        preset,
        nb_rooms=nb_rooms,
        nb_objects=nb_objects,
        quest_length=quest_length,
        num_games=num_games,
        observation=observation,
        cache_dir=cache_dir,
    )


if textworld_available():
    register_env("textworld", textworld_game, max_steps=MAX_STEPS)
