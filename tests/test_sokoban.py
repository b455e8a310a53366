"""The shipped Sokoban: solvable rooms, determinism, rewards, hostile actions, arguments.

Rooms are read back from the observation text and solved by a breadth-first search written
here, independently of the game's own generator.
"""

from collections import deque

import pytest
import torch
from gigpo_envs.sokoban import Sokoban
from tensordict import TensorDict

from gigpo_torchrl.envs import InvalidAction, env_spec, make_env

DELTAS = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}


def parse(observation):
    """Walls, targets, boxes and player of the grid at the top of an observation."""
    grid = []
    for line in observation.splitlines():
        if line.startswith("Legend"):
            break
        if not line.startswith("Last move"):
            grid.append(line)
    cells = {(r, c): ch for r, row in enumerate(grid) for c, ch in enumerate(row)}
    walls = {p for p, ch in cells.items() if ch == "#"}
    targets = {p for p, ch in cells.items() if ch in "O*S"}
    boxes = {p for p, ch in cells.items() if ch in "X*"}
    (player,) = [p for p, ch in cells.items() if ch in "PS"]
    return grid, walls, targets, boxes, player


def solve(observation):
    """Fewest moves that put every box on a target (list of actions), or None."""
    _, walls, targets, boxes, player = parse(observation)
    start = (player, frozenset(boxes))
    parent = {start: None}
    queue = deque([start])
    while queue:
        state = queue.popleft()
        player, boxes = state
        if boxes == targets:
            path = []
            while parent[state] is not None:
                state, action = parent[state]
                path.append(action)
            return path[::-1]
        for action, (dr, dc) in DELTAS.items():
            ahead = (player[0] + dr, player[1] + dc)
            if ahead in walls:
                continue
            if ahead in boxes:
                beyond = (ahead[0] + dr, ahead[1] + dc)
                if beyond in walls or beyond in boxes:
                    continue
                nxt = (ahead, boxes - {ahead} | {beyond})
            else:
                nxt = (ahead, boxes)
            if nxt not in parent:
                parent[nxt] = (state, action)
                queue.append(nxt)
    return None


@pytest.mark.parametrize(
    ("dim_room", "num_boxes", "seeds"), [((6, 6), 1, 200), ((7, 7), 2, 50), ((8, 8), 3, 10)]
)
def test_generated_rooms_are_solvable_and_the_solution_wins(dim_room, num_boxes, seeds):
    max_steps = env_spec("sokoban").max_steps
    game = Sokoban(dim_room=dim_room, num_boxes=num_boxes)
    for seed in range(seeds):
        obs = game.reset(seed)
        grid, walls, targets, boxes, _ = parse(obs)
        assert [len(row) for row in grid] == [dim_room[1]] * dim_room[0]
        assert all(row[0] == row[-1] == "#" for row in grid)
        assert set(grid[0]) == set(grid[-1]) == {"#"}
        assert len(boxes) == len(targets) == num_boxes
        assert boxes != targets, f"seed {seed} starts solved"

        solution = solve(obs)
        assert solution is not None, f"seed {seed} is unsolvable:\n{obs}"
        assert len(solution) == game.solution_length <= max_steps
        for i, action in enumerate(solution):
            result = game.step(action)
            last = i == len(solution) - 1
            assert result.terminated == result.success == last
        assert result.reward == pytest.approx(-0.1 + 1 + 10)
        assert parse(result.observation)[3] == targets


def test_same_seed_same_room_different_seeds_differ():
    a, b = Sokoban(), Sokoban()
    for seed in (0, 1, 12345, 2**40):
        obs = a.reset(seed)
        a.step("up")
        a.step("left")
        assert b.reset(seed) == obs == a.reset(seed)
        assert a.state() == b.state()
        assert a.solution_length == b.solution_length
    rooms = {a.reset(seed) for seed in range(50)}
    assert len(rooms) >= 45


