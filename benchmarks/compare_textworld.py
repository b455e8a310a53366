"""GIGPO against GRPO and RLOO on TextWorld household games, with a small policy.

``benchmarks/compare_estimators.py``'s small path encodes a grid game's state as one-hot
planes; TextWorld has no such encoding (its state is a set of logical facts over objects
whose names change from game to game), and its actions change from state to state. The
honest small analogue of an LLM agent here is a policy that **scores the admissible
commands** from features of their text, as the LLM reads the numbered list of admissible
actions:

- for each admissible command: its verb; how many of its other words occur in the task
  (the quest's objective), in the observation and in the inventory; whether it was already
  played in this episode, and whether it was the last command; each combined with the verb.
  The features are strings hashed into 4,096 buckets (no object name is a feature, so nothing
  is memorised per game);
- the score of a command is a small MLP (summed embeddings of its features, tanh, linear);
  the policy is a ``MaskedCategorical`` over the admissible commands (torchrl
  ``ProbabilisticActor``), trained by torchrl's critic-free ``ClipPPOLoss`` with the
  estimator attached through ``make_value_estimator``, as in ``gigpo_torchrl.small_policy``.

Every setting trains the same policy from the same initial weights on the same task sequence
(the games of a fixed pool of ``--pool`` games, as ALFWorld's training set is fixed) with
the same N and env-step budget; only the advantage differs. Besides the five settings of
``compare_estimators.py``, two GIGPO settings use other anchors: ``gigpo-history1``
(state and last (state, action) pair) and ``gigpo-similar`` (near-duplicate observation
texts). The states are TextWorld's exact facts (``state_hash`` as ``TextEnv`` writes it);
the games are stepped directly, not through ``TextEnv``, for speed.

    python benchmarks/compare_textworld.py        # writes benchmarks/results/compare_textworld.*
    python benchmarks/compare_textworld.py --tiny # seconds: a smoke test
    python benchmarks/compare_textworld.py --from-csv benchmarks/results/compare_textworld.csv

Needs the textworld extra (``pip install -e '.[textworld]'``).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.modules import MaskedCategorical, ProbabilisticActor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_estimators as compare  # noqa: E402  (the CSV, summary and figure code)
from gigpo_envs.textworld import PRESETS, TextWorldGame, game_file  # noqa: E402

from gigpo_torchrl import GIGPOAdvantage  # noqa: E402
from gigpo_torchrl.envs import stable_hash  # noqa: E402
from gigpo_torchrl.small_policy import make_loss, ppo_update  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BUCKETS = 4096
MAX_FEATURES = 12
MAX_COMMANDS = 64
STOP = {"a", "an", "the", "from", "on", "into", "in", "with", "to", "of", "at"}


Setting = compare.Setting
# compare_estimators' settings, and GIGPO with two other anchor modes
SETTINGS = [
    *compare.SETTINGS,
    Setting("gigpo-history1", "gigpo", "std", 1.0, "history:1"),
    Setting("gigpo-similar", "gigpo", "std", 1.0, "similar"),
]


def words(text: str) -> set[str]:
    return {w.strip(".,!?:;'\"()") for w in text.lower().split()} - STOP


def command_features(command: str, task: set[str], seen: set[str], inventory: set[str],
                     played: set[str], last: str) -> list[int]:  # fmt: skip
    """Hashed feature ids (1..BUCKETS-1; 0 pads) of one admissible command."""
    parts = command.lower().split()
    verb = parts[0]
    rest = [w for w in parts[1:] if w not in STOP]
    in_task = min(3, sum(w in task for w in rest))
    in_obs = int(bool(rest) and all(w in seen for w in rest))
    in_inv = int(any(w in inventory for w in rest))
    done = int(command in played)
    again = int(command == last)
    names = [
        "bias",
        f"v:{verb}",
        f"task:{in_task}",
        f"done:{done}",
        f"v:{verb}:task:{in_task}",
        f"v:{verb}:obs:{in_obs}",
        f"v:{verb}:inv:{in_inv}",
        f"v:{verb}:done:{done}",
        f"v:{verb}:again:{again}",
        f"task:{in_task}:done:{done}",
        f"v:{verb}:task:{in_task}:done:{done}",
    ]
    return [1 + zlib.crc32(name.encode()) % (BUCKETS - 1) for name in names]


class CommandScorer(nn.Module):
    """``[*B, A, F]`` feature ids → ``[*B, A]`` logits: summed embeddings, tanh, linear."""

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.embed = nn.Embedding(BUCKETS, hidden, padding_idx=0)
        self.head = nn.Sequential(nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.out = nn.Linear(hidden, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.out(self.head(self.embed(features).sum(-2))).squeeze(-1)


def make_actor(hidden: int = 32) -> ProbabilisticActor:
    """A ``MaskedCategorical`` over the admissible commands of each row."""
    return ProbabilisticActor(
        TensorDictModule(CommandScorer(hidden), in_keys=["observation"], out_keys=["logits"]),
        in_keys={"logits": "logits", "mask": "action_mask"},
        distribution_class=MaskedCategorical,
        return_log_prob=True,
    )


class TextWorldRollout:
    """Episode groups of TextWorld games stepped directly; flat step rows like
    ``gigpo_torchrl.small_policy.GroupRollout``'s, plus ``observation_text`` and
    ``action_text`` (for the history and similar anchors)."""

    def __init__(self, preset: str, num_generations: int, max_steps: int, cache_dir=None):
        self.preset = preset
        self.num_generations = num_generations
        self.max_steps = max_steps
        self.cache_dir = cache_dir
        self.games: list[TextWorldGame] = []

    @torch.no_grad()
    def collect(self, actor, seeds, *, group_offset: int = 0, traj_offset: int = 0) -> TensorDict:
        n = self.num_generations
        count = len(seeds) * n
        while len(self.games) < count:
            self.games.append(TextWorldGame(self.preset, cache_dir=self.cache_dir))
        games = self.games[:count]
        text = [game.reset(int(seeds[i // n])) for i, game in enumerate(games)]
        state = [stable_hash(game.state()) for game in games]
        played: list[set[str]] = [set() for _ in games]
        last = [""] * count
        rows: list[dict] = []
        active = list(range(count))
        for t in range(self.max_steps):
            features = np.zeros((len(active), MAX_COMMANDS, MAX_FEATURES), dtype=np.int64)
            mask = np.zeros((len(active), MAX_COMMANDS), dtype=bool)
            commands = []
            for j, i in enumerate(active):
                game = games[i]
                task, seen, inventory = words(game.task), words(text[i]), words(game.inventory())
                options = game.admissible_actions()[:MAX_COMMANDS]
                commands.append(options)
                for k, command in enumerate(options):
                    ids = command_features(command, task, seen, inventory, played[i], last[i])
                    features[j, k, : len(ids)] = ids
                    mask[j, k] = True
            td = TensorDict(
                {
                    "observation": torch.from_numpy(features),
                    "action_mask": torch.from_numpy(mask),
                },
                [len(active)],
            )
            with set_exploration_type(ExplorationType.RANDOM):
                td = actor(td)
            still = []
            for j, i in enumerate(active):
                command = commands[j][int(td["action"][j])]
                result = games[i].step(command)
                truncated = not result.terminated and t + 1 >= self.max_steps
                rows.append(
                    {
                        "env": i,
                        "step": t,
                        "observation": td["observation"][j],
                        "action_mask": td["action_mask"][j],
                        "action": td["action"][j],
                        "action_log_prob": td["action_log_prob"][j],
                        "state_hash": state[i],
                        "observation_text": text[i],
                        "action_text": command,
                        "reward": result.reward,
                        "terminated": result.terminated,
                        "truncated": truncated,
                        "success": result.success and result.terminated,
                    }
                )
                played[i].add(command)
                last[i] = command
                text[i] = result.observation
                state[i] = stable_hash(games[i].state())
                if not (result.terminated or truncated):
                    still.append(i)
            active = still
            if not active:
                break
        rows.sort(key=lambda r: (r["env"], r["step"]))
        count_rows = len(rows)
        env_index = torch.tensor([r["env"] for r in rows])

        def column(name, dtype=None):
            return torch.tensor([r[name] for r in rows], dtype=dtype).reshape(count_rows, 1)

        batch = TensorDict(
            {
                "observation": torch.stack([r["observation"] for r in rows]),
                "action_mask": torch.stack([r["action_mask"] for r in rows]),
                "action": torch.stack([r["action"] for r in rows]),
                "action_log_prob": torch.stack([r["action_log_prob"] for r in rows]),
                "group_id": env_index // n + group_offset,
                "traj_id": env_index + traj_offset,
                "step": torch.tensor([r["step"] for r in rows]),
                "state_hash": torch.tensor([r["state_hash"] for r in rows]),
                "success": column("success", torch.bool),
                "next": {
                    "reward": column("reward", torch.float32),
                    "done": column("terminated", torch.bool) | column("truncated", torch.bool),
                    "terminated": column("terminated", torch.bool),
                    "truncated": column("truncated", torch.bool),
                },
            },
            [count_rows],
        )
        batch["observation_text"] = [r["observation_text"] for r in rows]
        batch["action_text"] = [r["action_text"] for r in rows]
        return batch

    def close(self) -> None:
        for game in self.games:
            game.close()


def train_one(setting: Setting, seed: int, options: dict) -> list[dict]:
    """One run; one record per iteration (the columns of ``compare_estimators``)."""
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    groups, n, pool = options["num_groups"], options["num_generations"], options["pool"]
    rollout = TextWorldRollout(options["preset"], n, options["max_steps"], options["cache_dir"])
    actor = make_actor()
    estimator = GIGPOAdvantage(
        setting.estimator,
        gamma=0.95,
        step_advantage_weight=setting.step_advantage_weight,
        norm=setting.norm,
        anchor=setting.anchor,
    )
    estimator.set_keys(observation="observation_text")
    loss = make_loss(actor, estimator)
    optimizer = torch.optim.Adam(loss.parameters(), lr=1e-3)
    records, env_steps, iteration, trajectories = [], 0, 0, 0
    try:
        while env_steps < options["env_steps"]:
            start = time.perf_counter()
            base = seed * 10**6 + iteration * groups
            seeds = [(base + g) % pool for g in range(groups)]
            batch = rollout.collect(
                actor, seeds, group_offset=iteration * groups, traj_offset=trajectories
            )
            collected = time.perf_counter()
            batch = loss.value_estimator(batch)
            advantage_s = time.perf_counter() - collected
            sizes = batch["step_group_size"].reshape(-1)
            batch = batch.exclude("observation_text", "action_text")
            stats = ppo_update(loss, optimizer, batch, generator=generator)
            iteration_s = time.perf_counter() - start
            done = batch["next", "done"].reshape(-1)
            returns = torch.zeros(int(done.sum())).index_add(
                0, batch["traj_id"] - trajectories, batch["next", "reward"].reshape(-1)
            )
            trajectories += groups * n
            env_steps += batch.shape[0]
            records.append(
                {
                    "env": f"textworld-{options['preset']}",
                    "estimator": setting.estimator,
                    "norm": setting.norm,
                    "step_advantage_weight": setting.step_advantage_weight,
                    "seed": seed,
                    "iteration": iteration,
                    "env_steps": env_steps,
                    "success_rate": float(batch["success"].sum()) / len(returns),
                    "mean_return": float(returns.mean()),
                    "singleton_fraction": float((sizes == 1).double().mean()),
                    "setting": setting.name,
                    "anchor": setting.anchor,
                    "advantage_time_share": advantage_s / iteration_s,
                    "iteration_s": iteration_s,
                    "episode_length": batch.shape[0] / len(returns),
                    "entropy": stats["entropy"],
                    "clip_fraction": stats["clip_fraction"],
                }
            )
            iteration += 1
    finally:
        rollout.close()
    return records


def read_csv(path: Path) -> list[dict]:
    """Rows of a ``compare_textworld.csv``, numbers parsed."""
    integers = {"seed", "iteration", "env_steps"}
    text = {"env", "estimator", "norm", "setting", "anchor"}
    with path.open() as handle:
        return [
            {k: v if k in text else int(v) if k in integers else float(v) for k, v in row.items()}
            for row in csv.DictReader(handle)
        ]


def report(rows: list[dict], stem: Path, target: float) -> None:
    summary = compare.summarize(rows, {rows[0]["env"]: target})
    compare.write_csv(stem.parent / f"{stem.name}_summary.csv", summary, list(summary[0]))
    compare.plot(rows, summary, stem.with_suffix(".png"))
    print()
    print(compare.format_summary(summary))
    print(f"wrote {stem.name}.csv, {stem.name}_summary.csv, {stem.name}.png in {stem.parent}")


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="medium")
    parser.add_argument("--settings", nargs="+", choices=[s.name for s in SETTINGS])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--env-steps", type=int, default=25_000)
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--num-groups", type=int, default=4)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--pool", type=int, default=64, help="games in the training pool")
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--tiny", action="store_true", help="trivial games, a few iterations")
    parser.add_argument("--from-csv", type=Path, default=None)
    args = parser.parse_args(argv)
    stem = args.out_dir / "compare_textworld"
    if args.from_csv is not None:
        rows = read_csv(args.from_csv)
        report(rows, args.from_csv.with_suffix(""), args.target)
        return rows
    if args.tiny:
        args.preset, args.seeds, args.env_steps, args.pool = "trivial", 1, 200, 4
        args.num_groups, args.num_generations, args.max_steps = 2, 4, 10
    options = {
        "preset": args.preset,
        "num_groups": args.num_groups,
        "num_generations": args.num_generations,
        "pool": args.pool,
        "max_steps": args.max_steps,
        "env_steps": args.env_steps,
        "cache_dir": args.cache_dir,
    }
    start = time.perf_counter()
    for index in range(args.pool):  # the pool, generated (or found in the cache) once
        game_file(index, cache_dir=args.cache_dir, **PRESETS[args.preset])
    print(f"{args.pool} {args.preset} games ready in {time.perf_counter() - start:.0f} s")
    settings = [s for s in SETTINGS if args.settings is None or s.name in args.settings]
    rows: list[dict] = []
    for seed in range(args.seeds):
        for setting in settings:
            began = time.perf_counter()
            records = train_one(setting, seed, options)
            rows += records
            last = records[-1]
            print(
                f"{setting.name:>15} seed {seed}: {len(records)} iterations, "
                f"{last['env_steps']} env steps, last success {last['success_rate']:.2f} "
                f"({time.perf_counter() - began:.0f} s)",
                flush=True,
            )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    columns = [*compare.COLUMNS, *compare.EXTRA_COLUMNS[:1], "anchor", *compare.EXTRA_COLUMNS[1:]]
    compare.write_csv(stem.with_suffix(".csv"), rows, columns)
    report(rows, stem, args.target)
    print(f"Total {(time.perf_counter() - start) / 60:.1f} min.")
    return rows


if __name__ == "__main__":
    main()
