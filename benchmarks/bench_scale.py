"""Env-step throughput with games stepped in 1, 2 and 4 Ray env workers.

The game has a costly step, as text games that compute their observation do: a walk on a
seeded ``--grid`` × ``--grid`` maze whose every step recomputes the distance to the goal
by a breadth-first search in pure Python (a few ms of CPU). ``--batch`` games are stepped
together ``--steps`` times through :class:`~gigpo_torchrl.collector.ray_workers.ShardedTextEnv`
(what ``GroupCollector(num_env_workers=N)`` uses) after a warm-up step; the script prints
element-steps per second in this process (a plain ``TextEnv``, no Ray) and with 1, 2 and 4
workers, then the speed-up over one worker. Its last line reads ``2 workers: <x>x``.

    python benchmarks/bench_scale.py
    python benchmarks/bench_scale.py --batch 64 --steps 30 --grid 128

A quiet machine is needed for the numbers to mean anything: the 1-minute load average is
printed alongside.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from collections import deque

import torch
from tensordict import TensorDict

from gigpo_torchrl.collector.ray_workers import ShardedTextEnv, split_sizes
from gigpo_torchrl.envs import StepResult, TextEnv, TextGame, register_env

MOVES = {"north": (-1, 0), "south": (1, 0), "west": (0, -1), "east": (0, 1)}


@register_env("costly-maze", max_steps=10_000)
class CostlyMaze(TextGame):
    """A walk on a seeded maze; each step recomputes the goal distance by BFS (costly)."""

    task = "Walk to the goal G."

    def __init__(self, grid: int = 96):
        self.grid = grid

    def reset(self, seed: int) -> str:
        rng = random.Random(seed)
        n = self.grid
        self.open = [[rng.random() > 0.25 for _ in range(n)] for _ in range(n)]
        self.at, self.goal = (0, 0), (n - 1, n - 1)
        self.open[0][0] = self.open[n - 1][n - 1] = True
        return self._observe()

    def _distance(self) -> int:
        """Breadth-first search from the goal: -1 when it cannot be reached."""
        n, seen = self.grid, {self.goal}
        queue = deque([(self.goal, 0)])
        while queue:
            (r, c), d = queue.popleft()
            if (r, c) == self.at:
                return d
            for dr, dc in MOVES.values():
                nxt = (r + dr, c + dc)
                inside = 0 <= nxt[0] < n and 0 <= nxt[1] < n
                if inside and self.open[nxt[0]][nxt[1]] and nxt not in seen:
                    seen.add(nxt)
                    queue.append((nxt, d + 1))
        return -1

    def _observe(self) -> str:
        return f"You are at {self.at}; the goal is {self._distance()} steps away."

    def step(self, action: str) -> StepResult:
        dr, dc = MOVES[action]
        r, c = self.at[0] + dr, self.at[1] + dc
        if 0 <= r < self.grid and 0 <= c < self.grid and self.open[r][c]:
            self.at = (r, c)
        done = self.at == self.goal
        return StepResult(self._observe(), reward=float(done), terminated=done, success=done)

    def admissible_actions(self) -> list[str]:
        return list(MOVES)

    def state(self):
        return self.at


def make_games(grid: int):
    def factory(batch: int) -> TextEnv:
        return TextEnv(lambda: CostlyMaze(grid), batch_size=batch, max_steps=10_000)

    return factory


def throughput(factory, workers: int, batch: int, steps: int) -> float:
    """Element-steps per second over ``steps`` batched steps (after one warm-up step)."""
    sizes = split_sizes(batch, max(workers, 1))
    env = ShardedTextEnv(factory, sizes) if workers else factory(batch)
    td = env.reset(TensorDict({"seed": torch.arange(batch)}, [batch]))
    moves = list(MOVES)
    elapsed = 0.0
    for t in range(steps + 1):
        td["action_text"] = [moves[(t + i) % 2 * 2 + (t // 3) % 2] for i in range(batch)]
        start = time.perf_counter()
        td = env.step(td)["next"]
        if t:  # the first step warms the workers up
            elapsed += time.perf_counter() - start
    env.close()
    return batch * steps / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32, help="games stepped together")
    parser.add_argument("--steps", type=int, default=20, help="timed batched steps")
    parser.add_argument("--grid", type=int, default=96, help="maze side (step cost)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    torch.set_num_threads(1)

    import ray

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ray.init(
        address="local",
        num_cpus=max(cores, *args.workers),
        object_store_memory=80 * 2**20,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
    )
    factory = make_games(args.grid)
    game = CostlyMaze(args.grid)
    game.reset(0)
    start = time.perf_counter()
    for _ in range(20):
        game._distance()
    step_ms = (time.perf_counter() - start) / 20 * 1e3
    print(
        f"env-step throughput: costly-maze {args.grid}x{args.grid} (~{step_ms:.1f} ms of CPU "
        f"per game step), batch {args.batch}, {args.steps} steps; {cores} cores, load "
        f"average {os.getloadavg()[0]:.2f} at start"
    )
    here = throughput(factory, 0, args.batch, args.steps)
    print(f"in this process (no Ray): {here:8.1f} steps/s")
    rates = {}
    for workers in args.workers:
        rates[workers] = throughput(factory, workers, args.batch, args.steps)
        label = f"{workers} worker{'s' if workers > 1 else ''}"
        print(f"{label + ':':<25} {rates[workers]:8.1f} steps/s")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    ray.shutdown()
    base = rates.get(1)
    if base is None:
        return
    print("speed-up over 1 worker:")
    # the 2-worker line comes last (the line scripts and the README quote)
    for workers in sorted((w for w in rates if w != 1), key=lambda w: (w == 2, w)):
        print(f"{workers} workers: {rates[workers] / base:.2f}x")


if __name__ == "__main__":
    main()
