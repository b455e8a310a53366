"""``TextEnv``: B ``TextGame`` instances as one batched torchrl ``EnvBase``."""

from __future__ import annotations

import math
import traceback
import unicodedata
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from tensordict import NonTensorData, NonTensorStack, TensorDict, TensorDictBase
from torchrl.data import Categorical, Composite, NonTensor, Unbounded
from torchrl.envs import EnvBase

from gigpo_torchrl.envs.game import InvalidAction, StepResult, TextGame
from gigpo_torchrl.envs.hashing import normalize_text, stable_hash
from gigpo_torchrl.envs.seeding import check_batch_size, check_seed, check_seeds


def _as_action_list(value, batch: int) -> list:
    """The B actions of a step, from a NonTensorStack, a NonTensorData or a list."""
    if isinstance(value, NonTensorStack):
        return value.tolist()
    if isinstance(value, NonTensorData):
        # torchrl's random action is one NonTensorData shared by the whole batch
        return [value.data] * batch
    if isinstance(value, list | tuple) and len(value) == batch:
        return list(value)
    return [value] * batch


def _clean(action: object, max_chars: int) -> tuple[str | None, str]:
    """``(cleaned action, "")``, or ``(None, reason)`` when it cannot be an action."""
    if not isinstance(action, str):
        return None, f"the action must be text, got {type(action).__name__}"
    if len(action) > max_chars:
        return None, f"the action is {len(action)} characters long (at most {max_chars})"
    # Control and format characters (NUL, escapes, zero-width marks) never belong to an
    # action; dropping them keeps the echo in the next observation printable too.
    text = "".join(c for c in action if unicodedata.category(c)[0] != "C" or c in " \n\t")
    text = " ".join(text.split())
    if not text:
        return None, "the action is empty"
    return text, ""


def _match(action: str, admissible: Sequence[str]) -> str | None:
    """The admissible action that ``action`` names, case- and spacing-insensitively."""
    wanted = action.casefold()
    for candidate in admissible:
        if " ".join(candidate.split()).casefold() == wanted:
            return candidate
    return None


