"""Time GIGPO's advantage against a straightforward per-row Python loop.

Batches look like agent training data: groups of 8 trajectories of 30-70 steps that start
from the same state and random-walk on a 5×5 torus, so anchor states recur within a group;
rewards are -0.1 per step with +10 on reaching a goal. For each size the script prints both
times, the speed-up (loop timed once, ours best of ``--repeats``), the peak memory that one
vectorised call adds (in a fresh process), and whether both give the same advantages.
Rows are shuffled: nothing may depend on the order a collector wrote them in.

    python benchmarks/bench_advantage.py                  # 6.4k, 100k and 1M rows
    python benchmarks/bench_advantage.py --rows 6400 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict

import torch
from tensordict import TensorDict

from gigpo_torchrl import GIGPOAdvantage

GROUP_SIZE = 8
GAMMA = 0.95


def make_rows(num_rows: int, seed: int = 0) -> TensorDict:
    """About ``num_rows`` step rows of complete trajectories (exact count: the batch size)."""
    g = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < num_rows:
        lengths.append(int(torch.randint(30, 71, (1,), generator=g)))
    lengths[-1] -= sum(lengths) - num_rows
    if lengths[-1] <= 0:
        lengths.pop()
    length = torch.tensor(lengths)
    traj = torch.repeat_interleave(torch.arange(len(lengths)), length)
    starts = torch.cumsum(length, 0) - length
    step = torch.arange(traj.numel()) - starts[traj]
    group = traj // GROUP_SIZE
    moves = torch.randint(0, 4, (traj.numel(),), generator=g)
    dx = torch.tensor([1, -1, 0, 0])[moves]
    dy = torch.tensor([0, 0, 1, -1])[moves]
    # position before each move: cumulative moves within the trajectory, on a torus
    cx, cy = torch.cumsum(dx, 0) - dx, torch.cumsum(dy, 0) - dy
    x = (cx - cx[starts][traj]) % 5
    y = (cy - cy[starts][traj]) % 5
    state_hash = group * 1000 + x * 5 + y
    last = step == length[traj] - 1
    success = torch.rand(len(lengths), generator=g) < 0.5
    reward = torch.full((traj.numel(),), -0.1) + 10.0 * (last & success[traj])
    n = traj.numel()
    # Rows in no particular order: the estimator must not rely on collector order.
    shuffle = torch.randperm(n, generator=g)
    return TensorDict(
        {
            "group_id": group,
            "traj_id": traj,
            "step": step,
            "state_hash": state_hash,
            ("next", "reward"): reward.reshape(n, 1),
            ("next", "done"): last.reshape(n, 1),
        },
        batch_size=[n],
    )[shuffle]


def loop_advantage(td: TensorDict, eps: float = 1e-6) -> list[float]:
    """GIGPO written the obvious way: dictionaries and a Python loop over rows."""
    group = td["group_id"].tolist()
    traj = td["traj_id"].tolist()
    step = td["step"].tolist()
    state = td["state_hash"].tolist()
    reward = td["next", "reward"].reshape(-1).tolist()
    rows_of = defaultdict(list)
    for i, t in enumerate(traj):
        rows_of[t].append(i)
    step_return = [0.0] * len(traj)
    traj_return = {}
    for t, rows in rows_of.items():
        rows.sort(key=step.__getitem__)
        running = 0.0
        for i in reversed(rows):
            running = reward[i] + GAMMA * running
            step_return[i] = running
        traj_return[t] = sum(reward[i] for i in rows)

    def stats(values):
        """(mean, scale) of a group, or None where the group gives 0 (single or constant)."""
        if len(values) < 2 or len(set(values)) == 1:
            return None
        return statistics.fmean(values), max(statistics.stdev(values), eps)

    def relative(value, group_stats):
        return 0.0 if group_stats is None else (value - group_stats[0]) / group_stats[1]

    returns_of = defaultdict(list)
    for t, rows in rows_of.items():
        returns_of[group[rows[0]]].append(traj_return[t])
    anchors = defaultdict(list)
    for i in range(len(traj)):
        anchors[(group[i], state[i])].append(step_return[i])
    episode_stats = {g: stats(values) for g, values in returns_of.items()}
    anchor_stats = {key: stats(values) for key, values in anchors.items()}
    return [
        relative(traj_return[traj[i]], episode_stats[group[i]])
        + relative(step_return[i], anchor_stats[(group[i], state[i])])
        for i in range(len(traj))
    ]


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_memory_child(num_rows: int) -> None:
    """Print the peak resident memory (MiB) that one advantage call adds."""
    td = make_rows(num_rows)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets the peak (VmHWM) to the current resident size
    before = _status_kib("VmRSS")
    GIGPOAdvantage(gamma=GAMMA)(td)
    print((_status_kib("VmHWM") - before) / 1024)


def extra_peak_mib(num_rows: int) -> str:
    """Peak memory of one call, measured in a fresh process (Linux only, else "n/a").

    glibc's malloc then returns every large freed array to the system at once, so the
    resident-size peak is the memory the call really held.
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    result = subprocess.run(
        [sys.executable, __file__, "--peak-memory-child", str(num_rows)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if result.returncode != 0:
        return "n/a"
    return f"{float(result.stdout.strip().splitlines()[-1]):.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[6_400, 100_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=5, help="best of N timings")
    parser.add_argument("--peak-memory-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_memory_child:
        peak_memory_child(args.peak_memory_child)
        return

    print(
        f"GIGPO advantage, gamma={GAMMA}, {GROUP_SIZE} trajectories per group, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads"
    )
    header = f"{'rows':>10} {'loop s':>9} {'ours s':>9} {'speed-up':>9} {'peak MiB':>9}  same?"
    print(header)
    print("-" * len(header))
    estimator = GIGPOAdvantage(gamma=GAMMA)
    for num_rows in args.rows:
        td = make_rows(num_rows)
        ours = best_time(lambda td=td: estimator(td.clone()), args.repeats)
        start = time.perf_counter()
        expected = torch.tensor(loop_advantage(td))
        loop = time.perf_counter() - start
        got = estimator(td.clone())["advantage"].reshape(-1)
        same = torch.allclose(got, expected, rtol=1e-4, atol=1e-4)
        print(
            f"{td.shape[0]:>10} {loop:>9.3f} {ours:>9.4f} {loop / ours:>8.0f}x "
            f"{extra_peak_mib(num_rows):>9}  {'yes' if same else 'NO'}"
        )


if __name__ == "__main__":
    main()
