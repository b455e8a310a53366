"""GIGPO against GRPO and RLOO on equal budgets: success rate against environment steps.

Every setting trains the same policy on the same environment with the same seeds, the same
task sequence (episode groups), the same N and the same env-step budget; only the
advantage estimator differs:

    grpo         GRPO: A = A_E, (R - mean) / std over the group's N returns
    rloo         RLOO: A = R - mean of the other N-1 returns
    gigpo        GIGPO, norm std, omega 1   (the paper's setting)
    gigpo-none   GIGPO, norm none, omega 1
    gigpo-w0.5   GIGPO, norm std, omega 0.5

Path ``small`` (the default): a torchrl ``ProbabilisticActor`` over an MLP on an
egocentric one-hot grid (``gigpo_torchrl.small_policy``), trained with critic-free
``ClipPPOLoss`` on Sokoban 6x6 (1 box) and FrozenLake 8x8 (random maps, 40 steps).

Path ``llm``: the main job (``gigpo-train``'s defaults: SmolLM2-135M and its task) trained
once per (setting, seed), GRPO against GIGPO by default, with the held-out validation
success before and after training as the measure (columns ``val_success_rate``, filled on
iterations followed by a validation, and ``val_success_before``). Each run takes as long as
the main job. Every path is an entry of ``PATHS``: a function that trains one
(env, setting, seed) and returns its per-iteration records; the CSV, summary and figure
code below is shared.

Outputs (under ``--out-dir``, default ``benchmarks/results``):

- ``compare_<path>.csv``: one row per (setting, seed, iteration) with the columns ``env,
  estimator, norm, step_advantage_weight, seed, iteration, env_steps, success_rate,
  mean_return, singleton_fraction``, then ``setting, advantage_time_share, iteration_s,
  episode_length, entropy, clip_fraction``;
- ``compare_<path>_summary.csv``: one row per (env, setting);
- ``compare_<path>.png``: success rate against env steps, mean and standard error over seeds.

    python benchmarks/compare_estimators.py                 # the full comparison (~30 min)
    python benchmarks/compare_estimators.py --tiny          # seconds: a smoke test
    python benchmarks/compare_estimators.py --envs frozenlake --seeds 3 --workers 2
    python benchmarks/compare_estimators.py --path llm --seeds 3   # main job, GRPO vs GIGPO
"""

from __future__ import annotations

import argparse
import csv
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"

COLUMNS = [
    "env",
    "estimator",
    "norm",
    "step_advantage_weight",
    "seed",
    "iteration",
    "env_steps",
    "success_rate",
    "mean_return",
    "singleton_fraction",
]
EXTRA_COLUMNS = [
    "setting",
    "advantage_time_share",
    "iteration_s",
    "episode_length",
    "entropy",
    "clip_fraction",
]


@dataclass(frozen=True)
class Setting:
    """One advantage estimator configuration (``step_advantage_weight`` 0: no step term;
    ``anchor``: ``GIGPOAdvantage``'s anchor mode, which compare_textworld varies)."""

    name: str
    estimator: str
    norm: str
    step_advantage_weight: float
    anchor: str = "state"


SETTINGS = [
    Setting("grpo", "grpo", "std", 0.0),
    Setting("rloo", "rloo", "none", 0.0),
    Setting("gigpo", "gigpo", "std", 1.0),
    Setting("gigpo-none", "gigpo", "none", 1.0),
    Setting("gigpo-w0.5", "gigpo", "std", 0.5),
]


@dataclass(frozen=True)
class EnvSetup:
    """An environment of the comparison and its budget.

    Attributes:
        label: the ``env`` column.
        env, env_kwargs, max_steps: what ``make_env`` / ``GroupRollout`` take.
        env_steps: the budget of every run.
        target: the success rate whose first crossing is reported (the mean of the last
            ``window`` iterations must reach it).
    """

    label: str
    env: str
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    max_steps: int | None = None
    env_steps: int = 200_000
    target: float = 0.5