def _checked_reward(reward: object) -> float:
    """The step's reward as a float; raises when it is not a finite number."""
    if isinstance(reward, str | bytes):  # float("1") would accept it
        raise TypeError(f"the game's reward must be a number, got {reward!r}")
    try:
        value = float(reward)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TypeError(f"the game's reward must be a number, got {reward!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"the game's reward must be finite, got {value!r}")
    return value


class TextEnv(EnvBase):
    """A batch of text games stepped together, with torchrl specs and conventions.

    Every batch element runs its own :class:`~gigpo_torchrl.envs.TextGame`, created by
    ``game_factory``. Elements finish independently; a finished element stays finished (its
    outputs frozen, reward 0) until it is reset.

    Reset: ``env.reset()`` draws a seed per element from the env's RNG (``set_seed``);
    ``env.reset(TensorDict({"seed": seeds}, [B]))`` uses the given int64 seeds, so an episode
    group of N elements given the same seed shares its initial state and ``state_hash``.
    A ``"_reset"`` mask resets only some elements. Seeds are checked here for every game:
    a seed outside ``[0, 2**63)`` or that is not an integer is refused with a ``ValueError``.

    Keys written by ``reset`` and ``step`` (under ``"next"`` for ``step``), shapes for a batch
    of B:

    - ``observation`` (str), ``task`` (str), ``admissible_actions`` (tuple of str, empty
      when the game cannot list them), ``error`` (str, empty unless the game raised);
    - ``state_hash`` int64 ``[B]``: stable hash of the game's ``state()`` or, when it has
      none, of the normalised observation text;
    - ``step`` int64 ``[B]``: number of actions taken in the episode;
    - ``action_valid``, ``success`` bool ``[B, 1]``; ``reward`` float ``[B, 1]``;
      ``done``/``terminated``/``truncated`` bool ``[B, 1]``;
    - ``env_reward`` float ``[B, 1]``: the game's own reward, without the invalid-action
      penalty (0 for an invalid action), which ``GIGPOAdvantage(compat="verl-agent",
      invalid_action_penalty=...)`` reads in place of ``reward``.

    The action is ``action_text`` (str per element). An action that is not text, empty,
    longer than ``max_action_chars``, not admissible, or that the game rejects with
    :class:`~gigpo_torchrl.envs.InvalidAction` leaves the state unchanged, sets
    ``action_valid=False``, subtracts ``invalid_action_penalty`` from the reward and says why
    in the observation (the game's last observation and the latest reason only: repeated
    invalid actions do not make it grow). Games whose ``raw_action`` is true (ms-swift envs)
    receive the action text exactly as given, unnormalised and uncapped.

    A game failure costs only its own episode: a game whose ``step`` raises (anything but
    ``InvalidAction``), returns something other than a ``StepResult``, or a reward that is
    not a finite number, ends that element's episode as truncated, with reward 0 and the
    error in ``error``; the other elements go on. The first failure of the env is shown as
    one warning with its traceback; every failure is counted in :attr:`env_errors`.

    Args:
        game_factory: ``() -> TextGame``, called once per batch element.
        batch_size: number of elements B: an int, ``[B]`` or ``torch.Size([B])``.
        max_steps: episodes are truncated after this many actions.
        invalid_action_penalty: subtracted from the reward of an invalid action (>= 0).
        max_action_chars: longer actions are invalid.
        seed: seeds the RNG that draws reset seeds.
        name: shown in ``repr``.
    """

    def __init__(
        self,
        game_factory: Callable[[], TextGame],
        *,
        batch_size: int,
        max_steps: int = 50,
        invalid_action_penalty: float = 0.1,
        max_action_chars: int = 256,
        seed: int | None = None,
        name: str | None = None,
    ):
        batch_size = check_batch_size(batch_size)
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"max_steps={max_steps!r} must be a positive integer")
        if not invalid_action_penalty >= 0:
            raise ValueError(f"invalid_action_penalty={invalid_action_penalty!r} must be >= 0")
        if seed is not None:
            seed = check_seed(seed)
        super().__init__(batch_size=torch.Size([batch_size]))
        self.games = [game_factory() for _ in range(batch_size)]
        for game in self.games:
            if not isinstance(game, TextGame):
                raise ValueError(f"game_factory must return TextGame instances, got {game!r}")
        self.max_steps = max_steps
        self.invalid_action_penalty = float(invalid_action_penalty)
        self.max_action_chars = max_action_chars
        self.name = name or type(self.games[0]).__name__
        self._rng = np.random.default_rng(seed)
        #: episodes ended by a game failure since the env was made
        self.env_errors = 0
        self._warned_failure = False
        self._seeds = [0] * batch_size
        # The latest outputs of each element, kept so that finished elements stay frozen.
        self._observation = [""] * batch_size
        self._game_observation = [""] * batch_size  # the game's own, without our notes
        self._admissible: list[tuple[str, ...]] = [() for _ in range(batch_size)]
        self._error = [""] * batch_size
        self._hash = torch.zeros(batch_size, dtype=torch.long)
        self._steps = torch.zeros(batch_size, dtype=torch.long)
        self._terminated = torch.zeros(batch_size, 1, dtype=torch.bool)
        self._truncated = torch.zeros(batch_size, 1, dtype=torch.bool)
        self._success = torch.zeros(batch_size, 1, dtype=torch.bool)
        self._make_specs()

    def _make_specs(self) -> None:
        b = self.batch_size
        flag = Categorical(2, shape=(*b, 1), dtype=torch.bool)
        self.observation_spec = Composite(
            observation=NonTensor(shape=b, example_data="an observation"),
            task=NonTensor(shape=b, example_data="a task"),
            admissible_actions=NonTensor(shape=b, example_data=("an action",)),
            error=NonTensor(shape=b, example_data=""),
            state_hash=Unbounded(shape=b, dtype=torch.long),
            step=Unbounded(shape=b, dtype=torch.long),
            action_valid=flag.clone(),
            success=flag.clone(),
            env_reward=Unbounded(shape=(*b, 1)),
            shape=b,
        )
        self.action_spec = Composite(
            action_text=NonTensor(shape=b, example_data="an action"), shape=b
        )
        self.reward_spec = Unbounded(shape=(*b, 1))
        self.done_spec = Composite(
            done=flag.clone(), terminated=flag.clone(), truncated=flag.clone(), shape=b
        )

    def __repr__(self) -> str:
        b, steps = self.batch_size[0], self.max_steps
        return f"TextEnv({self.name!r}, batch_size={b}, max_steps={steps})"

    @property
    def raw_actions(self) -> list[bool]:
        """Per element: its game wants the model's whole reply as action (``raw_action``)."""
        return [bool(getattr(game, "raw_action", False)) for game in self.games]

    def _set_seed(self, seed: int | None) -> None:
        self._rng = np.random.default_rng(None if seed is None else check_seed(seed))

    def _state_hash(self, game: TextGame, observation: str) -> int:
        state = game.state()
        return stable_hash(normalize_text(observation) if state is None else state)

    def _admissible_of(self, game: TextGame) -> tuple[str, ...]:
        # A tuple stays one opaque entry when TensorDicts stack; a list would become a dim.
        return tuple(game.admissible_actions() or ())

    def _output(self, reward: torch.Tensor, valid: torch.Tensor) -> TensorDict:
        done = self._terminated | self._truncated
        return TensorDict(
            {
                "observation": NonTensorStack.from_list(list(self._observation)),
                "task": NonTensorStack.from_list([game.task for game in self.games]),
                "admissible_actions": NonTensorStack.from_list(list(self._admissible)),
                "error": NonTensorStack.from_list(list(self._error)),
                "state_hash": self._hash.clone(),
                "step": self._steps.clone(),
                "action_valid": valid,
                "success": self._success.clone(),
                "reward": reward,
                # every step that is not valid (invalid action, game failure, finished
                # element) earns nothing from the game: only the penalty makes it nonzero
                "env_reward": torch.where(valid, reward, 0.0),
                "done": done,
                "terminated": self._terminated.clone(),
                "truncated": self._truncated.clone(),
            },
            batch_size=self.batch_size,
        )

    def _reset(self, tensordict: TensorDictBase | None, **kwargs) -> TensorDict:
        b = self.batch_size[0]
        mask = None if tensordict is None else tensordict.get("_reset", None)
        which = range(b) if mask is None else torch.nonzero(mask.reshape(b)).reshape(-1).tolist()
        seeds = None if tensordict is None else tensordict.get("seed", None)
        if seeds is not None:
            seeds = check_seeds(seeds, b)
        for i in which:
            seed = seeds[i] if seeds is not None else int(self._rng.integers(2**31))
            game = self.games[i]
            observation = game.reset(seed)
            self._seeds[i] = seed
            self._observation[i] = self._game_observation[i] = observation
            self._admissible[i] = self._admissible_of(game)
            self._error[i] = ""
            self._hash[i] = self._state_hash(game, observation)
            self._steps[i] = 0
            self._terminated[i] = self._truncated[i] = self._success[i] = False
        out = self._output(torch.zeros(b, 1), torch.ones(b, 1, dtype=torch.bool))
        return out.exclude("reward")

    def _step(self, tensordict: TensorDictBase) -> TensorDict:
        b = self.batch_size[0]
        actions = _as_action_list(tensordict.get("action_text"), b)
        reward = torch.zeros(b, 1)
        valid = torch.zeros(b, 1, dtype=torch.bool)
        for i, game in enumerate(self.games):
            if bool(self._terminated[i] | self._truncated[i]):
                continue
            self._steps[i] += 1
            try:
                result = self._play(game, i, actions[i])
                step_reward = _checked_reward(result.reward)
                admissible = self._admissible_of(game)
                state_hash = self._state_hash(game, result.observation)
            except InvalidAction as why:
                reward[i] = -self.invalid_action_penalty
                self._observation[i] = f"{self._game_observation[i]}\n\nInvalid action: {why}"
            except Exception as error:  # noqa: BLE001 (a faulty game must not end the batch)
                self._fail(i, error)
            else:
                valid[i] = True
                reward[i] = step_reward
                self._observation[i] = self._game_observation[i] = result.observation
                self._admissible[i] = admissible
                self._hash[i] = state_hash
                self._terminated[i] = bool(result.terminated)
                self._truncated[i] = bool(result.truncated)
                self._success[i] = bool(result.success) and bool(result.terminated)
            if int(self._steps[i]) >= self.max_steps and not bool(self._terminated[i]):
                self._truncated[i] = True
        return self._output(reward, valid)

    def _fail(self, i: int, error: Exception) -> None:
        """End element ``i``'s episode after a game failure; warn about the env's first."""
        self.env_errors += 1
        self._error[i] = f"{type(error).__name__}: {error}"
        self._truncated[i] = True
        self._observation[i] = f"{self._game_observation[i]}\n\nThe environment failed: {error}"
        if not self._warned_failure:
            self._warned_failure = True
            warnings.warn(
                f"{self.name}: a game failed (element {i}, seed {self._seeds[i]}, step "
                f"{int(self._steps[i])}); its episode was ended as truncated with `error` set "
                "and the others went on. Later failures are counted (env_errors), not shown. "
                f"The first failure:\n{traceback.format_exc()}",
                stacklevel=4,
            )

    def _play(self, game: TextGame, i: int, action: object) -> StepResult:
        """Apply one action; raises :class:`InvalidAction` saying why it cannot be."""
        if getattr(game, "raw_action", False):
            if not isinstance(action, str):
                raise InvalidAction(f"the action must be text, got {type(action).__name__}")
            text = action
        else:
            text, reason = _clean(action, self.max_action_chars)
            if text is None:
                raise InvalidAction(reason)
            if self._admissible[i]:
                matched = _match(text, self._admissible[i])
                if matched is None:
                    raise InvalidAction(f"{text[:80]!r} is not one of the admissible actions")
                text = matched
        result = game.step(text)
        if not isinstance(result, StepResult):
            raise TypeError(f"TextGame.step must return a StepResult, got {type(result).__name__}")
        return result

    def close(self, *, raise_if_closed: bool = True) -> None:
        for game in self.games:
            game.close()
        super().close(raise_if_closed=raise_if_closed)
