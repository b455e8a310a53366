"""Update speed: GIGPOLoss's packed micro-batches against the first wave's GRPOLoss scheme.

One batch of step rows is collected with the main job's settings, then the gradient of its
loss is computed (forward and backward, no optimizer step) in two ways, alternately, in the
same process:

- before: torchrl's ``GRPOLoss`` over a ``TransformersWrapper`` (teacher forcing of every
  full row, full-vocabulary logits at every position, un-pad/re-pad of the logits) in
  micro-batches of 8 rows in random order, padded to their longest row — the first wave's
  trainer;
- after: :class:`~gigpo_torchrl.objectives.GIGPOLoss` with the default token budget: rows
  sorted by length, each distinct prompt encoded once, the LM head at reply positions only.

Both run in float32. Where ``gigpo-train --dtype auto`` updates under bfloat16 autocast (CUDA,
and a CPU with bfloat16 instructions), the "after" scheme is also timed under it. On CUDA (or
with ``--fresh-batches``) the updates of fresh batches (new shapes, as in training) are also
timed under bfloat16 autocast with every SDPA kernel and with the update's own
(``policy/attention_kernels.py``: on CUDA without cuDNN's, which builds a graph for every new
shape). Last, with all but the top ``--train-layers`` layers frozen (gigpo-train's
``--train_layers``, default 4), an update as gigpo-train runs it (mini-batches of
``--mini-batch-size`` random rows, no optimizer step) is timed with the frozen layers encoded
once over the whole batch (``--frozen_layers_once``, the default) and again in every
mini-batch, in rounds taking turns.
Throughput counts the rows' own tokens (prompt + reply) per second, however they are packed.
The last line reads ``update speed-up: <x>x, padding: <p>%`` (padding of the "after" scheme).

    python benchmarks/bench_update.py                      # SmolLM2-135M, FrozenLake 2×4
    python benchmarks/bench_update.py --model random:qwen2.5-0.5b --repeats 1
    python benchmarks/bench_update.py --model random:smollm2-135m --device cuda
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import torch
from torchrl.objectives.llm import GRPOLoss

from gigpo_torchrl import GIGPOAdvantage
from gigpo_torchrl.collector import GroupCollector
from gigpo_torchrl.objectives import GIGPOLoss
from gigpo_torchrl.policy import LLMPolicy, attention_kernels, load_model, scoring_wrapper
from gigpo_torchrl.train.cli import optional_int
from gigpo_torchrl.train.config import auto_dtype
from gigpo_torchrl.train.trainer import train_top_layers


def timed(fn) -> float:
    """Seconds ``fn()`` took, the device's queued work included."""
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def before(loss: GRPOLoss, model, batch, rows_per_micro_batch: int) -> float:
    """The first wave's update: random micro-batches, weighted by their share of rows."""

    def run():
        model.zero_grad()
        order = torch.randperm(batch.shape[0])
        for micro in order.split(rows_per_micro_batch):
            out = loss(batch[micro])
            (out.loss_objective * (len(micro) / len(order))).backward()

    return timed(run)


def after(loss: GIGPOLoss, model, batch) -> float:
    def run():
        model.zero_grad()
        loss.backward(batch)

    return timed(run)


def training_update(loss: GIGPOLoss, model, batch, mini_batch_size: int, once: bool):
    """Seconds of one update as gigpo-train runs it, without its optimizer steps: the
    frozen layers encoded once over the batch when ``once``, then mini-batches of random
    rows (the same ones every call); and the positions the mini-batches' forwards took."""
    order = torch.randperm(batch.shape[0], generator=torch.Generator().manual_seed(0))
    positions = []

    def run():
        frozen = loss.frozen_states(batch) if once else None
        for mini in order.split(mini_batch_size):
            model.zero_grad()
            positions.append(int(loss.backward(batch[mini], frozen=frozen)["real_tokens"]))

    return timed(run), sum(positions)


def frozen_line(loss: GIGPOLoss, model, batch, args) -> None:
    """Print the update with the frozen layers encoded once against again in every
    mini-batch (medians of ``args.repeats`` rounds taking turns)."""
    frozen = loss.frozen_states(batch)  # also the rounds' warm-up
    if frozen is None:
        print(f"frozen layers: none below the top {args.train_layers} of this model")
        return
    times = {True: [], False: []}
    for _ in range(args.repeats):
        for once in (True, False):
            seconds, positions = training_update(loss, model, batch, args.mini_batch_size, once)
            times[once].append(seconds)
    once_s, every_s = (statistics.median(times[k]) for k in (True, False))
    precision = "bfloat16 autocast" if torch.is_autocast_enabled(model.device.type) else "float32"
    print(
        f"frozen layers encoded once ({frozen.depth} of {len(model.get_decoder().layers)} "
        f"layers, mini-batches of {args.mini_batch_size} random rows, {precision}, medians of "
        f"{args.repeats} taking turns): once {once_s:.2f}s, in every mini-batch {every_s:.2f}s "
        f"({every_s / once_s:.2f}x); positions through the frozen layers: {frozen.positions} "
        f"once, {positions} in the mini-batches"
    )


def token_count(batch, kind: str = "full") -> int:
    """Tokens of the rows' ``("tokens", kind)`` (``full``: prompt + reply), all rows."""
    return sum(t.numel() for t in batch.get(("tokens", kind), as_list=True))


