"""Tic-tac-toe and Connect Four (PettingZoo classic) against a built-in opponent.

Registers ``tictactoe`` and ``connect_four`` through the public registration API. The LLM
plays one side; the other side is played by a random or a heuristic opponent
(``opponent="random"|"heuristic"``, or any ``(observation, action_mask, rng) -> int``).
PettingZoo's classic games import pygame (``pygame-ce``), so it is imported only when a game
is made.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from gigpo_torchrl.envs.pettingzoo_adapter import Opponent, PettingZooTextGame
from gigpo_torchrl.envs.registry import register_env

MARKS = ".XO"  # PettingZoo stores an empty cell as 0, the first mover's mark as 1, the other's as 2

# Tic-tac-toe cells are numbered 1-9 in reading order; PettingZoo numbers them by column
# (0 1 2 down the left column), so cell 2 (top middle) is PettingZoo's action 3.
TICTACTOE_ACTIONS = {3 * col + row: str(3 * row + col + 1) for row in range(3) for col in range(3)}
CONNECT_FOUR_ACTIONS = [str(col + 1) for col in range(7)]

TICTACTOE_TASK = (
    "Play tic-tac-toe against a computer opponent. Get three of your marks in a row, column or "
    "diagonal to win. Answer with the number (1-9) of an empty cell."
)
CONNECT_FOUR_TASK = (
    "Play Connect Four against a computer opponent. Get four of your pieces in a row, column or "
    "diagonal to win. Answer with the number (1-7) of a column that is not full."
)


def _legend(env: Any, player: int) -> str:
    """Returns the line telling the player which mark is theirs."""
    agents = env.possible_agents
    return (
        f"You are {MARKS[player + 1]} ({agents[player]}); your opponent is "
        f"{MARKS[2 - player]} ({agents[1 - player]}). X moves first."
    )


def render_tictactoe(env: Any, player: int) -> str:
    """Returns the tic-tac-toe board as text, rows top to bottom; an empty cell shows its number."""
    squares = env.unwrapped.board.squares  # column-major: squares[3 * col + row]
    rows = []
    for row in range(3):
        cells = [MARKS[squares[3 * col + row]] for col in range(3)]
        cells = [str(3 * row + col + 1) if m == "." else m for col, m in enumerate(cells)]
        rows.append((f"row {row + 1} " + "|".join(f"{c:^5}" for c in cells)).rstrip())
    rule = "      -----+-----+-----"
    return "\n".join(
        [
            _legend(env, player),
            "Board (an empty cell shows its number):",
            "      col 1 col 2 col 3",
            rows[0],
            rule,
            rows[1],
            rule,
            rows[2],
        ]
    )


def render_connect_four(env: Any, player: int) -> str:
    """Returns the Connect Four board as text: columns 1-7 left to right, rows 6 (top) to 1."""
    board = np.asarray(env.unwrapped.board).reshape(6, 7)  # row-major, row 0 is the top
    columns = "     " + " ".join(CONNECT_FOUR_ACTIONS)
    rows = [f"  {6 - r} |" + " ".join(MARKS[v] for v in board[r]) + "|" for r in range(6)]
    return "\n".join(
        [
            _legend(env, player),
            "Board (. is empty; a piece drops to the lowest empty row of its column):",
            columns,
            *rows,
            columns,
        ]
    )


def _has_line(grid: np.ndarray, length: int) -> bool:
    """Returns whether the bool ``grid`` has ``length`` set cells in a row, column or diagonal."""
    n_rows, n_cols = grid.shape
    for dr, dc in ((0, 1), (1, 0), (1, 1), (1, -1)):
        for r in range(n_rows):
            for c in range(n_cols):
                cells = [(r + k * dr, c + k * dc) for k in range(length)]
                if all(0 <= i < n_rows and 0 <= j < n_cols and grid[i, j] for i, j in cells):
                    return True
    return False


def _place_cell(marks: np.ndarray, occupied: np.ndarray, action: int) -> np.ndarray:
    """Returns ``marks`` with tic-tac-toe ``action`` added (the observation grid is the
    squares reshaped row by row, so its flat index is the action)."""
    out = marks.copy()
    out.flat[action] = True
    return out


def _drop_piece(marks: np.ndarray, occupied: np.ndarray, column: int) -> np.ndarray:
    """Returns ``marks`` with a piece dropped into ``column`` (row 0 is the top)."""
    out = marks.copy()
    out[np.flatnonzero(~occupied[:, column])[-1], column] = True
    return out


def heuristic_opponent(
    place: Callable[[np.ndarray, np.ndarray, int], np.ndarray], length: int
) -> Opponent:
    """Returns an opponent that wins if it can, else blocks an immediate win, else moves at random.

    Args:
        place: ``place(marks, occupied, action) -> marks`` after the move (bool grids).
        length: how many in a line win.
    """

    def choose(observation: np.ndarray, action_mask: np.ndarray, rng: np.random.Generator) -> int:
        # PettingZoo's classic observations: plane 0 = the mover's marks, plane 1 = the other's
        own, other = observation[..., 0].astype(bool), observation[..., 1].astype(bool)
        legal = np.flatnonzero(action_mask)
        for marks in (own, other):
            for action in legal:
                if _has_line(place(marks, own | other, action), length):
                    return int(action)
        return int(rng.choice(legal))

    return choose


def _opponent(opponent: str | Opponent, heuristic: Opponent) -> str | Opponent:
    """Returns the opponent policy that the ``opponent`` argument names."""
    if opponent == "heuristic":
        return heuristic
    if opponent == "random" or callable(opponent):
        return opponent
    raise ValueError(f"opponent must be 'random', 'heuristic' or a callable, got {opponent!r}")


def _check_player(player: int) -> int:
    if player not in (0, 1) or isinstance(player, bool):
        raise ValueError(f"player must be 0 (moves first, X) or 1 (O), got {player!r}")
    return player


def tictactoe(opponent: str | Opponent = "random", player: int = 0) -> PettingZooTextGame:
    """Tic-tac-toe (PettingZoo tictactoe_v3) against a random or heuristic opponent: answer
    with a cell number 1-9; reward +1 win, -1 loss, 0 draw; 10 steps at most.

    Observation: the opponent's last move ("player_2 played 5."), a line saying which mark
    is yours (X moves first), the 3x3 board with row and column labels where an empty cell
    shows its number, then "Legal moves: 2, 3, ..." (or "Game over: you won." at the end).

    Actions: the cell number, 1-9 in reading order (1 top left, 3 top right, 9 bottom right).

    Reward: +1 when the game ends in your win, -1 in a loss, 0 otherwise (draws included);
    success = you won. Max steps 10: you move at most 5 times, the rest is room for invalid
    answers.

    Args:
        opponent: ``"random"``, ``"heuristic"`` (win if possible, else block, else random),
            or an ``(observation, action_mask, rng) -> action index`` callable.
        player: 0 plays X and moves first, 1 plays O.
    """
    # the module PettingZoo's own registry points to: no deprecation warning, any pettingzoo>=1.25
    from pettingzoo.classic.tictactoe import tictactoe as tictactoe_v3

    player = _check_player(player)
    return PettingZooTextGame(
        tictactoe_v3.env,
        render=lambda env: render_tictactoe(env, player),
        action_names=TICTACTOE_ACTIONS,
        player=player,
        opponent=_opponent(opponent, heuristic_opponent(_place_cell, 3)),
        task=TICTACTOE_TASK,
    )


def connect_four(opponent: str | Opponent = "random", player: int = 0) -> PettingZooTextGame:
    """Connect Four (PettingZoo connect_four_v3) against a random or heuristic opponent: answer
    with a column number 1-7; reward +1 win, -1 loss, 0 draw; 30 steps at most.

    Observation: the opponent's last move ("player_1 played 4."), a line saying which mark
    is yours (X moves first), the 6x7 board with columns 1-7 (left to right) and rows 6 (top)
    to 1 (bottom), "." for empty, then "Legal moves: 1, 2, ..." (or "Game over: ...").

    Actions: the column number, 1-7 from the left; the piece drops to the lowest empty row.

    Reward: +1 when the game ends in your win, -1 in a loss, 0 otherwise (draws included);
    success = you won. Max steps 30: you move at most 21 times, the rest is room for invalid
    answers.

    Args:
        opponent: ``"random"``, ``"heuristic"`` (win if possible, else block, else random),
            or an ``(observation, action_mask, rng) -> action index`` callable.
        player: 0 plays X and moves first, 1 plays O.
    """
    from pettingzoo.classic.connect_four import connect_four as connect_four_v3

    player = _check_player(player)
    return PettingZooTextGame(
        connect_four_v3.env,
        render=lambda env: render_connect_four(env, player),
        action_names=CONNECT_FOUR_ACTIONS,
        player=player,
        opponent=_opponent(opponent, heuristic_opponent(_drop_piece, 4)),
        task=CONNECT_FOUR_TASK,
    )


register_env("tictactoe", tictactoe, max_steps=10)
register_env("connect_four", connect_four, max_steps=30)
