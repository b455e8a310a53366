"""``TextGame``: one text environment instance, the unit that ``TextEnv`` batches.

Write a ``TextGame`` (or adapt a gymnasium, PettingZoo or ms-swift environment to one) and
register a factory for it; ``TextEnv`` runs B of them as one batched torchrl env, and takes
care of step limits, invalid actions, errors and state hashing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any


class InvalidAction(Exception):  # noqa: N818 (reads as what happened, like StopIteration)
    """Raised by :meth:`TextGame.step` for an action the game cannot apply.

    ``TextEnv`` then leaves the state unchanged, marks the step ``action_valid=False``,
    applies the invalid-action penalty and shows the message in the next observation.
    """


@dataclass
class StepResult:
    """What one :meth:`TextGame.step` returns.

    Attributes:
        observation: the text the agent sees next.
        reward: the step's reward (before any invalid-action penalty).
        terminated: the episode ended inside the game (goal reached, lost, ...).
        truncated: the game itself cut the episode short (``TextEnv`` adds its own step limit).
        success: the task was achieved (read when the episode ends).
        info: anything else, kept out of the TensorDict.
    """

    observation: str
    reward: float = 0.0
    terminated: bool = False
    truncated: bool = False
    success: bool = False
    info: dict[str, Any] = field(default_factory=dict)


class TextGame(ABC):
    """A single text environment: reset with a seed, step with an action string.

    Subclasses implement :meth:`reset` and :meth:`step`, and may override
    :meth:`admissible_actions` (the actions valid now; ``TextEnv`` rejects others before
    calling :meth:`step`) and :meth:`state` (a canonical description of the current state,
    hashed into the anchor ``state_hash``; the default ``None`` makes ``TextEnv`` hash the
    normalised observation text instead).

    Attributes:
        task: a description of the task, shown to the agent with every observation.
        raw_action: False (the default): :meth:`step` receives an action string cleaned by
            ``TextEnv`` (whitespace collapsed, at most ``max_action_chars`` long) and, with
            :meth:`admissible_actions`, one of those exactly, parsed out of the model's reply
            by the collector. True: :meth:`step` receives the model's whole reply, unparsed
            and unchanged, and parses it itself (as ms-swift envs do).
    """

    task: str = ""
    raw_action: bool = False

    @abstractmethod
    def reset(self, seed: int) -> str:
        """Start an episode and return its first observation.

        The same seed must give the same initial state.
        """

    @abstractmethod
    def step(self, action: str) -> StepResult:
        """Apply ``action`` and return a :class:`StepResult`; may raise :class:`InvalidAction`.

        ``action`` has its whitespace normalised (unless :attr:`raw_action`). The reward must
        be a finite number: ``TextEnv`` ends the episode as a failure otherwise.
        """

    def admissible_actions(self) -> list[str] | None:
        """The actions valid in the current state, or None when the game cannot list them."""
        return None

    def state(self) -> Any:
        """A canonical, hashable-by-value description of the current state, or None."""
        return None

    def close(self) -> None:  # noqa: B027 (an optional hook: most games hold nothing)
        """Release resources."""
