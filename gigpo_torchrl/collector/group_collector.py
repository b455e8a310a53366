"""``GroupCollector``: B tasks × N generations of multi-step episodes, as flat step rows."""

from __future__ import annotations

import contextlib
import functools
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from tensordict import NonTensorStack, TensorDict, TensorDictBase, lazy_stack
from tqdm.auto import tqdm

from gigpo_torchrl.envs import TextEnv, make_env
from gigpo_torchrl.envs.seeding import check_seed
from gigpo_torchrl.functional import anchor_groups, dense_ids
from gigpo_torchrl.policy.actor import policy_inputs
from gigpo_torchrl.policy.parsing import parse_action
from gigpo_torchrl.policy.prompts import PromptBuilder

#: at most this many reset seeds are tried to find distinct held-out tasks
PROBE_RESETS = 256
#: a training draw that keeps meeting held-out tasks gives up after this many rounds
MAX_REDRAW_ROUNDS = 1000


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    return value


class GroupCollector:
    """Collects batches of episode groups with an LLM policy.

    Each batch runs ``num_groups`` tasks × ``num_generations`` trajectories: the N
    environments of a group are reset with the same seed (so they share their initial
    state), and the groups get distinct seeds from a seeded task sampler. At every step the
    *active* environments only are sent to the policy, in one batched call: finished ones
    cost no generation. A batch ends when every environment is done (the env's step limit
    truncates the rest).

    Iterating yields one TensorDict of flat step rows per batch, lazily stacked (token
    tensors are ragged), with the keys of ``docs/semantics.md``: ``group_id``, ``traj_id``,
    ``step``, ``state_hash`` (before the action), ``observation``, ``action_text`` (the
    parsed action; the whole reply for games with ``raw_action``, such as ms-swift envs),
    ``action_valid`` and ``success`` ``[1]``,
    ``("next", "reward" | "done" | "terminated" | "truncated")`` ``[1]``,
    ``("next", "env_reward")`` ``[1]`` (the reward without the invalid-action
    penalty, for ``GIGPOAdvantage(compat="verl-agent")``), plus the policy's
    ``("tokens", "prompt" | "response" | "full")``, ``("log_probs", "full")``,
    ``("text", "prompt" | "response")``. The batch feeds
    :class:`~gigpo_torchrl.GIGPOAdvantage` and torchrl's ``GRPOLoss`` as it is.

    Args:
        env: a registered env name, or ``(batch_size) -> TextEnv``.
        policy: a module mapping ``("text", "prompt")`` rows to replies, such as
            :class:`~gigpo_torchrl.policy.LLMPolicy`.

    Keyword Args:
        num_groups: tasks per batch (B).
        num_generations: trajectories per task (N), the GIGPO group size.
        max_steps: episode step limit (default: the env's own).
        seed: seeds the task sampler.
        total_batches: stop after this many batches (None: iterate forever).
        replay_buffer: a torchrl replay buffer each batch is also written to (attach a
            :class:`~gigpo_torchrl.GIGPOTransform` to it to get advantages there).
        prompt_builder: builds each step's prompt (default :class:`PromptBuilder`).
        parse: ``(reply, admissible) -> action`` (default :func:`parse_action`).
        progress: show a tqdm bar over batches.
        env_kwargs: passed to ``make_env`` when ``env`` is a name.
        held_out: make this a validation collector over a fixed set of held-out tasks
            (see below).
        exclude_tasks: initial ``state_hash`` values of tasks this collector must never
            draw (a validation collector's :attr:`held_out_tasks`); see
            :meth:`exclude_tasks`.
        on_step: ``on_step(rows, active)``, called after every batched env step of
            :meth:`collect` with the step rows collected so far in the batch and the number
            of environments that just acted (a progress display; also settable later as the
            ``on_step`` attribute).
        num_env_workers: 0 (default) steps the games in this process; N >= 1 splits the
            batch over N Ray actors that step their shares in parallel
            (:class:`~gigpo_torchrl.collector.ray_workers.ShardedTextEnv`); the rows are
            the same as with 0, for the same seeds. Needs ``pip install
            'gigpo-torchrl[ray]'``.
        num_policy_replicas: 0 (default) generates with ``policy`` in this process; R >= 1
            generates with R Ray actors holding copies of ``policy`` (transformers), each
            serving a *lane* of whole groups (and of the env workers, of which it then
            needs a multiple). Lanes run concurrently: one lane's games step while another
            lane's replies are generated. :meth:`update_policy_weights_` pushes the
            weights after each update. Greedy decoding gives the single-process rows; when
            sampling, each replica's RNG is seeded (``seed`` + lane), so the rows are
            reproducible but not those of the single-process collector.
        ray_address: the Ray cluster to join (``"auto"``, ``"ray://host:10001"``, ...);
            None starts a local Ray instance when workers are asked for and Ray is not
            initialised yet.
        env_worker_options, replica_options: ``ray.remote`` actor options, e.g.
            ``replica_options={"num_gpus": 1}`` (a replica given a GPU generates on it).
        replica_dtype: ``"bfloat16"`` makes replicas generate under bfloat16 autocast.

    Held-out tasks. A task is what an episode starts from: its initial state, identified
    by the ``state_hash`` after reset (two seeds that give the same start are the same
    task). A ``held_out=True`` collector picks its tasks once, when it is made: it resets
    its env with seeds from its sampler (at most ``PROBE_RESETS``), keeps the first
    ``num_groups`` distinct initial states, never more than half of the distinct ones it
    saw, and plays exactly those at every :meth:`collect`. Their hashes are
    :attr:`held_out_tasks`; give them to the training collector
    (``exclude_tasks=val.held_out_tasks``), which then redraws any group whose initial
    state is one of them, so training never plays a validation task. When the env shows
    too few distinct initial states to hold any out (cliffwalking has one for every seed,
    tic-tac-toe an empty board) it warns, :attr:`tasks_held_out` is False, validation
    plays tasks that training plays too, and ``stats["tasks_held_out"]`` says so; with a
    few but fewer than ``2 * num_groups``, it warns that validation groups repeat tasks.

    Stats (:attr:`stats`, per batch): ``success_rate``, ``mean_return``,
    ``mean_episode_length``, ``invalid_action_rate``, ``env_errors`` (episodes a game
    ended by failing: see :class:`~gigpo_torchrl.envs.TextEnv`), ``tasks_held_out``,
    ``tasks_redrawn`` (training groups redrawn because they met a held-out task),
    anchor-group sizes and generation counts.
    """

    def __init__(
        self,
        env: str | Callable[[int], TextEnv],
        policy: Callable[[TensorDictBase], TensorDictBase],
        *,
        num_groups: int,
        num_generations: int,
        max_steps: int | None = None,
        seed: int = 0,
        total_batches: int | None = None,
        replay_buffer=None,
        prompt_builder: PromptBuilder | None = None,
        parse: Callable[[str, tuple[str, ...]], str] = parse_action,
        progress: bool = False,
        env_kwargs: dict | None = None,
        held_out: bool = False,
        exclude_tasks: Iterable[int] = (),
        on_step: Callable[[int, int], None] | None = None,
        num_env_workers: int = 0,
        num_policy_replicas: int = 0,
        ray_address: str | None = None,
        env_worker_options: dict | None = None,
        replica_options: dict | None = None,
        replica_dtype: str = "float32",
    ):
        self.num_groups = _positive("num_groups", num_groups)
        self.num_generations = _positive("num_generations", num_generations)
        if total_batches is not None:
            _positive("total_batches", total_batches)
        batch = self.num_groups * self.num_generations
        for name, value in (
            ("num_env_workers", num_env_workers),
            ("num_policy_replicas", num_policy_replicas),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r} must be an integer >= 0")
        #: generation replicas (Ray actors), one per lane; None: ``policy`` generates here
        self.replicas = None
        #: ``(first shard, last shard)`` of each lane when replicas generate
        self._lanes: list[tuple[int, int]] = []
        if not isinstance(env, str) and not callable(env):
            raise ValueError(f"env must be a registered name or a factory, got {env!r}")
        if num_env_workers or num_policy_replicas:
            from gigpo_torchrl.collector import ray_workers

            ray_workers.init_ray(ray_address)
            factory = (
                functools.partial(make_env, env, max_steps=max_steps, **(env_kwargs or {}))
                if isinstance(env, str)
                else env
            )
            sizes = self._shard_sizes(num_env_workers, num_policy_replicas)
            self.env = ray_workers.ShardedTextEnv(
                factory, sizes, ray=num_env_workers > 0, actor_options=env_worker_options
            )
            if num_policy_replicas:
                self.replicas = ray_workers.PolicyReplicas(
                    policy,
                    num_policy_replicas,
                    seed=check_seed(seed),
                    dtype=replica_dtype,
                    actor_options=replica_options,
                )
        elif isinstance(env, str):
            self.env = make_env(env, batch_size=batch, max_steps=max_steps, **(env_kwargs or {}))
        else:
            self.env = env(batch)
        if tuple(self.env.batch_size) != (batch,):
            raise ValueError(
                f"the env factory made batch size {tuple(self.env.batch_size)}, expected {batch}"
            )
        self.policy = policy
        self.prompt_builder = prompt_builder or PromptBuilder()
        self.parse = parse
        self.total_batches = total_batches
        self.replay_buffer = replay_buffer
        self.progress = progress
        self.on_step = on_step
        self._rng = np.random.default_rng(check_seed(seed))
        self.batches_collected = 0
        self._next_traj = 0
        self.stats: dict[str, Any] = {}
        self.held_out = bool(held_out)
        #: initial state hashes of this (validation) collector's held-out tasks
        self.held_out_tasks: frozenset[int] = frozenset()
        #: whether this collector's tasks are kept apart from the other side's
        self.tasks_held_out = False
        self._fixed_seeds: torch.Tensor | None = None
        self._excluded = torch.zeros(0, dtype=torch.long)
        self._redrawn = 0
        if self.held_out:
            self._choose_held_out_tasks()
        self.exclude_tasks(exclude_tasks)

    # -- checkpointing -------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The task sampler's state and counters, so a resumed run draws the same tasks."""
        return {
            "rng": self._rng.bit_generator.state,
            "batches_collected": self.batches_collected,
            "next_traj": self._next_traj,
        }

    def load_state_dict(self, state: dict) -> None:
        self._rng.bit_generator.state = state["rng"]
        self.batches_collected = state["batches_collected"]
        self._next_traj = state["next_traj"]

    # -- torchrl collector interface -----------------------------------------------------

    def __iter__(self) -> Iterator[TensorDictBase]:
        bar = tqdm(total=self.total_batches, desc="collect", disable=not self.progress)
        try:
            while self.total_batches is None or self.batches_collected < self.total_batches:
                batch = self.collect()
                bar.update(1)
                bar.set_postfix(
                    success=f"{self.stats['success_rate']:.2f}",
                    ret=f"{self.stats['mean_return']:.2f}",
                )
                yield batch
        finally:
            bar.close()

    def update_policy_weights_(self, state_dict: dict | None = None) -> None:
        """Load ``state_dict`` into the policy's model (in-process policies share the
        trainer's model already, so calling this without arguments is a no-op there), and
        push it to the generation replicas, if any: without ``state_dict``, the policy
        model's trainable parameters (all its weights when none is trainable)."""
        if state_dict is not None:
            self.policy.model.load_state_dict(state_dict)
        if self.replicas is not None:
            self.replicas.update_weights(state_dict)

    def shutdown(self) -> None:
        self.env.close(raise_if_closed=False)
        if self.replicas is not None:
            self.replicas.shutdown()

    def _shard_sizes(self, workers: int, replicas: int) -> list[int]:
        """Elements per env shard, in element order. With R replicas the batch is cut into
        R lanes of whole groups, each holding ``workers / R`` shards (one without workers);
        ``self._lanes`` records each lane's shards."""
        from gigpo_torchrl.collector.ray_workers import split_sizes

        batch, n = self.num_groups * self.num_generations, self.num_generations
        if not replicas:
            if workers > batch:
                raise ValueError(
                    f"num_env_workers={workers}: more workers than the {batch} environments"
                )
            return split_sizes(batch, workers)
        if replicas > self.num_groups:
            raise ValueError(
                f"num_policy_replicas={replicas}: each replica serves whole groups, and there "
                f"are {self.num_groups}"
            )
        if workers % replicas:
            raise ValueError(
                f"num_env_workers={workers} must be a multiple of num_policy_replicas="
                f"{replicas} (each replica's lane has its own env workers)"
            )
        per_lane = max(1, workers // replicas)
        sizes: list[int] = []
        for groups in split_sizes(self.num_groups, replicas):
            if groups * n < per_lane:
                raise ValueError(
                    f"num_env_workers={workers}: a lane of {groups * n} environments cannot "
                    f"feed {per_lane} workers"
                )
            self._lanes.append((len(sizes), len(sizes) + per_lane))
            sizes += split_sizes(groups * n, per_lane)
        return sizes

    # -- tasks ---------------------------------------------------------------------------

    def exclude_tasks(self, state_hashes: Iterable[int]) -> None:
        """Never draw a task whose initial ``state_hash`` is in ``state_hashes`` (the
        validation collector's :attr:`held_out_tasks`); replaces any previous set."""
        hashes = sorted({int(h) for h in state_hashes})
        if self.held_out and hashes:
            raise ValueError("a held_out collector plays fixed tasks: it cannot exclude any")
        self._excluded = torch.tensor(hashes, dtype=torch.long)
        if not self.held_out:
            self.tasks_held_out = bool(hashes)

    def _name(self) -> str:
        return str(getattr(self.env, "name", None) or type(self.env).__name__)

    def _choose_held_out_tasks(self) -> None:
        """Probe reset seeds; keep up to ``num_groups`` distinct initial states (at most
        half of those seen) as this collector's fixed tasks."""
        n_env, wanted = self.num_groups * self.num_generations, self.num_groups
        seeds_of: dict[int, list[int]] = {}  # initial state hash -> seeds, in probe order
        probed: list[int] = []
        while len(probed) < PROBE_RESETS and len(seeds_of) < 2 * wanted:
            seeds = self._rng.choice(2**31, size=n_env, replace=False).tolist()
            td = self.env.reset(TensorDict({"seed": torch.tensor(seeds)}, [n_env]))
            for seed, state in zip(seeds, td["state_hash"].tolist(), strict=True):
                seeds_of.setdefault(state, []).append(seed)
            probed += seeds
        distinct = len(seeds_of)
        kept = min(wanted, distinct // 2)
        name = self._name()
        if kept == 0:
            warnings.warn(
                f"{name}: {len(probed)} reset seeds gave {distinct} distinct initial state, so "
                "validation tasks cannot be held out from training: validation plays tasks "
                "that training plays too (stats['tasks_held_out'] is False).",
                stacklevel=3,
            )
            self._fixed_seeds = torch.tensor(probed[:wanted], dtype=torch.long)
            return
        if kept < wanted:
            warnings.warn(
                f"{name}: {len(probed)} reset seeds gave {distinct} distinct initial states; "
                f"only {kept} of the {wanted} validation groups can have a task of their own "
                "held out from training (at most half the tasks are held out), so validation "
                "groups repeat these tasks, with other seeds where the env has some.",
                stacklevel=3,
            )
        held = list(seeds_of)[:kept]
        seeds = [seeds_of[held[g % kept]] for g in range(wanted)]
        self._fixed_seeds = torch.tensor(
            [choices[(g // kept) % len(choices)] for g, choices in enumerate(seeds)],
            dtype=torch.long,
        )
        self.held_out_tasks = frozenset(held)
        self.tasks_held_out = True

    def _task_seeds(self) -> torch.Tensor:
        """One seed per group: the fixed held-out ones, or fresh draws."""
        if self._fixed_seeds is not None:
            return self._fixed_seeds.clone()
        # any seed (no parity split: an env whose task is seed % 2k would then lose half its
        # tasks); training and validation are kept apart by initial state (exclude_tasks)
        seeds = self._rng.choice(2**31, size=self.num_groups, replace=False)
        return torch.as_tensor(seeds, dtype=torch.long)

    def _reset_tasks(self) -> TensorDictBase:
        """Reset the env for a batch: each group's N envs with one seed, redrawing any
        group whose initial state is an excluded (held-out) task."""
        n, n_env = self.num_generations, self.num_groups * self.num_generations
        seeds = self._task_seeds()
        td = self.env.reset(TensorDict({"seed": seeds.repeat_interleave(n)}, [n_env]))
        self._redrawn = 0
        if not self._excluded.numel():
            return td
        for _ in range(MAX_REDRAW_ROUNDS):
            met = torch.isin(td["state_hash"].reshape(-1)[::n], self._excluded)
            if not bool(met.any()):
                return td
            self._redrawn += int(met.sum())
            seeds[met] = torch.as_tensor(self._rng.integers(2**31, size=int(met.sum())))
            again = TensorDict(
                {"seed": seeds.repeat_interleave(n), "_reset": met.repeat_interleave(n)[:, None]},
                [n_env],
            )
            td = self.env.reset(again)
        raise RuntimeError(
            f"{self._name()}: {MAX_REDRAW_ROUNDS} rounds of reset seeds kept meeting the "
            f"{self._excluded.numel()} held-out validation tasks; the env has too few other "
            "tasks to train on"
        )

    # -- collection ----------------------------------------------------------------------

    def collect(self) -> TensorDictBase:
        """Run one batch of episode groups and return its step rows."""
        n_env = self.num_groups * self.num_generations
        group_ids = self.batches_collected * self.num_groups + torch.arange(
            self.num_groups
        ).repeat_interleave(self.num_generations)
        traj_ids = self._next_traj + torch.arange(n_env)
        self._next_traj += n_env
        self.batches_collected += 1
        prefix_cache = getattr(self.policy, "prefix_cache", None)
        if prefix_cache is not None:  # the weights may have changed in ways it cannot see
            prefix_cache.clear()

        td = self._reset_tasks()
        raw = list(getattr(self.env, "raw_actions", None) or [False] * n_env)
        try:
            if self.replicas is None:
                rows, generated_rows, env_errors = self._play(
                    td, group_ids, traj_ids, raw, self._generate_here, None, [0]
                )
            else:
                rows, generated_rows, env_errors = self._play_lanes(td, group_ids, traj_ids, raw)
        finally:
            if prefix_cache is not None:
                # no later batch can continue them, and their keys and values would take
                # device memory through the update
                prefix_cache.clear()
        batch = lazy_stack(rows)
        self.stats = self._statistics(batch, generated_rows)
        self.stats.update(
            env_errors=env_errors,
            tasks_held_out=self.tasks_held_out,
            tasks_redrawn=self._redrawn,
        )
        if self.replay_buffer is not None:
            self.replay_buffer.extend(batch)
        return batch

    def _generate_here(self, prompts: list[str], actions: list | None = None) -> TensorDictBase:
        """Replies of the in-process policy to ``prompts`` (with each prompt's admissible
        ``actions`` for a policy that chooses among them)."""
        return self.policy(policy_inputs(prompts, actions))

    def _play(self, td, group_ids, traj_ids, raw, generate, step, count, lock=None):
        """Play the episodes of ``td`` (all envs, or one lane's) to their ends.

        At every step the unfinished envs' prompts go to ``generate`` in one call and their
        actions to the env: ``self.env.step`` when ``step`` is None, else
        ``step(actions) -> next outputs`` (a lane). ``count`` is a one-element list
        of the rows played so far, shared between lanes (under ``lock``) for ``on_step``.

        Returns:
            ``(rows, generated_rows, env_errors)``; the rows come step by step, in env
            order within a step.
        """
        n_env = td.shape[0]
        env_errors = 0
        memory = self.prompt_builder.memory
        history = [deque(maxlen=memory) for _ in range(n_env)]
        rows: list[TensorDict] = []
        generated_rows = 0
        done = torch.zeros(n_env, dtype=torch.bool)
        while not bool(done.all()):
            active = torch.nonzero(~done).reshape(-1).tolist()
            observations = list(td["observation"])
            admissible = list(td["admissible_actions"])
            tasks = list(td["task"])
            prompts = [
                self.prompt_builder.render(
                    self.policy.tokenizer,
                    self.prompt_builder.messages(
                        tasks[i], observations[i], list(history[i]), admissible[i]
                    ),
                )
                for i in active
            ]
            if getattr(self.policy, "constrain_actions", False):
                replies = generate(prompts, [list(admissible[i]) for i in active])
            else:
                replies = generate(prompts)
            generated_rows += len(active)
            # read once per step: each read of a string entry lists the whole batch
            responses = replies.get(("text", "response"))
            responses = responses.tolist() if hasattr(responses, "tolist") else list(responses)
            actions = [""] * n_env
            for k, i in enumerate(active):
                reply = responses[k]
                # games with raw_action (ms-swift envs) parse the whole reply themselves
                actions[i] = reply if raw[i] else self.parse(reply, tuple(admissible[i]))
            if step is None:
                td["action_text"] = NonTensorStack.from_list(actions)
                next_td = self.env.step(td)["next"]
            else:
                next_td = step(actions)
            has_errors = next_td.get("error", None) is not None
            errors = list(next_td["error"]) if has_errors else [""] * n_env
            # the policy's rows are fresh for this step: each becomes a step row in place
            reply_rows = replies.unbind(0)
            for k, i in enumerate(active):
                if errors[i]:  # the game failed: its episode ended
                    env_errors += 1
                rows.append(
                    self._row(
                        td,
                        next_td,
                        reply_rows[k],
                        i,
                        group_ids[i],
                        traj_ids[i],
                        actions[i],
                        observations[i],
                    )
                )
                history[i].append((observations[i], actions[i]))
            done = next_td["done"].reshape(-1).clone()
            td = next_td
            with lock or contextlib.nullcontext():
                count[0] += len(active)
                if self.on_step is not None:
                    self.on_step(count[0], len(active))
        return rows, generated_rows, env_errors

    def _play_lanes(self, td, group_ids, traj_ids, raw):
        """Play each replica's lane in a thread of its own: while one lane waits for its
        replica's replies, the others' games step. The rows are merged into the order the
        single-lane loop makes (step by step, env order within a step)."""
        env = self.env
        count, lock = [0], threading.Lock()

        def lane(k: int):
            first, last = self._lanes[k]
            lo, hi = env.offsets[first], env.offsets[last]
            return self._play(
                td[lo:hi],
                group_ids[lo:hi],
                traj_ids[lo:hi],
                raw[lo:hi],
                functools.partial(self.replicas.generate, k),
                functools.partial(env.step_shards, first, last),
                count,
                lock,
            )

        with ThreadPoolExecutor(len(self._lanes), thread_name_prefix="gigpo-lane") as pool:
            played = list(pool.map(lane, range(len(self._lanes))))
        rows = sorted(
            (row for lane_rows, _, _ in played for row in lane_rows),
            key=lambda row: (int(row["step"]), int(row["traj_id"])),
        )
        return rows, sum(p[1] for p in played), sum(p[2] for p in played)

    @staticmethod
    def _row(td, next_td, row, i, group_id, traj_id, action, observation) -> TensorDict:
        row.update(
            {
                "group_id": group_id.clone(),
                "traj_id": traj_id.clone(),
                "step": td["step"][i].clone(),
                "state_hash": td["state_hash"][i].clone(),
                "observation": observation,
                "action_text": action,
                "action_valid": next_td["action_valid"][i].clone(),
                "success": next_td["success"][i].clone(),
                ("next", "reward"): next_td["reward"][i].clone(),
                ("next", "done"): next_td["done"][i].clone(),
                ("next", "terminated"): next_td["terminated"][i].clone(),
                ("next", "truncated"): next_td["truncated"][i].clone(),
            }
        )
        env_reward = next_td.get("env_reward", None)
        if env_reward is not None:  # the game's reward, without the invalid-action penalty
            row["next", "env_reward"] = env_reward[i].clone()
        return row

    def _statistics(self, batch: TensorDictBase, generated_rows: int) -> dict[str, Any]:
        """Per-batch numbers for logs: outcomes, lengths, invalid actions, anchor groups."""
        traj = batch["traj_id"]
        last = batch["next", "done"].reshape(-1)
        reward = batch["next", "reward"].reshape(-1)
        traj_index, lengths = dense_ids(traj)
        returns = torch.zeros(lengths.numel()).index_add_(0, traj_index, reward.float())
        group_index, _ = dense_ids(batch["group_id"])
        _, _, sizes = anchor_groups(group_index, batch["state_hash"])
        row_sizes = sizes.repeat_interleave(sizes)  # the size of each row's step group
        histogram = torch.bincount(row_sizes)
        response_tokens = sum(t.numel() for t in batch.get(("tokens", "response"), as_list=True))
        return {
            "batch": self.batches_collected,
            "trajectories": int(lengths.numel()),
            "steps": int(traj.numel()),
            "success_rate": float(batch["success"].reshape(-1)[last].float().mean()),
            "mean_return": float(returns.mean()),
            "mean_episode_length": float(lengths.float().mean()),
            "invalid_action_rate": float((~batch["action_valid"].reshape(-1)).float().mean()),
            "step_group_size_histogram": histogram.tolist(),
            "singleton_fraction": float((row_sizes == 1).float().mean()),
            "rows_generated": generated_rows,
            "tokens_generated": int(response_tokens),
        }
