"""Time ``Sokoban.reset`` (room generation) against gym-sokoban's reported reset time.

gym-sokoban 0.0.6 takes about 3.2 s to generate one 10x10 room with 3 boxes (its reverse play
is an exhaustive depth-first search). For each size the script prints the mean and p95 reset
time over consecutive seeds, the mean fewest moves that solve the generated rooms, and how many
times faster the mean is than gym-sokoban's 3.2 s.

    python benchmarks/bench_sokoban_reset.py
    python benchmarks/bench_sokoban_reset.py --seeds 1000
"""

from __future__ import annotations

import argparse
import statistics
import time

from gigpo_envs.sokoban import Sokoban

GYM_SOKOBAN_RESET_S = 3.2  # per 10x10 room with 3 boxes, gym-sokoban 0.0.6
SIZES = [((6, 6), 1), ((8, 8), 2), ((10, 10), 3)]


def time_resets(dim_room: tuple[int, int], num_boxes: int, seeds: int) -> tuple[list, list]:
    """Returns the reset times in seconds and the rooms' shortest solution lengths."""
    game = Sokoban(dim_room=dim_room, num_boxes=num_boxes)
    game.reset(seeds)  # warm-up, on a seed outside the timed range
    times, lengths = [], []
    for seed in range(seeds):
        start = time.perf_counter()
        game.reset(seed)
        times.append(time.perf_counter() - start)
        lengths.append(game.solution_length)
    return times, lengths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=200, help="resets timed per size")
    args = parser.parse_args()

    print(f"Sokoban.reset over seeds 0..{args.seeds - 1}")
    header = f"{'room':>8} {'boxes':>5} {'mean ms':>9} {'p95 ms':>8} {'solution':>9}"
    print(header + f" {'gym-sokoban 10x10/3':>20} {'speed-up':>10}")
    for (rows, cols), num_boxes in SIZES:
        times, lengths = time_resets((rows, cols), num_boxes, args.seeds)
        mean = statistics.mean(times)
        p95 = statistics.quantiles(times, n=20)[-1]
        print(
            f"{f'{rows}x{cols}':>8} {num_boxes:>5} {mean * 1e3:>9.2f} {p95 * 1e3:>8.2f} "
            f"{statistics.mean(lengths):>9.1f} {GYM_SOKOBAN_RESET_S * 1e3:>17.0f} ms "
            f"{GYM_SOKOBAN_RESET_S / mean:>9.0f}x"
        )
    print("solution: mean fewest moves that solve the generated rooms")
    print("speed-up: gym-sokoban's 3.2 s / our mean; like for like only on the 10x10/3 row")


if __name__ == "__main__":
    main()