ENVS = {
    # registered defaults: 30 steps; rooms start from the hardest state reverse play found
    "sokoban": EnvSetup("sokoban-6x6-1box", "sokoban", {}, None, 200_000, 0.3),
    # 8x8 needs at least 14 moves: with the registered 20 steps no setting ever succeeded
    "frozenlake": EnvSetup("frozenlake-8x8", "frozenlake", {"size": 8}, 40, 200_000, 0.5),
}
TINY_ENVS = {"frozenlake": EnvSetup("frozenlake-4x4", "frozenlake", {"size": 4}, None, 600)}
# the llm path trains gigpo-train's defaults (the README's main job); the label names it
LLM_ENVS = {"main-job": EnvSetup("main-job", "main-job", target=0.5)}
LLM_SETTINGS = ("grpo", "gigpo")
LLM_TINY = dict(model="tiny", env="frozenlake", iterations=2, num_groups=2, num_generations=2)
LLM_COLUMNS = ["val_success_rate", "val_success_before"]


def run_small(setup: EnvSetup, setting: Setting, seed: int, options: dict) -> list[dict]:
    """Train the small policy once; returns one record per iteration."""
    import torch

    from gigpo_torchrl.small_policy import SmallPolicyConfig, train

    torch.set_num_threads(1)
    config = SmallPolicyConfig(
        env=setup.env,
        env_kwargs=dict(setup.env_kwargs),
        max_steps=setup.max_steps,
        estimator=setting.estimator,
        norm=setting.norm,
        step_advantage_weight=setting.step_advantage_weight,
        seed=seed,
        env_steps=setup.env_steps,
        **options,
    )
    records = []
    for record in train(config):
        record.update(
            env=setup.label,
            setting=setting.name,
            step_advantage_weight=setting.step_advantage_weight,
        )
        records.append({k: record[k] for k in COLUMNS + EXTRA_COLUMNS})
    return records


def run_llm(setup: EnvSetup, setting: Setting, seed: int, options: dict) -> list[dict]:
    """Train the main job's LLM agent once (``gigpo-train``'s defaults: the README's main
    job) with this setting and seed; one record per iteration, with the held-out validation
    success of the validation that follows it where there is one."""
    import tempfile

    from gigpo_torchrl.train import TrainConfig, Trainer

    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(
            advantage_estimator=setting.estimator,
            norm_adv=setting.norm,
            gigpo_step_advantage_weight=setting.step_advantage_weight,
            seed=seed,
            output_dir=out,
            run_name="run",
            save_every=10**6,
            **options,
        )
        history = Trainer(config).train()
    validation = {r["iteration"]: r["val_success_rate"] for r in history if "val_success_rate" in r}
    records = []
    for record in (r for r in history if "loss" in r):
        iteration_s = record["time_rollout"] + record["time_advantage"] + record["time_update"]
        records.append(
            {
                "env": setup.label,
                "estimator": setting.estimator,
                "norm": setting.norm,
                "step_advantage_weight": setting.step_advantage_weight,
                "seed": seed,
                "iteration": record["iteration"],
                "env_steps": record["env_steps"],
                "success_rate": record["success_rate"],
                "mean_return": record["mean_return"],
                "singleton_fraction": record["singleton_fraction"],
                "setting": setting.name,
                "advantage_time_share": record["time_advantage"] / iteration_s,
                "iteration_s": iteration_s,
                "episode_length": record["mean_episode_length"],
                "entropy": record["entropy"],
                "clip_fraction": record["clip_fraction"],
                "val_success_rate": validation.get(record["iteration"], ""),
                "val_success_before": validation.get(0, ""),
            }
        )
    return records


# path name -> (env setup, setting, seed, path options) -> per-iteration records
PATHS: dict[str, Callable[[EnvSetup, Setting, int, dict], list[dict]]] = {
    "small": run_small,
    "llm": run_llm,
}


def _run(job: tuple) -> tuple[list[dict], float]:
    path, setup, setting, seed, options = job
    start = time.perf_counter()
    records = PATHS[path](setup, setting, seed, options)
    return records, time.perf_counter() - start


def run_all(jobs: Sequence[tuple], workers: int, log: Callable[[str], None]) -> list[dict]:
    """Run the jobs (in ``workers`` processes when > 1); returns all records."""
    rows: list[dict] = []
    if workers > 1:
        context = multiprocessing.get_context("spawn")
        with context.Pool(workers) as pool:
            results = pool.imap(_run, jobs)
            for job, (records, seconds) in zip(jobs, results, strict=True):
                rows += records
                log(_describe(job, records, seconds))
    else:
        for job in jobs:
            records, seconds = _run(job)
            rows += records
            log(_describe(job, records, seconds))
    return rows


