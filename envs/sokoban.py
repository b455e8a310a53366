"""Sokoban: push every box onto a target, in procedurally generated rooms.

A ``TextGame`` written against gigpo_torchrl's public registration API, as a user's own
environment would be. Rooms are generated from the seed alone (no global RNG) and are solvable
by construction: boxes start on their targets and are scrambled by *reverse play*, the player
pulling boxes around, so replaying those moves backwards is a solution. The reverse play is a
breadth-first search, which also gives every start its exact shortest solution; a room starts
from one of the hardest states it found.
"""

from __future__ import annotations

import random
from collections import deque
from numbers import Integral

from gigpo_torchrl.envs import InvalidAction, StepResult, TextGame, register_env

Pos = tuple[int, int]

MOVES: dict[str, Pos] = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
ACTIONS = list(MOVES)

WALL, FLOOR, TARGET, BOX, BOX_ON_TARGET, PLAYER, PLAYER_ON_TARGET = "#_OX*PS"
LEGEND = "Legend: # wall, _ floor, O target, X box, * box on target, P player, S player on target."

STEP_REWARD = -0.1
BOX_ON_TARGET_REWARD = 1.0
BOX_OFF_TARGET_REWARD = -1.0
SOLVED_REWARD = 10.0

# Shapes the carving walk clears around its position (as in gym-sokoban's room topology).
_CARVE_MASKS: tuple[tuple[Pos, ...], ...] = (
    ((0, 0),),
    ((0, -1), (0, 0), (0, 1)),
    ((-1, 0), (0, 0), (1, 0)),
    ((0, 0), (0, 1), (1, 0), (1, 1)),
    ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)),
)
# Bounds the reverse search, and so the reset time, for big rooms with several boxes.
_SEARCH_STATES = 5000