def test_rooms_do_not_depend_on_global_random_state():
    import random

    import numpy as np

    random.seed(1)
    np.random.seed(1)
    first = Sokoban(num_boxes=2).reset(7)
    random.seed(2)
    np.random.seed(2)
    assert Sokoban(num_boxes=2).reset(7) == first


def test_left_then_right_returns_to_the_same_state():
    game = Sokoban()
    checked = 0
    for seed in range(100):
        obs = game.reset(seed)
        _, walls, _, boxes, (r, c) = parse(obs)
        if (r, c - 1) in walls or (r, c - 1) in boxes:
            continue
        before = game.state()
        assert game.step("left").info["moved"]
        assert game.state() != before
        assert game.step("right").info["moved"]
        assert game.state() == before
        assert hash(game.state()) == hash(before)
        checked += 1
    assert checked >= 20


def test_different_paths_to_one_configuration_give_equal_states():
    game = Sokoban.from_layout(
        """
        ######
        #P___#
        #_X__#
        #___O#
        ######
        """
    )

    def play(actions):
        game.reset(0)
        for action in actions:
            game.step(action)
        return game.state()

    # above or below the box to the cell right of it, then push it left from there
    assert play(["right", "right", "down"]) == play(["down", "down", "right", "right", "up"])
    over = play(["right", "right", "down", "left"])
    under = play(["down", "down", "right", "right", "up", "left"])
    assert over == under == ((2, 2), ((2, 1),))


TWO_BOXES = """
    ########
    #P_X_O_#
    #__X_O_#
    ########
"""


def test_rewards_by_hand():
    game = Sokoban.from_layout(TWO_BOXES)
    obs = game.reset(0)
    assert parse(obs)[0] == [line.strip() for line in TWO_BOXES.strip().splitlines()]
    assert "Boxes on targets: 0 of 2." in obs

    walk = game.step("right")
    assert walk.reward == pytest.approx(-0.1)
    assert walk.info == {"moved": True, "pushed": False, "boxes_on_target": 0}

    push = game.step("right")  # box (1,3) -> (1,4), not a target
    assert push.reward == pytest.approx(-0.1)
    assert push.info["pushed"]

    onto = game.step("right")  # box -> (1,5), a target; the other box is still off
    assert onto.reward == pytest.approx(-0.1 + 1)
    assert not onto.terminated and not onto.success
    assert "#___P*_#" in onto.observation and "Boxes on targets: 1 of 2." in onto.observation

    off = game.step("right")  # box -> (1,6), off the target again
    assert off.reward == pytest.approx(-0.1 - 1)
    assert "#____SX#" in off.observation

    state = game.state()
    for action in ("right", "up"):  # box into a wall, then player into a wall
        blocked = game.step(action)
        assert blocked.reward == pytest.approx(-0.1)
        assert blocked.info == {"moved": False, "pushed": False, "boxes_on_target": 0}
        assert game.state() == state
        assert "nothing moved" in blocked.observation


def test_box_cannot_push_box_and_last_box_on_target_wins():
    game = Sokoban.from_layout("#######\n#PXXOO#\n#######")
    game.reset(3)
    result = game.step("right")
    assert result.reward == pytest.approx(-0.1)
    assert game.state() == ((1, 1), ((1, 2), (1, 3)))

    game = Sokoban.from_layout("#####\n#PXO#\n#####")
    game.reset(3)
    result = game.step("right")
    assert result.reward == pytest.approx(-0.1 + 1 + 10)
    assert result.terminated and result.success
    assert "#_P*#" in result.observation


def test_observation_task_and_actions_are_plain_ascii():
    game = Sokoban(dim_room=(8, 8), num_boxes=2)
    obs = game.reset(5)
    assert obs.isascii() and game.task.isascii()
    assert "Legend: # wall, _ floor, O target, X box, * box on target, P player" in obs
    _, _, targets, boxes, _ = parse(obs)
    assert obs.endswith(f"Boxes on targets: {len(boxes & targets)} of 2.")
    for word in ("up", "down", "left", "right"):
        assert word in game.task
    assert game.admissible_actions() == ["up", "down", "left", "right"]
    for action in ("UP", "Down", "LEFT", "rIgHt"):
        assert game.step(action).observation.isascii()
    assert game.admissible_actions() == ["up", "down", "left", "right"]


