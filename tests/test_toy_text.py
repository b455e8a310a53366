"""The gymnasium toy-text environments shipped in gigpo_envs, through make_env."""

import re
from collections import deque

import pytest
import torch
from tensordict import TensorDict

from gigpo_torchrl.envs import make_env

MOVES = {"left": (0, -1), "down": (1, 0), "right": (0, 1), "up": (-1, 0)}


def reset(env, *seeds):
    return env.reset(TensorDict({"seed": torch.tensor(seeds)}, [len(seeds)]))


def play(env, td, *actions):
    td["action_text"] = list(actions)
    return env.step(td)["next"]


def grid_of(observation):
    """The rows of the lake (the legend and the coordinates line left out)."""
    return [
        line.split()
        for line in observation.splitlines()
        if not line.startswith(("Legend", "You are"))
    ]


def shortest_path(grid):
    """BFS from P (or S) to G avoiding holes, on the rendered grid."""
    cells = {(r, c): v for r, row in enumerate(grid) for c, v in enumerate(row)}
    start = next(p for p, v in cells.items() if v == "P")
    queue, seen = deque([(start, [])]), {start}
    while queue:
        (r, c), path = queue.popleft()
        if cells[(r, c)] == "G":
            return path
        for name, (dr, dc) in MOVES.items():
            nxt = (r + dr, c + dc)
            if cells.get(nxt, "H") != "H" and nxt not in seen:
                seen.add(nxt)
                queue.append((nxt, path + [name]))
    return None


def test_frozenlake_maps_vary_by_seed_and_the_goal_is_reachable():
    env = make_env("frozenlake", batch_size=4)
    td = reset(env, 0, 1, 2, 3)
    assert len({td["observation"][i] for i in range(4)}) > 1
    path = shortest_path(grid_of(td["observation"][0]))
    assert path is not None
    out = td
    for move in path:
        out = play(env, out, move, "up", "up", "up")
    assert out["success"][0].item() and out["terminated"][0].item()
    assert out["reward"][0].item() == 1.0


def test_frozenlake_with_random_start_and_goal():
    seeds = list(range(12))
    env = make_env("frozenlake", batch_size=12, size=3, start_goal="random", frozen_prob=0.7)
    td = reset(env, *seeds)
    starts, goals = set(), set()
    for i in range(12):
        grid = grid_of(td["observation"][i])
        cells = {(r, c): v for r, row in enumerate(grid) for c, v in enumerate(row)}
        r, c = next(p for p, v in cells.items() if v == "P")
        gr, gc = next(p for p, v in cells.items() if v == "G")
        starts.add((r, c))
        goals.add((gr, gc))
        path = shortest_path(grid)  # every map is solvable from where the agent stands
        assert path is not None and len(path) >= 1
        # the coordinates line says the same as the grid, 1-based
        line = (
            f"You are at row {r + 1}, column {c + 1}; the goal is at row {gr + 1}, column {gc + 1}"
        )
        assert line in td["observation"][i]
    assert len(starts) > 2 and len(goals) > 2  # not gymnasium's fixed corners
    again = reset(
        make_env("frozenlake", batch_size=2, size=3, start_goal="random", frozen_prob=0.7), 3, 5
    )
    assert again["observation"][0] == td["observation"][3]  # the same seed, the same map
    assert again["observation"][1] == td["observation"][5]
    with pytest.raises(ValueError, match="start_goal='middle'"):
        make_env("frozenlake", batch_size=1, start_goal="middle")


def test_lake_walk_is_a_hole_free_3x3_walk_with_many_tasks():
    env = make_env("lake-walk", batch_size=40)
    td = reset(env, *range(40))
    tasks = set()
    for i in range(40):
        grid = grid_of(td["observation"][i])
        assert len(grid) == 3 and all(len(row) == 3 for row in grid)
        assert not any("H" in row for row in grid)
        # the shortest walk is the Manhattan distance: no detours without holes
        cells = {v: (r, c) for r, row in enumerate(grid) for c, v in enumerate(row)}
        (r, c), (gr, gc) = cells["P"], cells["G"]
        assert len(shortest_path(grid)) == abs(r - gr) + abs(c - gc) <= 4
        tasks.add(((r, c), (gr, gc)))
    assert len(tasks) > 25  # 72 possible (start, goal) pairs