@register_env("sokoban", max_steps=30)
class Sokoban(TextGame):
    """Sokoban (6x6 room, 1 box by default): push every box onto a target.

    Observation: the room as ASCII rows (row 0 at the top), a legend (``#`` wall, ``_``
    floor, ``O`` target, ``X`` box, ``*`` box on target, ``P`` player, ``S`` player on a
    target), the count of boxes on targets and, after a step, what the last move did.

    Actions: ``up``, ``down``, ``left``, ``right`` (case-insensitive), always admissible;
    walking into a wall, or pushing a box into a wall or another box, leaves the room as it
    is and still costs a step. Anything else raises :class:`InvalidAction`.

    Reward (as gym-sokoban): -0.1 per step, +1 for pushing a box onto a target, -1 for
    pushing one off, +10 when the last box reaches a target, which ends the episode with
    ``terminated=True, success=True``. Registered as ``"sokoban"`` with ``max_steps=30``.

    Args:
        dim_room: ``(rows, columns)`` of the room, outer walls included; each at least 5.
        num_boxes: number of boxes (and targets), from 1 to a fifth of the inner cells.
        max_generation_tries: rooms drawn per ``reset`` before giving up with
            ``RuntimeError`` (a room is redrawn when reverse play moves no box off target).
        max_solution_moves: how deep reverse play searches: every generated room's shortest
            solution has at most this many moves (30 keeps rooms solvable within the
            registered step limit).

    Attributes:
        solution_length: the fewest moves that solve the room of the last ``reset`` (None
            for rooms from :meth:`from_layout`).

    Examples:
        >>> game = Sokoban()
        >>> obs = game.reset(seed=0)
        >>> result = game.step("left")
    """

    task = (
        "Push every box (X) onto a target (O) by moving the player (P), one action per turn: "
        "up, down, left or right (up is towards row 0)."
    )

    def __init__(
        self,
        dim_room: tuple[int, int] = (6, 6),
        num_boxes: int = 1,
        max_generation_tries: int = 100,
        max_solution_moves: int = 30,
    ) -> None:
        if (
            not isinstance(dim_room, tuple | list)
            or len(dim_room) != 2
            or not all(_is_int(d) and d >= 5 for d in dim_room)
        ):
            raise ValueError(
                f"dim_room={dim_room!r} must be two integers (rows, columns), each >= 5"
            )
        rows, cols = int(dim_room[0]), int(dim_room[1])
        max_boxes = (rows - 2) * (cols - 2) // 5
        if not _is_int(num_boxes) or not 1 <= num_boxes <= max_boxes:
            raise ValueError(
                f"num_boxes={num_boxes!r} must be an integer from 1 to {max_boxes} "
                f"for a {rows}x{cols} room"
            )
        if not _is_int(max_generation_tries) or max_generation_tries < 1:
            raise ValueError(f"max_generation_tries={max_generation_tries!r} must be >= 1")
        if not _is_int(max_solution_moves) or max_solution_moves < 1:
            raise ValueError(f"max_solution_moves={max_solution_moves!r} must be >= 1")
        self.dim_room = (rows, cols)
        self.num_boxes = int(num_boxes)
        self.max_generation_tries = int(max_generation_tries)
        self.max_solution_moves = int(max_solution_moves)
        self._layout: tuple[frozenset[Pos], frozenset[Pos], frozenset[Pos], Pos] | None = None
        self._floor: frozenset[Pos] = frozenset()  # every non-wall cell, targets included
        self._targets: frozenset[Pos] = frozenset()
        self._boxes: set[Pos] = set()
        self._player: Pos | None = None
        self.solution_length: int | None = None

    @classmethod
    def from_layout(cls, layout: str) -> Sokoban:
        """A game whose every ``reset`` (any seed) starts from the given ASCII room.

        ``layout`` uses the observation's symbols (``# _ O X * P S``), one line per row, all
        rows of equal length; blank lines around it and spaces around each row are ignored.
        Cells outside the grid count as walls.

        Returns:
            A :class:`Sokoban` with ``dim_room`` and ``num_boxes`` taken from the layout.
        """
        if not isinstance(layout, str):
            raise TypeError(f"layout must be a string, got {type(layout).__name__}")
        lines = [line.strip() for line in layout.strip().splitlines()]
        if not lines or len({len(line) for line in lines}) != 1:
            raise ValueError("layout must be non-empty rows of equal length")
        floor, targets, boxes, players = set(), set(), set(), []
        for r, line in enumerate(lines):
            for c, ch in enumerate(line):
                if ch not in "#_OX*PS":
                    raise ValueError(f"unknown symbol {ch!r} in layout row {r}; {LEGEND}")
                if ch != WALL:
                    floor.add((r, c))
                if ch in (TARGET, BOX_ON_TARGET, PLAYER_ON_TARGET):
                    targets.add((r, c))
                if ch in (BOX, BOX_ON_TARGET):
                    boxes.add((r, c))
                if ch in (PLAYER, PLAYER_ON_TARGET):
                    players.append((r, c))
        if len(players) != 1:
            raise ValueError(f"layout must have exactly one player, found {len(players)}")
        if not boxes or len(boxes) != len(targets):
            raise ValueError(
                f"layout must have as many boxes as targets (at least one), "
                f"found {len(boxes)} boxes and {len(targets)} targets"
            )
        game = cls()
        game.dim_room = (len(lines), len(lines[0]))
        game.num_boxes = len(boxes)
        game._layout = (frozenset(floor), frozenset(targets), frozenset(boxes), players[0])
        return game

    def reset(self, seed: int) -> str:
        """Start an episode in the room of ``seed`` (the same seed, the same room).

        Returns:
            The observation: the rendered room, legend and box count.
        """
        if not _is_int(seed):
            raise TypeError(f"seed must be an integer, got {seed!r}")
        if self._layout is not None:
            floor, targets, boxes, player = self._layout
        else:
            rng = random.Random(int(seed))
            floor, targets, boxes, player, self.solution_length = self._generate(rng)
        self._floor, self._targets = floor, targets
        self._boxes, self._player = set(boxes), player
        return self._observation()

    def step(self, action: str) -> StepResult:
        """Move the player one cell, pushing a box in the way if the cell behind it is free.

        Returns:
            A :class:`StepResult`; ``info`` has ``moved`` and ``pushed`` (bools) and
            ``boxes_on_target`` (int).

        Raises:
            InvalidAction: ``action`` is not one of up, down, left, right.
        """
        if self._player is None:
            raise RuntimeError("call reset(seed) before step()")
        key = action.strip().lower() if isinstance(action, str) else None
        if key not in MOVES:
            # ascii(): the message reaches the agent's next observation, which must stay ASCII
            shown = ascii(action[:40] if isinstance(action, str) else action)
            more = "..." if isinstance(action, str) and len(action) > 40 else ""
            raise InvalidAction(f"unknown action {shown}{more}; use one of: {', '.join(ACTIONS)}")
        dr, dc = MOVES[key]
        pr, pc = self._player
        ahead, beyond = (pr + dr, pc + dc), (pr + 2 * dr, pc + 2 * dc)
        reward, moved, pushed = STEP_REWARD, False, False
        if ahead in self._boxes:
            if beyond in self._floor and beyond not in self._boxes:
                self._boxes.remove(ahead)
                self._boxes.add(beyond)
                if beyond in self._targets:
                    reward += BOX_ON_TARGET_REWARD
                if ahead in self._targets:
                    reward += BOX_OFF_TARGET_REWARD
                moved = pushed = True
        elif ahead in self._floor:
            moved = True
        if moved:
            self._player = ahead
        on_target = len(self._boxes & self._targets)
        solved = on_target == len(self._boxes)
        if solved and pushed:
            reward += SOLVED_REWARD
        if pushed:
            note = "pushed a box" + (" onto a target" if beyond in self._targets else "")
        elif moved:
            note = "moved"
        else:
            note = "blocked, nothing moved"
        return StepResult(
            observation=f"Last move: {key} ({note}).\n{self._observation()}",
            reward=reward,
            terminated=solved,
            success=solved,
            info={"moved": moved, "pushed": pushed, "boxes_on_target": on_target},
        )

    def admissible_actions(self) -> list[str]:
        """The four moves, always (a blocked move is legal and costs a step)."""
        return list(ACTIONS)

    def state(self) -> tuple[Pos, tuple[Pos, ...]] | None:
        """``(player, sorted boxes)`` as ``(row, column)`` pairs, or None before ``reset``.

        Walls and targets are fixed by the seed, so this identifies the state within a room.
        """
        if self._player is None:
            return None
        return self._player, tuple(sorted(self._boxes))

    def render(self) -> str:
        """The room as ASCII rows joined by newlines (symbols as in the legend)."""
        rows, cols = self.dim_room
        grid = [[WALL] * cols for _ in range(rows)]
        for r, c in self._floor:
            grid[r][c] = FLOOR
        for r, c in self._targets:
            grid[r][c] = TARGET
        for r, c in self._boxes:
            grid[r][c] = BOX_ON_TARGET if (r, c) in self._targets else BOX
        if self._player is not None:
            r, c = self._player
            grid[r][c] = PLAYER_ON_TARGET if self._player in self._targets else PLAYER
        return "\n".join("".join(row) for row in grid)

    def _observation(self) -> str:
        on_target = len(self._boxes & self._targets)
        return f"{self.render()}\n{LEGEND}\nBoxes on targets: {on_target} of {len(self._boxes)}."

    def _generate(
        self, rng: random.Random
    ) -> tuple[frozenset[Pos], frozenset[Pos], frozenset[Pos], Pos, int]:
        """Draw rooms until reverse play can scramble one, and take its hardest start.

        Returns:
            ``(floor, targets, boxes, player, moves)``: a room that is not solved, and the
            fewest moves that solve it.
        """
        rows, cols = self.dim_room
        for _ in range(self.max_generation_tries):
            floor = frozenset(_carve(rng, rows, cols))
            if len(floor) < self.num_boxes + 2:
                continue
            targets = frozenset(rng.sample(sorted(floor), self.num_boxes))
            distance = _reverse_search(floor, targets, self.dim_room, self.max_solution_moves)
            farthest = max(distance.values())
            if farthest == 0:  # no box can be pulled off its target in this room
                continue
            state = rng.choice([s for s, d in distance.items() if d == farthest])
            mask, player = divmod(state, rows * cols)
            boxes = frozenset(divmod(i, cols) for i in range(mask.bit_length()) if mask >> i & 1)
            return floor, targets, boxes, divmod(player, cols), farthest
        raise RuntimeError(
            f"no solvable {rows}x{cols} room with {self.num_boxes} boxes off target in "
            f"{self.max_generation_tries} tries; raise max_generation_tries or use fewer boxes"
        )


