"""``GroupCollector``: B tasks × N generations of multi-step episodes, as flat step rows."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from tensordict import NonTensorStack, TensorDict, TensorDictBase, lazy_stack
from tqdm.auto import tqdm

from gigpo_torchrl.envs import TextEnv, make_env
from gigpo_torchrl.functional import anchor_groups, dense_ids
from gigpo_torchrl.policy.parsing import parse_action
from gigpo_torchrl.policy.prompts import PromptBuilder


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
    tensors are ragged), with the DESIGN.md keys: ``group_id``, ``traj_id``, ``step``,
    ``state_hash`` (before the action), ``observation``, ``action_text``, ``action_valid``
    and ``success`` ``[1]``, ``("next", "reward" | "done" | "terminated" | "truncated")``
    ``[1]``, ``("next", "env_reward")`` ``[1]`` (the reward without the invalid-action
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
        held_out: draw odd task seeds instead of even ones, so that a validation collector
            never meets a training task.
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
    ):
        self.num_groups = _positive("num_groups", num_groups)
        self.num_generations = _positive("num_generations", num_generations)
        if total_batches is not None:
            _positive("total_batches", total_batches)
        batch = self.num_groups * self.num_generations
        if isinstance(env, str):
            self.env = make_env(env, batch_size=batch, max_steps=max_steps, **(env_kwargs or {}))
        elif callable(env):
            self.env = env(batch)
        else:
            raise ValueError(f"env must be a registered name or a factory, got {env!r}")
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
        self._rng = np.random.default_rng(seed)
        self.held_out = bool(held_out)
        self.batches_collected = 0
        self._next_traj = 0
        self.stats: dict[str, Any] = {}

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
        trainer's model already, so calling this without arguments is a no-op)."""
        if state_dict is not None:
            self.policy.model.load_state_dict(state_dict)

    def shutdown(self) -> None:
        self.env.close(raise_if_closed=False)

    # -- collection ----------------------------------------------------------------------

    def _task_seeds(self) -> torch.Tensor:
        seeds = 2 * self._rng.choice(2**30 - 1, size=self.num_groups, replace=False)
        seeds = torch.as_tensor(seeds + self.held_out, dtype=torch.long)
        return seeds.repeat_interleave(self.num_generations)

    def collect(self) -> TensorDictBase:
        """Run one batch of episode groups and return its step rows."""
        n_env = self.num_groups * self.num_generations
        group_ids = self.batches_collected * self.num_groups + torch.arange(
            self.num_groups
        ).repeat_interleave(self.num_generations)
        traj_ids = self._next_traj + torch.arange(n_env)
        self._next_traj += n_env
        self.batches_collected += 1

        td = self.env.reset(TensorDict({"seed": self._task_seeds()}, [n_env]))
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
            replies = self.policy(
                TensorDict({("text", "prompt"): NonTensorStack.from_list(prompts)}, [len(active)])
            )
            generated_rows += len(active)
            actions = [""] * n_env
            for k, i in enumerate(active):
                actions[i] = self.parse(replies[k]["text", "response"], tuple(admissible[i]))
            td["action_text"] = NonTensorStack.from_list(actions)
            next_td = self.env.step(td)["next"]
            for k, i in enumerate(active):
                rows.append(
                    self._row(td, next_td, replies[k], i, group_ids[i], traj_ids[i], actions[i])
                )
                history[i].append((observations[i], actions[i]))
            done = next_td["done"].reshape(-1).clone()
            td = next_td
        batch = lazy_stack(rows)
        self.stats = self._statistics(batch, generated_rows)
        if self.replay_buffer is not None:
            self.replay_buffer.extend(batch)
        return batch

    @staticmethod
    def _row(td, next_td, reply, i, group_id, traj_id, action) -> TensorDict:
        row = reply.clone()
        row.update(
            {
                "group_id": group_id.clone(),
                "traj_id": traj_id.clone(),
                "step": td["step"][i].clone(),
                "state_hash": td["state_hash"][i].clone(),
                "observation": td["observation"][i],
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