def _describe(job: tuple, records: list[dict], seconds: float) -> str:
    _, setup, setting, seed, _ = job
    last = records[-1]
    validation = ""
    if last.get("val_success_rate", "") != "":  # the llm path: held-out validation
        validation = (
            f", validation {last['val_success_before']:.2f} -> {last['val_success_rate']:.2f}"
        )
    return (
        f"{setup.label:>18} {setting.name:>10} seed {seed}: {len(records)} iterations, "
        f"{last['env_steps']} env steps, last success {last['success_rate']:.2f}{validation} "
        f"({seconds:.0f} s)"
    )


def smoothed(success: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean of the last ``window`` iterations (fewer at the start)."""
    cumulative = np.concatenate([[0.0], np.cumsum(success)])
    index = np.arange(1, len(success) + 1)
    low = np.maximum(index - window, 0)
    return (cumulative[index] - cumulative[low]) / (index - low)


def curves(rows: list[dict], grid: np.ndarray) -> dict[tuple[str, str], np.ndarray]:
    """Per (env, setting): success ``[seeds, len(grid)]``, each seed's mean success over the
    iterations whose env steps fall in each bin ``(grid[k-1], grid[k]]``."""
    out: dict[tuple[str, str], list[np.ndarray]] = {}
    for key, seed_rows in _by_run(rows).items():
        steps = np.array([r["env_steps"] for r in seed_rows], dtype=float)
        success = np.array([r["success_rate"] for r in seed_rows], dtype=float)
        which = np.clip(np.searchsorted(grid, steps, side="left"), 0, len(grid) - 1)
        sums = np.bincount(which, weights=success, minlength=len(grid))
        counts = np.bincount(which, minlength=len(grid))
        with np.errstate(invalid="ignore"):
            binned = sums / counts
        # empty bins (batches larger than a bin) take the previous bin's value
        for k in range(1, len(binned)):
            if counts[k] == 0:
                binned[k] = binned[k - 1]
        out.setdefault(key[:2], []).append(binned)
    return {key: np.stack(value) for key, value in out.items()}


def _by_run(rows: list[dict]) -> dict[tuple[str, str, int], list[dict]]:
    runs: dict[tuple[str, str, int], list[dict]] = {}
    for row in rows:
        runs.setdefault((row["env"], row["setting"], int(row["seed"])), []).append(row)
    for seed_rows in runs.values():
        seed_rows.sort(key=lambda r: int(r["iteration"]))
    return runs


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error (0 for one value)."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return float(values.mean()), 0.0
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values)))


def summarize(rows: list[dict], targets: dict[str, float], window: int = 5) -> list[dict]:
    """One row per (env, setting): final success, env steps to the target, singleton fraction,
    the estimator's share of iteration time."""
    per_setting: dict[tuple[str, str], list[dict]] = {}
    for (env, name, seed), seed_rows in _by_run(rows).items():
        steps = np.array([r["env_steps"] for r in seed_rows], dtype=float)
        success = np.array([r["success_rate"] for r in seed_rows], dtype=float)
        budget = steps[-1]
        final = success[steps > 0.9 * budget] if (steps > 0.9 * budget).sum() else success[-1:]
        reached = np.flatnonzero(smoothed(success, window) >= targets[env])
        per_setting.setdefault((env, name), []).append(
            {
                "final": float(final.mean()),
                "auc": float(success.mean()),
                "to_target": float(steps[reached[0]]) if len(reached) else math.nan,
                "singleton": float(np.mean([r["singleton_fraction"] for r in seed_rows])),
                "overhead": float(np.mean([r["advantage_time_share"] for r in seed_rows])),
                "iteration_s": float(np.mean([r["iteration_s"] for r in seed_rows])),
                "row": seed_rows[0],
                "seed": seed,
            }
        )
    summary = []
    for (env, name), runs in per_setting.items():
        first = runs[0]["row"]
        to_target = [r["to_target"] for r in runs if not math.isnan(r["to_target"])]
        final, final_se = mean_se([r["final"] for r in runs])
        auc, auc_se = mean_se([r["auc"] for r in runs])
        steps, steps_se = mean_se(to_target) if to_target else (math.nan, math.nan)
        # paired by seed (same tasks, same initial policy): this setting minus GRPO
        grpo = {r["seed"]: r["auc"] for r in per_setting.get((env, "grpo"), [])}
        paired = [r["auc"] - grpo[r["seed"]] for r in runs if r["seed"] in grpo]
        delta, delta_se = mean_se(paired) if paired else (math.nan, math.nan)
        summary.append(
            {
                "env": env,
                "setting": name,
                "estimator": first["estimator"],
                "norm": first["norm"],
                "step_advantage_weight": first["step_advantage_weight"],
                "seeds": len(runs),
                "final_success": final,
                "final_success_se": final_se,
                "mean_success": auc,
                "mean_success_se": auc_se,
                "mean_success_vs_grpo": delta,
                "mean_success_vs_grpo_se": delta_se,
                "mean_success_vs_grpo_wins": sum(d > 0 for d in paired),
                "target": targets[env],
                "reached_target": len(to_target),
                "env_steps_to_target": steps,
                "env_steps_to_target_se": steps_se,
                "singleton_fraction": float(np.mean([r["singleton"] for r in runs])),
                "advantage_time_share": float(np.mean([r["overhead"] for r in runs])),
                "iteration_s": float(np.mean([r["iteration_s"] for r in runs])),
            }
        )
    return summary


def format_summary(summary: list[dict]) -> str:
    """The summary as a Markdown table (what the README shows)."""
    lines = [
        "| env | setting | final success | mean success | vs grpo, paired (seeds better) "
        "| env steps to target (seeds) | singleton fraction | advantage time share |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summary:
        to_target = "—"
        if s["reached_target"]:
            steps, se = s["env_steps_to_target"] / 1e3, s["env_steps_to_target_se"] / 1e3
            to_target = f"{steps:.0f}k ± {se:.0f}k"
        final, final_se = s["final_success"], s["final_success_se"]
        versus = "—"
        if s["setting"] != "grpo" and not math.isnan(s["mean_success_vs_grpo"]):
            delta, delta_se = s["mean_success_vs_grpo"], s["mean_success_vs_grpo_se"]
            versus = (
                f"{delta:+.2f} ± {delta_se:.2f} ({s['mean_success_vs_grpo_wins']}/{s['seeds']})"
            )
        lines.append(
            f"| {s['env']} | {s['setting']} | {final:.2f} ± {final_se:.2f} "
            f"| {s['mean_success']:.2f} ± {s['mean_success_se']:.2f} | {versus} "
            f"| {to_target} ({s['reached_target']}/{s['seeds']} ≥ {s['target']:.2f}) "
            f"| {s['singleton_fraction']:.3f} | {100 * s['advantage_time_share']:.1f} % |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], summary: list[dict], path: Path, bins: int = 40) -> None:
    """Success rate against env steps, one panel per env, mean ± standard error over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    envs = list(dict.fromkeys(r["env"] for r in rows))
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    fig, axes = plt.subplots(1, len(envs), figsize=(6 * len(envs), 4.2), squeeze=False)
    for ax, env in zip(axes[0], envs, strict=True):
        budget = max(r["env_steps"] for r in rows if r["env"] == env)
        grid = np.linspace(budget / bins, budget, bins)
        by_setting = curves([r for r in rows if r["env"] == env], grid)
        for name in settings:
            if (env, name) not in by_setting:
                continue
            values = by_setting[(env, name)]
            mean = values.mean(axis=0)
            se = values.std(axis=0, ddof=1) / math.sqrt(len(values)) if len(values) > 1 else 0
            info = next(s for s in summary if s["env"] == env and s["setting"] == name)
            style = "-" if name.startswith("gigpo") else "--"
            label = f"{name} (singletons {info['singleton_fraction']:.2f})"
            ax.plot(grid, mean, style, label=label)
            ax.fill_between(grid, mean - se, mean + se, alpha=0.2)
        seeds = max(s["seeds"] for s in summary if s["env"] == env)
        ax.set_title(f"{env} ({seeds} seeds, mean ± s.e.)")
        ax.set_xlabel("environment steps")
        ax.set_ylabel("training success rate")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", choices=sorted(PATHS), default="small")
    parser.add_argument("--envs", nargs="+", choices=sorted(ENVS), default=list(ENVS))
    parser.add_argument("--settings", nargs="+", choices=[s.name for s in SETTINGS], default=None)
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..S-1 per setting")
    parser.add_argument("--env-steps", type=int, default=None, help="override every budget")
    parser.add_argument("--num-groups", type=int, default=8)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1, help="runs in parallel processes")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument(
        "--tiny", action="store_true", help="FrozenLake 4x4, one seed, a few iterations"
    )
    parser.add_argument(
        "--from-csv",
        type=Path,
        default=None,
        help="summarise and plot an existing compare_<path>.csv instead of training",
    )
    args = parser.parse_args(argv)
    if args.from_csv is not None:
        rows = read_csv(args.from_csv)
        report(rows, args.from_csv.with_suffix(""), rows_written=False)
        return rows

    envs = TINY_ENVS if args.tiny else {name: ENVS[name] for name in args.envs}
    seeds = 1 if args.tiny else args.seeds
    wanted = args.settings or (LLM_SETTINGS if args.path == "llm" else None)
    settings = [s for s in SETTINGS if wanted is None or s.name in wanted]
    options = {"num_groups": args.num_groups, "num_generations": args.num_generations}
    if args.tiny:
        options.update(num_groups=2, num_generations=4)
    columns = COLUMNS + EXTRA_COLUMNS
    if args.path == "llm":
        envs, columns = LLM_ENVS, columns + LLM_COLUMNS
        options = dict(LLM_TINY) if args.tiny else {}
        # parallel runs share the cores: torch's default would oversubscribe them
        options["num_threads"] = max(1, (os.cpu_count() or 1) // args.workers)
    if args.env_steps is not None:
        envs = {k: EnvSetup(**{**vars(v), "env_steps": args.env_steps}) for k, v in envs.items()}

    jobs = [
        (args.path, setup, setting, seed, options)
        for setup in envs.values()
        for seed in range(seeds)
        for setting in settings
    ]
    print(f"{len(jobs)} runs ({args.path} path), {args.workers} worker(s)", flush=True)
    start = time.perf_counter()
    rows = run_all(jobs, args.workers, lambda line: print(line, flush=True))
    total = time.perf_counter() - start

    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"compare_{args.path}"
    write_csv(stem.with_suffix(".csv"), rows, columns)
    report(rows, stem)
    if args.path == "llm":
        print(validation_table(rows))
    print(f"Total {total / 60:.1f} min.")
    return rows


def report(rows: list[dict], stem: Path, rows_written: bool = True) -> None:
    """Write ``<stem>_summary.csv`` and ``<stem>.png`` and print the summary table."""
    setups = [*ENVS.values(), *TINY_ENVS.values(), *LLM_ENVS.values()]
    targets = {setup.label: setup.target for setup in setups}
    summary = summarize(rows, targets)
    write_csv(stem.parent / f"{stem.name}_summary.csv", summary, list(summary[0]))
    plot(rows, summary, stem.with_suffix(".png"))
    print()
    print(format_summary(summary))
    print(
        "\nfinal success: mean over the last 10 % of the budget; mean success: over all "
        "iterations (the area under the curve); vs grpo: mean success minus GRPO's on the same "
        "seed; steps to target: first iteration whose trailing 5-iteration mean reaches it "
        "(mean ± s.e. over the seeds that did). All ± are standard errors over seeds."
    )
    written = [f"{stem.name}.csv"] if rows_written else []
    written += [f"{stem.name}_summary.csv", f"{stem.name}.png"]
    print(f"wrote {', '.join(written)} in {stem.parent}")


def validation_table(rows: list[dict]) -> str:
    """Held-out validation success before training and after the last iteration, per
    setting (mean ± s.e. over seeds) — the llm path's measure of learning."""
    lines = [
        "| setting | seeds | validation before | validation after | change |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in dict.fromkeys(r["setting"] for r in rows):
        runs = [r for r in _by_run(rows).values() if r[0]["setting"] == name]
        before = [float(r[-1]["val_success_before"]) for r in runs]
        after = [float(r[-1]["val_success_rate"]) for r in runs]
        (b, b_se), (a, a_se) = mean_se(before), mean_se(after)
        change, change_se = mean_se([y - x for x, y in zip(before, after, strict=True)])
        lines.append(
            f"| {name} | {len(runs)} | {b:.2f} ± {b_se:.2f} | {a:.2f} ± {a_se:.2f} "
            f"| {change:+.2f} ± {change_se:.2f} |"
        )
    return "\n".join(lines)


def read_csv(path: Path) -> list[dict]:
    """Rows of a ``compare_<path>.csv``, numbers parsed."""
    integers = {"seed", "iteration", "env_steps"}
    text = {"env", "estimator", "norm", "setting"}
    with path.open() as handle:
        return [
            {
                k: v if k in text or v == "" else int(v) if k in integers else float(v)
                for k, v in row.items()
            }
            for row in csv.DictReader(handle)
        ]


if __name__ == "__main__":
    main()