def _is_int(value: object) -> bool:
    """Whether ``value`` is an integer (numpy's included), bools excluded."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def _carve(rng: random.Random, rows: int, cols: int) -> set[Pos]:
    """Clear floor along a random walk inside the outer walls.

    Returns:
        The set of floor cells.
    """
    floor: set[Pos] = set()
    r, c = rng.randrange(1, rows - 1), rng.randrange(1, cols - 1)
    dr, dc = rng.choice(list(MOVES.values()))
    for _ in range(int(1.7 * (rows + cols))):
        if rng.random() < 0.35:
            dr, dc = rng.choice(list(MOVES.values()))
        r, c = min(max(r + dr, 1), rows - 2), min(max(c + dc, 1), cols - 2)
        for mr, mc in rng.choice(_CARVE_MASKS):
            if 1 <= r + mr <= rows - 2 and 1 <= c + mc <= cols - 2:
                floor.add((r + mr, c + mc))
    return floor


def _reverse_search(
    floor: frozenset[Pos], targets: frozenset[Pos], dim_room: tuple[int, int], max_moves: int
) -> dict[int, int]:
    """Breadth-first reverse play from the solved room: walk, or walk pulling a box along.

    Every pull undoes a push, so the search runs forward play backwards from all solved
    states (boxes on targets, player on any free cell) and a state's depth is the exact
    number of moves of its shortest solution. The search stops at ``max_moves`` deep or after
    ``_SEARCH_STATES`` states, whichever comes first. The floor must lie inside outer walls.

    Returns:
        ``{state: fewest moves to solve}`` for every state reached, where a state is the int
        ``boxes * rows * cols + player``: ``player`` a cell index ``row * cols + column`` and
        ``boxes`` the bitmask of box cells (plain ints keep the search fast and out of the
        garbage collector's way).
    """
    rows, cols = dim_room
    size = rows * cols
    cells = {r * cols + c for r, c in floor}
    goal = {r * cols + c for r, c in targets}
    solved = sum(1 << cell for cell in goal)
    distance = {solved * size + p: 0 for p in sorted(cells - goal)}
    queue = deque(distance)
    while queue and len(distance) < _SEARCH_STATES:
        state = queue.popleft()
        depth = distance[state] + 1
        if depth > max_moves:
            break
        boxes, player = divmod(state, size)
        for step in (-cols, cols, -1, 1):
            ahead = player + step
            if ahead not in cells or boxes >> ahead & 1:
                continue
            behind = player - step
            after = [boxes]
            if boxes >> behind & 1:
                after.append(boxes ^ (1 << behind) ^ (1 << player))
            for moved in after:
                if (nxt := moved * size + ahead) not in distance:
                    distance[nxt] = depth
                    queue.append(nxt)
    return distance
