"""Singleton fraction of GIGPO's step groups on TextWorld games, per preset and anchor mode.

A random policy (uniform over the admissible commands) plays ``--groups`` games per preset,
``--n`` times each (an episode group per game, the env's 50-step limit), through
``TextEnv``; the step rows go through ``GIGPOAdvantage`` once per anchor mode, and the share
of rows alone in their step group (``step_group_size == 1``) is reported. Also: game
generation time (first use; cached afterwards), time per env step, the random policy's
success rate, the episode length and the number of distinct states.

    python benchmarks/textworld_anchors.py    # writes benchmarks/results/textworld_anchors.csv

Needs the textworld extra (``pip install -e '.[textworld]'``). Games are generated into a
fresh temporary folder (``--cache-dir`` to reuse one), so that generation is timed.
"""

from __future__ import annotations

import argparse
import csv
import random
import tempfile
import time
from pathlib import Path

import torch
from gigpo_envs.textworld import PRESETS, game_file
from tensordict import TensorDict

from gigpo_torchrl import GIGPOAdvantage
from gigpo_torchrl.envs import make_env
from gigpo_torchrl.functional import segment_ids

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ["state", "history:1", "history:2", "similar", "similar@0.9"]


def play(preset: str, groups: int, n: int, seed: int, cache_dir: str | None) -> dict:
    """Random-policy episodes; returns the step rows and timings."""
    rng = random.Random(seed)
    task_seeds = [seed * 1000 + g for g in range(groups)]
    start = time.perf_counter()
    for s in task_seeds:  # generate (or find) the games first, to time generation alone
        game_file(s, cache_dir=cache_dir, **PRESETS[preset])
    generation = (time.perf_counter() - start) / groups
    env = make_env("textworld", batch_size=groups * n, preset=preset, cache_dir=cache_dir)
    td = env.reset(
        TensorDict({"seed": torch.tensor(task_seeds).repeat_interleave(n)}, [groups * n])
    )
    rows: dict[str, list] = {k: [] for k in ("group", "traj", "step", "state", "obs", "action")}
    rewards, dones, success = [], [], []
    done = torch.zeros(groups * n, dtype=torch.bool)
    steps, step_time = 0, 0.0
    while not bool(done.all()):
        actions = [rng.choice(a) if a else "look" for a in td["admissible_actions"]]
        td["action_text"] = actions
        begin = time.perf_counter()
        out = env.step(td)["next"]
        step_time += time.perf_counter() - begin
        for i in torch.nonzero(~done).reshape(-1).tolist():
            rows["group"].append(i // n)
            rows["traj"].append(i)
            rows["step"].append(int(td["step"][i]))
            rows["state"].append(int(td["state_hash"][i]))
            rows["obs"].append(td["observation"][i])
            rows["action"].append(actions[i])
            rewards.append(float(out["reward"][i]))
            dones.append(bool(out["done"][i]))
            success.append(bool(out["success"][i]))
            steps += 1
        done = out["done"].reshape(-1).clone()
        td = out
    env.close()
    return {
        "rows": rows,
        "reward": rewards,
        "done": dones,
        "success": success,
        "generation_s": generation,
        "env_step_ms": 1000 * step_time / max(1, steps),
    }


def batch_of(run: dict) -> TensorDict:
    rows = run["rows"]
    td = TensorDict(
        {
            "group_id": torch.tensor(rows["group"]),
            "traj_id": torch.tensor(rows["traj"]),
            "step": torch.tensor(rows["step"]),
            "state_hash": torch.tensor(rows["state"]),
            ("next", "reward"): torch.tensor(run["reward"]).unsqueeze(-1),
            ("next", "done"): torch.tensor(run["done"]).unsqueeze(-1),
        },
        [len(rows["step"])],
    )
    td["observation"] = rows["obs"]
    td["action_text"] = rows["action"]
    return td


def distinct(rows: dict, key: str) -> int:
    """Distinct (group, value) pairs."""
    return len(set(zip(rows["group"], rows[key], strict=True)))


def anchor_stats(batch: TensorDict, mode: str) -> dict[str, float]:
    """Singleton fraction, mean step-group size per row, purity (share of rows whose step
    group holds one exact state, TextWorld's facts) and seconds of the estimator call."""
    anchor, _, threshold = mode.partition("@")
    estimator = GIGPOAdvantage(anchor=anchor, similarity_threshold=float(threshold or 0.8))
    start = time.perf_counter()
    sizes = estimator(batch.clone())["step_group_size"].reshape(-1).double()
    seconds = time.perf_counter() - start
    rows = batch["group_id"].reshape(-1)
    keys = estimator.anchor_hash(batch, estimator.read_step_rows(batch))
    group, num, _ = segment_ids(rows, keys)
    pairs = torch.unique(torch.stack([group, batch["state_hash"].reshape(-1)]), dim=1)
    states_per_group = torch.bincount(pairs[0], minlength=num)
    return {
        "singleton": float((sizes == 1).double().mean()),
        "mean_group": float(sizes.mean()),
        "purity": float((states_per_group[group] == 1).double().mean()),
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="*", default=list(PRESETS))
    parser.add_argument("--groups", type=int, default=8, help="games per preset")
    parser.add_argument("--n", type=int, default=8, help="episodes per game (group size)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="where games are generated (default: a fresh temporary folder, so that the "
        "generation time is measured; the env's own default is $GIGPO_CACHE/textworld)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "textworld_anchors.csv")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.cache_dir is None:
        args.cache_dir = tempfile.mkdtemp(prefix="textworld-games-")
    records = []
    for preset in args.presets:
        run = play(preset, args.groups, args.n, args.seed, args.cache_dir)
        batch = batch_of(run)
        lengths = torch.bincount(batch["traj_id"]).double()
        record = {
            "preset": preset,
            **PRESETS[preset],
            "groups": args.groups,
            "n": args.n,
            "rows": batch.numel(),
            "distinct_states": distinct(run["rows"], "state"),
            "distinct_observations": distinct(run["rows"], "obs"),
            "random_success": sum(run["success"]) / (args.groups * args.n),
            "mean_episode_length": float(lengths.mean()),
            "generation_s_per_game": round(run["generation_s"], 2),
            "env_step_ms": round(run["env_step_ms"], 2),
        }
        for mode in MODES:
            for name, value in anchor_stats(batch, mode).items():
                record[f"{name}_{mode}"] = round(value, 3)
        records.append(record)
        print(
            f"{preset:>8}: {record['rows']} rows, success {record['random_success']:.2f}, "
            f"gen {record['generation_s_per_game']} s/game, step {record['env_step_ms']} ms; "
            + ", ".join(
                f"{m} {record[f'singleton_{m}']:.3f} (purity {record[f'purity_{m}']:.2f})"
                for m in MODES
            ),
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    print(f"\nwrote {args.out}\n")
    print(
        "| preset | rooms / objects / quest | rows | random success | " + " | ".join(MODES) + " |"
    )
    print("|---|---|---:|---:|" + "---:|" * len(MODES))
    for r in records:
        sizes = f"{r['nb_rooms']} / {r['nb_objects']} / {r['quest_length']}"
        cells = " | ".join(f"{r[f'singleton_{m}']:.3f} ({r[f'purity_{m}']:.2f})" for m in MODES)
        print(f"| {r['preset']} | {sizes} | {r['rows']:,} | {r['random_success']:.2f} | {cells} |")


if __name__ == "__main__":
    main()