def padding_before(batch, rows_per_micro_batch: int) -> float:
    lengths = torch.tensor([t.numel() for t in batch.get(("tokens", "full"), as_list=True)])
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0))
    padded = sum(int(lengths[m].max()) * len(m) for m in order.split(rows_per_micro_batch))
    return 1 - int(lengths.sum()) / padded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--env", default="frozenlake")
    parser.add_argument("--env-kwargs", type=json.loads, default={}, help="JSON object")
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--train-layers",
        type=optional_int,
        default=4,
        help="as gigpo-train's --train_layers, for the frozen-layers line ('none': no line)",
    )
    parser.add_argument(
        "--mini-batch-size", type=int, default=32, help="as gigpo-train's, for that line"
    )
    parser.add_argument(
        "--constrain-actions",
        action="store_true",
        help="replies are one of the admissible actions, as the main job's",
    )
    parser.add_argument(
        "--fresh-batches",
        type=int,
        default=None,
        help="batches whose updates are timed with and without cuDNN's attention (default: 3 "
        "on CUDA, none elsewhere)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model, tokenizer = load_model(args.model)
    model.to(args.device)
    device = model.device
    policy = LLMPolicy(
        model,
        tokenizer,
        temperature=1.0,
        max_new_tokens=args.max_new_tokens,
        constrain_actions=args.constrain_actions,
    )
    collector = GroupCollector(
        args.env,
        policy,
        num_groups=args.groups,
        num_generations=args.generations,
        max_steps=args.max_steps,
        seed=0,
        env_kwargs=args.env_kwargs,
    )
    batch = GIGPOAdvantage()(collector.collect())
    fresh_count = args.fresh_batches
    if fresh_count is None:
        fresh_count = 3 if device.type == "cuda" else 0
    fresh = [GIGPOAdvantage()(collector.collect()) for _ in range(fresh_count)]
    rows = batch.shape[0]
    row_tokens, reply_tokens = token_count(batch), token_count(batch, "response")
    distinct = len({tuple(t.tolist()) for t in batch.get(("tokens", "prompt"), as_list=True)})
    print(
        f"{args.model}, {args.env}: {rows} step rows, {row_tokens} tokens "
        f"({reply_tokens} reply tokens), {distinct} distinct prompts, "
        f"{torch.get_num_threads()} threads, {device}"
    )

    model.train()
    grpo = GRPOLoss(
        scoring_wrapper(model, tokenizer),
        masking_strategy="sft",
        aggregation="token_mean",
        entropy_bonus=False,
    )
    gigpo = GIGPOLoss(model)
    bf16 = auto_dtype(args.device) == "bfloat16"
    autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16)
    if fresh:
        # printed first, whatever happens to the schemes below on this device; every SDPA
        # kernel first (cuDNN's among them on CUDA), so that cuDNN meets every shape new (the
        # other kernels keep no graphs), then the update's own (attention_kernels.py)
        def updates() -> float:
            return sum(after(gigpo, model, b) for b in fresh)

        with autocast():
            after(gigpo, model, batch)  # warm-ups (kernels loaded, memory pooled) left out
            own = attention_kernels.ATTENTION_BACKENDS.pop(device.type, None)
            with_s, seen_s = updates(), updates()
            if own is not None:
                attention_kernels.ATTENTION_BACKENDS[device.type] = own
            own_s = updates()
        fresh_tokens = sum(map(token_count, fresh))
        print(
            f"updates of {len(fresh)} fresh batches ({fresh_tokens} row tokens, bfloat16 "
            f"autocast): every SDPA kernel (cuDNN's among them on CUDA) {with_s:.2f}s, again "
            f"(cuDNN's graphs built) {seen_s:.2f}s; the update's own (without cuDNN on CUDA) "
            f"{own_s:.2f}s",
            flush=True,
        )
    # the first wave's scheme reads its rows from the model's device
    on_device = batch.to(device)
    times = {"before": [], "after": [], "bfloat16": []}
    for _ in range(args.repeats):
        times["before"].append(before(grpo, model, on_device, 8))
        times["after"].append(after(gigpo, model, batch))
        if bf16:
            with autocast():
                times["bfloat16"].append(after(gigpo, model, batch))
    stats = gigpo.backward(batch)
    model.zero_grad()
    t_before, t_after = (statistics.median(times[k]) for k in ("before", "after"))
    pad_after = float(stats["padding_fraction"])
    print(f"{'scheme':<44} {'seconds':>8} {'tokens/s':>9} {'padding':>8}")
    print(
        f"{'before: GRPOLoss, 8 random rows, full logits':<44} {t_before:>8.2f} "
        f"{row_tokens / t_before:>9.0f} {padding_before(batch, 8):>8.1%}"
    )
    print(
        f"{'after: GIGPOLoss, packed, reply-only head':<44} {t_after:>8.2f} "
        f"{row_tokens / t_after:>9.0f} {pad_after:>8.1%}"
    )
    if bf16:
        t_bf16 = statistics.median(times["bfloat16"])
        print(
            f"{'after, under bfloat16 autocast':<44} {t_bf16:>8.2f} "
            f"{row_tokens / t_bf16:>9.0f} {pad_after:>8.1%}"
        )
    print(
        f"(medians of {args.repeats}; after: {int(stats['micro_batches'])} micro-batches, "
        f"{int(stats['tokens'])} positions processed for {row_tokens} row tokens)"
    )
    if bf16:
        print(f"bfloat16 autocast: the after scheme {t_after / t_bf16:.2f}x as fast as in float32")
    if args.train_layers is not None:
        train_top_layers(model, args.train_layers)
        with autocast(enabled=bf16):
            frozen_line(gigpo, model, batch, args)
    print(f"update speed-up: {t_before / t_after:.2f}x, padding: {pad_after:.1%}")


if __name__ == "__main__":
    main()