def test_lake_walk_progress_reward_scores_each_move_by_the_distance_it_gains():
    plain = make_env("lake-walk", batch_size=1, progress_reward=0)
    shaped = make_env("lake-walk", batch_size=1)  # progress_reward=0.5 by default
    a, b = reset(plain, 3), reset(shaped, 3)
    assert a["observation"][0] == b["observation"][0]  # the same task, the same text
    assert a["observation"][0].endswith(
        "row 1, column 2; the goal is at row 1, column 1: 1 column left."
    )
    # down (farther), right (farther), right (into the wall: no move), up, left, left (goal)
    expected = [-0.5, -0.5, 0.0, 0.5, 0.5, 1.5]
    moves = ["down", "right", "right", "up", "left", "left"]
    for move, reward in zip(moves, expected, strict=True):
        a, b = play(plain, a, move), play(shaped, b, move)
        assert float(b["env_reward"]) == pytest.approx(reward)
        assert float(a["env_reward"]) == (1.0 if reward == 1.5 else 0.0)
        assert bool(b["success"]) == bool(a["success"]) == (reward == 1.5)
        assert bool(b["terminated"]) == bool(a["terminated"])
        assert int(b["state_hash"]) == int(a["state_hash"])


def test_frozenlake_says_where_the_goal_is_in_words():
    env = make_env("frozenlake", batch_size=2, size=3, start_goal="random", frozen_prob=0.7)
    td = reset(env, 4, 7)
    assert td["observation"][0] == (
        "H G H\nF P F\nH F H\nLegend: P you, S start, F frozen (safe), H hole, G goal.\n"
        "You are at row 2, column 2; the goal is at row 1, column 2: 1 row up."
    )
    assert td["observation"][1].endswith(
        "You are at row 1, column 1; the goal is at row 2, column 2: 1 row down and 1 column right."
    )
    after = play(env, td, "down", "right")  # a hole at row 1, column 2 ends the second
    assert after["observation"][0].endswith(
        "at row 3, column 2; the goal is at row 1, column 2: 2 rows up."
    )
    assert bool(after["terminated"][1])


def test_frozenlake_state_includes_the_map():
    env = make_env("frozenlake", batch_size=2)
    td = reset(env, 0, 1)
    # both agents stand on the start square, but of different maps
    assert td["observation"][0] != td["observation"][1]
    assert td["state_hash"][0] != td["state_hash"][1]


def test_cliffwalking_revisits_and_the_cliff():
    env = make_env("cliffwalking", batch_size=1)
    td = reset(env, 0)
    start = td["state_hash"].clone()
    out = play(env, td, "up")
    assert out["state_hash"] != start
    out = play(env, out, "down")
    assert out["state_hash"] == start
    out = play(env, out, "right")  # into the cliff: -100 and back to the start
    assert out["reward"].item() == -100.0 and out["state_hash"] == start
    assert not out["done"].item()


def test_taxi_renders_where_everything_is():
    env = make_env("taxi", batch_size=1)
    td = reset(env, 0)
    observation = td["observation"][0]
    rows = observation.splitlines()
    row, col = (int(n) for n in re.search(r"row (\d), column (\d)", observation).groups())
    assert rows[1 + row][2 * col + 1] == "T"
    assert sum(line.count("T") for line in rows[:7]) == 1  # the map shows one taxi
    out = play(env, td, "dropoff")  # nobody in the taxi: an illegal dropoff costs 10
    assert out["reward"].item() == -10.0 and out["action_valid"].item()