@pytest.mark.parametrize(
    "action",
    [
        "",
        "jump",
        "u",
        "upp",
        "up down",
        "x" * 10_000,
        "上",
        "ｕｐ",
        "up\x00",
        "\x1b[2J",
        "🙂",
        None,
        3,
    ],
)
def test_invalid_and_hostile_actions_leave_the_state_unchanged(action):
    game = Sokoban()
    obs = game.reset(11)
    state = game.state()
    with pytest.raises(InvalidAction) as caught:
        game.step(action)
    message = str(caught.value)
    assert message.isascii() and len(message) < 200
    assert "up, down, left, right" in message
    assert game.state() == state
    assert game.reset(11) == obs


def test_registered_through_the_public_api():
    spec = env_spec("sokoban")
    assert spec.factory is Sokoban
    assert spec.max_steps == 30
    assert spec.description.startswith("Sokoban")
    game = spec.factory(dim_room=(7, 7), num_boxes=2)
    assert isinstance(game, Sokoban) and game.num_boxes == 2


@pytest.mark.parametrize(
    ("kwargs", "shown"),
    [
        ({"dim_room": (4, 6)}, "(4, 6)"),
        ({"dim_room": (6,)}, "(6,)"),
        ({"dim_room": "66"}, "'66'"),
        ({"dim_room": (6.0, 6)}, "(6.0, 6)"),
        ({"num_boxes": 0}, "num_boxes=0"),
        ({"num_boxes": 4}, "num_boxes=4"),  # a 6x6 room holds at most 3
        ({"num_boxes": 1.5}, "num_boxes=1.5"),
        ({"num_boxes": True}, "num_boxes=True"),
        ({"max_generation_tries": 0}, "max_generation_tries=0"),
        ({"max_solution_moves": -3}, "max_solution_moves=-3"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_value(kwargs, shown):
    with pytest.raises(ValueError, match=shown.replace("(", r"\(").replace(")", r"\)")):
        Sokoban(**kwargs)


@pytest.mark.parametrize(
    ("layout", "match"),
    [
        ("#####\n#_XO#\n#####", "one player"),
        ("#####\n#PXP#\n#OOO#", "one player"),
        ("#####\n#PXX#\n#O__#", "2 boxes and 1 targets"),
        ("####\n#P_#\n####", "0 boxes"),
        ("#####\n#PX#\n#####", "equal length"),
        ("#####\n#PXO?\n#####", "unknown symbol '\\?'"),
    ],
)
def test_bad_layouts_raise_value_error(layout, match):
    with pytest.raises(ValueError, match=match):
        Sokoban.from_layout(layout)


def test_step_before_reset_and_bad_seed():
    game = Sokoban()
    assert game.state() is None
    with pytest.raises(RuntimeError, match="reset"):
        game.step("up")
    with pytest.raises(TypeError, match="seed"):
        game.reset("7")


def test_reset_takes_milliseconds():
    import time

    game = Sokoban()
    start = time.perf_counter()
    for seed in range(100):
        game.reset(seed)
    assert (time.perf_counter() - start) / 100 < 0.01


def test_runs_in_text_env_with_anchor_state_hashes():
    env = make_env("sokoban", batch_size=2)
    td = env.reset(TensorDict({"seed": torch.tensor([4, 4])}, [2]))
    assert td["observation"][0] == td["observation"][1] == Sokoban().reset(4)
    assert td["state_hash"][0] == td["state_hash"][1]
    start = td["state_hash"].clone()
    td["action_text"] = ["Up", "jump"]
    out = env.step(td)["next"]
    assert out["action_valid"].reshape(-1).tolist() == [True, False]
    assert out["state_hash"][1] == start[1]
    assert env.batch_size == torch.Size([2])
