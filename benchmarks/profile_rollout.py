"""Where a rollout's time goes: one collector batch under cProfile (the Python: prompts, env
steps, step rows) and under torch.profiler (ops and kernels, with the sampler's
``gigpo/prefill`` and ``gigpo/decode_step`` ranges), after a first batch that warms up (on a
GPU: kernel choices, CUDA graph captures).

    python benchmarks/profile_rollout.py --model random:smollm2-135m --env sokoban \
        --groups 8 --generations 8 --max-steps 10 --max-new-tokens 16 --device cuda
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from gigpo_torchrl.collector import GroupCollector
from gigpo_torchrl.policy import LLMPolicy, load_model
from gigpo_torchrl.train.cli import optional_int
from gigpo_torchrl.train.trainer import train_top_layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--env", default="sokoban")
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--constrain-actions", action="store_true")
    parser.add_argument(
        "--train-layers",
        type=optional_int,
        default=4,
        help="as gigpo-train's --train_layers (default 4): the rest frozen, as in training; "
        "'none' trains every layer",
    )
    parser.add_argument("--rows", type=int, default=25, help="lines per table")
    args = parser.parse_args()

    model, tokenizer = load_model(args.model)
    model.to(args.device)
    if args.train_layers is not None:
        train_top_layers(model, args.train_layers)
    policy = LLMPolicy(
        model,
        tokenizer,
        max_new_tokens=args.max_new_tokens,
        forbid_special=args.model == "tiny",
        constrain_actions=args.constrain_actions,
    )
    collector = GroupCollector(
        args.env,
        policy,
        num_groups=args.groups,
        num_generations=args.generations,
        max_steps=args.max_steps,
        seed=0,
    )
    cuda = model.device.type == "cuda"
    with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=cuda):
        collector.collect()  # warm-up
        python = cProfile.Profile()
        start = time.perf_counter()
        python.enable()
        collector.collect()
        python.disable()
        wall = time.perf_counter() - start
        tokens = collector.stats["tokens_generated"]
        print(f"one batch: {wall:.2f}s, {tokens} tokens, {tokens / wall:.0f} tok/s (cProfile on)")
        pstats.Stats(python).sort_stats("tottime").print_stats(args.rows)

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as ops:
            start = time.perf_counter()
            collector.collect()
            if cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - start
    events = ops.key_averages()
    print(f"one batch: {wall:.2f}s, {collector.stats['tokens_generated'] / wall:.0f} tok/s")
    print(events.table(sort_by="cpu_time_total", row_limit=args.rows))
    if cuda:
        print(events.table(sort_by="self_cuda_time_total", row_limit=args.rows))
        # kernels only: an op's row repeats its kernels' time, and a range's GPU row
        # (gigpo/prefill, gigpo/decode_step) spans the gaps between its kernels too
        kernels = (
            e for e in events if e.device_type == DeviceType.CUDA and not e.is_user_annotation
        )
        busy = sum(e.self_device_time_total for e in kernels) / 1e6
        print(f"kernels {busy:.2f}s of {wall:.2f}s wall ({busy / wall:.0%} GPU busy)")


if __name__ == "__main__":
    main()
