"""``PettingZooTextGame``: one agent of a PettingZoo AEC game, played in text by the LLM.

The LLM plays one agent; every other agent is played by an opponent policy. A step is one
full cycle: the LLM's move, then the opponents' moves until the LLM is to move again or the
game is over. Games whose observations carry an ``action_mask`` (all PettingZoo classic
games) get their legal moves, and the opponents their choices, from it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from gigpo_torchrl.envs.game import InvalidAction, StepResult, TextGame

Opponent = Callable[[Any, np.ndarray, np.random.Generator], int]
"""``opponent(observation, action_mask, rng) -> action index``, ``action_mask[index]`` set."""

_INDEX = re.compile(r"[0-9]{1,6}")  # short: int() of a 10k-digit string raises


def random_opponent(observation: Any, action_mask: np.ndarray, rng: np.random.Generator) -> int:
    """Returns a legal action index drawn uniformly from ``action_mask``."""
    return int(rng.choice(np.flatnonzero(action_mask)))


def board_state(env: Any) -> Hashable:
    """Returns ``(cells, agent to move)``: ``env.unwrapped.board`` flattened to a tuple (a
    board object's ``squares`` list is used when it has one), and ``None`` once the game is over.
    """
    board = env.unwrapped.board
    cells = np.asarray(getattr(board, "squares", board)).ravel().tolist()
    return tuple(cells), (env.agent_selection if env.agents else None)


def _split(obs: Any, info: Mapping[str, Any]) -> tuple[Any, np.ndarray]:
    """Returns ``(observation, action_mask)`` from an AEC observation and info."""
    if isinstance(obs, Mapping) and "action_mask" in obs:
        return obs.get("observation"), np.asarray(obs["action_mask"])
    if "action_mask" in info:
        return obs, np.asarray(info["action_mask"])
    raise ValueError("the PettingZoo env gives no action_mask in its observation or info")


class PettingZooTextGame(TextGame):
    """A PettingZoo AEC game as a :class:`TextGame`; the LLM plays ``player``.

    Args:
        env_factory: returns a fresh AEC env (called once; the env is reset every episode).
        render: ``render(env) -> str``, the board as text (read ``env.unwrapped``; no pygame).
        action_names: action index → the text the LLM answers with; a list, or a dict whose
            order is the order legal moves are listed in.
        player: the LLM's agent, by name or index into ``possible_agents`` (default the first).
        opponent: ``"random"`` (uniform over legal moves, seeded by the reset seed) or an
            :data:`Opponent` callable, playing every other agent.
        state: ``state(env) -> hashable``, the anchor state; default :func:`board_state`.
        task: the task text shown to the agent.

    A step's reward is the player's reward over the cycle (PettingZoo's ``last()`` reward when
    the player is selected again); ``success`` is set when the game ends with the player's
    episode return above 0 (a win). Moves are matched to ``action_names`` ignoring case; the
    bare action index is also accepted, unless the names are themselves numbers.
    """

    def __init__(
        self,
        env_factory: Callable[[], Any],
        render: Callable[[Any], str],
        action_names: Sequence[str] | Mapping[int, str],
        *,
        player: str | int = 0,
        opponent: str | Opponent = "random",
        state: Callable[[Any], Hashable] = board_state,
        task: str = "",
    ):
        self._env = env_factory()
        agents = list(self._env.possible_agents)
        if isinstance(player, int) and not isinstance(player, bool):
            if not 0 <= player < len(agents):
                raise ValueError(f"player index {player} out of range for agents {agents}")
            player = agents[player]
        if player not in agents:
            raise ValueError(f"unknown player {player!r}; agents: {agents}")
        if opponent == "random":
            opponent = random_opponent
        elif not callable(opponent):
            raise ValueError(f"opponent must be 'random' or a callable, got {opponent!r}")
        self.player: str = player
        self.task = task
        self._render = render
        self._state = state
        self._opponent: Opponent = opponent
        names = action_names if isinstance(action_names, Mapping) else dict(enumerate(action_names))
        self._names: dict[int, str] = {int(i): str(n) for i, n in names.items()}
        self._by_name = {n.casefold(): i for i, n in self._names.items()}
        self._numeric_names = any(n.isascii() and n.isdigit() for n in self._names.values())
        self._rng = np.random.default_rng(0)
        self._mask: np.ndarray | None = None  # the player's legal moves; None when not its turn
        self._return = 0.0
        self._over, self._truncated = True, False

    def reset(self, seed: int) -> str:
        """Resets the game with ``seed`` and plays opponents until the player is to move.

        Returns:
            The observation text.
        """
        self._env.reset(seed=seed)
        self._rng = np.random.default_rng(seed)
        self._return, self._over = 0.0, False
        reward, moves = self._advance()
        self._return += reward
        return self._observation(moves)

    def step(self, action: str) -> StepResult:
        """Plays ``action`` for the player, then the opponents.

        Returns:
            A :class:`StepResult`: the player's reward over the cycle, ``terminated`` (or
            ``truncated``) when the game is over, ``success`` when the player won;
            ``info["opponent_moves"]`` lists ``(agent, action name)`` pairs.

        Raises:
            InvalidAction: ``action`` names no move, or a move that is not legal now.
        """
        if self._over or self._mask is None:
            raise RuntimeError("the game is over or was not started: call reset() first")
        index = self._parse(action)
        self._env.step(index)
        reward, moves = self._advance()
        self._return += reward
        terminated = self._over and not self._truncated
        return StepResult(
            observation=self._observation(moves),
            reward=reward,
            terminated=terminated,
            truncated=self._over and self._truncated,
            success=self._over and self._return > 0,
            info={"opponent_moves": moves},
        )

    def admissible_actions(self) -> list[str]:
        """Returns the names of the player's legal moves now (empty once the game is over)."""
        if self._mask is None:
            return []
        return [n for i, n in self._names.items() if i < len(self._mask) and self._mask[i]]

    def state(self) -> Hashable:
        """Returns the ``state`` callable's value for the current position."""
        return self._state(self._env)

    def close(self) -> None:
        """Closes the PettingZoo env."""
        self._env.close()

    def _parse(self, action: str) -> int:
        """Returns the action index that ``action`` names; raises :class:`InvalidAction`."""
        text = action.strip()
        index = self._by_name.get(text.casefold())
        if index is None and not self._numeric_names and _INDEX.fullmatch(text):
            index = int(text) if int(text) in self._names else None
        legal = ", ".join(self.admissible_actions())
        if index is None:
            raise InvalidAction(f"unknown move {text[:40]!r}; legal moves: {legal}")
        if index >= len(self._mask) or not self._mask[index]:
            raise InvalidAction(
                f"move {self._names[index]!r} is not legal now; legal moves: {legal}"
            )
        return index

    def _advance(self) -> tuple[float, list[tuple[str, str]]]:
        """Plays opponents (and PettingZoo's steps for finished agents) until the player is to
        move or no agent is left.

        Returns:
            The player's reward collected meanwhile, and the opponents' ``(agent, move)`` list.
        """
        env, reward, moves = self._env, 0.0, []
        self._mask, self._truncated = None, False
        while env.agents:
            agent = env.agent_selection
            obs, agent_reward, terminated, truncated, info = env.last()
            if agent == self.player:
                reward += float(agent_reward)
            if terminated or truncated:
                if agent == self.player:
                    self._over, self._truncated = True, not terminated
                env.step(None)  # AEC: a finished agent is removed by stepping it with None
            elif agent == self.player:
                self._mask = _split(obs, info)[1]
                return reward, moves
            else:
                index = self._opponent_move(agent, *_split(obs, info))
                moves.append((agent, self._names.get(index, str(index))))
                env.step(index)
        self._over = True
        return reward, moves

    def _opponent_move(self, agent: str, observation: Any, mask: np.ndarray) -> int:
        """Returns the opponent policy's move for ``agent``; ``ValueError`` if it is illegal."""
        index = self._opponent(observation, mask, self._rng)
        if not 0 <= int(index) < len(mask) or not mask[int(index)]:
            raise ValueError(f"the opponent policy chose illegal action {index!r} for {agent}")
        return int(index)

    def _observation(self, moves: list[tuple[str, str]]) -> str:
        """Returns the text: opponents' moves, the board, then the legal moves or the result."""
        lines = [f"{agent} played {name}." for agent, name in moves]
        lines.append(self._render(self._env).rstrip("\n"))
        if self._over:
            outcome = (
                "you won" if self._return > 0 else "you lost" if self._return < 0 else "a draw"
            )
            lines.append(f"Game over: {outcome}.")
        else:
            lines.append("Legal moves: " + ", ".join(self.admissible_actions()))
        return "\n".join(lines)
