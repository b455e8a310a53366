"""Batched reply sampling with a KV cache: shared prompt text prefilled once, finished rows dropped.

Used by :class:`~gigpo_torchrl.policy.LLMPolicy` instead of ``model.generate`` because an
agent's step batch is full of repeated text — the N trajectories of a group standing in the
same state see the same prompt (exactly GIGPO's anchor states), every prompt starts with
the same system prompt, and the attempts of a group share their task and first
observations — and ``generate`` would prefill every copy. Here each distinct prompt is
prefilled once, over the prefix tree of the distinct prompts (a run of tokens several of
them share is encoded once: :mod:`~gigpo_torchrl.policy.prefill`), and the cache rows are
copied for the replies that follow; a reply that reached eos leaves the batch, so no
compute is spent decoding past it (on a CUDA device the decode steps replay a CUDA graph of
a fixed shape instead: see :mod:`~gigpo_torchrl.policy.decoding`; there the tokens stay on
the device and the host queues each step without waiting for the one before).
Every reply token's log-prob comes from the raw (untempered) logits that sampled it: the
teacher-forced log-prob of that token.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from torch.profiler import record_function

from gigpo_torchrl.policy.decoding import DynamicDecoder, StaticDecoder
from gigpo_torchrl.policy.masks import check_window
from gigpo_torchrl.policy.prefill import prefill_prompts
from gigpo_torchrl.policy.prefix_cache import PrefixCache


@dataclass(frozen=True)
class SamplingSettings:
    """How to pick each token.

    Attributes:
        max_new_tokens: reply length limit.
        temperature: 0 is greedy; otherwise logits are divided by it before sampling.
        top_p: nucleus sampling: the smallest set of tokens whose probability reaches
            ``top_p`` (1 keeps every token).
        eos_ids: tokens that end a reply (kept as its last token).
        forbidden_ids: tokens never sampled.
        static_cache: decode on a preallocated cache replayed as a CUDA graph
            (:class:`~gigpo_torchrl.policy.decoding.StaticDecoder`) rather than a growing
            one; None: on a CUDA device only (on the CPU it saves nothing).
        compile_decode: with the static cache, decode steps through ``torch.compile``
            (their many small kernels fused; the first calls compile).
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    eos_ids: tuple[int, ...] = ()
    forbidden_ids: tuple[int, ...] = ()
    static_cache: bool | None = None
    compile_decode: bool = False


def _pick(logits: Tensor, settings: SamplingSettings) -> Tensor:
    """One token per row of float ``[n, V]`` logits."""
    if settings.forbidden_ids:
        # an index tensor made where the logits are (a list would be copied to the device
        # at every step, and a copy from pageable memory waits for the device)
        forbidden = _on(logits.device, settings.forbidden_ids)
        logits = logits.index_fill(-1, forbidden, float("-inf"))
    if settings.temperature == 0:
        return logits.argmax(-1)
    probs = (logits / settings.temperature).softmax(-1)
    if settings.top_p < 1:
        sorted_probs, order = probs.sort(-1, descending=True)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= settings.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0)
        return order.gather(-1, draw(sorted_probs)[:, None]).squeeze(-1)
    return draw(probs)


@functools.lru_cache(maxsize=16)
def _on(device: torch.device, ids: tuple[int, ...]) -> Tensor:
    return torch.tensor(ids, dtype=torch.long, device=device)


# Entries per float64 part of :func:`draw` on a CPU: larger temporaries are mapped afresh by
# glibc at every call, and their page faults cost more than the sums (64 rows of 49,152:
# 14 ms in one part, 1.2 ms in parts of 8 rows).
DRAW_PART = 2**19


def draw(weights: Tensor) -> Tensor:
    """One index per row of non-negative float ``[n, V]`` weights, drawn with probability
    proportional to its weight: int64 ``[n]``.

    ``torch.multinomial`` draws an exponential variate for every entry (V random numbers a
    row: 47 ms for 64 rows of 49,152 on 2 CPU cores); this inverts the cumulative sum at
    one uniform variate a row instead (1.2 ms). The sums are float64, so that rounding moves
    no entry's probability by more than about 1e-16 (float32 sums would move the smallest
    by up to 6e-8 each); an entry of weight 0 is never drawn, since ``u < total`` strictly.
    A row without a finite positive weight gives its last index.
    """
    rows = max(1, DRAW_PART // weights.shape[-1]) if weights.device.type == "cpu" else len(weights)
    picked = []
    for part in weights.split(rows):
        cdf = part.cumsum(-1, dtype=torch.float64)
        u = torch.rand(len(part), 1, dtype=torch.float64, device=part.device) * cdf[:, -1:]
        picked.append(torch.searchsorted(cdf, u, right=True).squeeze(-1))
    # a row without a finite positive weight (NaN logits) comes out past the end: kept in
    # range so that gathers by it stay valid (sample_replies reports such rows)
    return torch.cat(picked).clamp_(max=weights.shape[-1] - 1)


def _allowed(choices, rows: list[int], prefixes: Tensor) -> list[list[int] | None] | None:
    """Per row of ``rows``, the tokens that continue one of its choices after its reply so
    far (None for a row without choices); None when no row has any."""
    if not choices or not any(choices[i] for i in rows):
        return None
    allowed = []
    for i in rows:
        done = prefixes[i].tolist()
        nexts = {seq[len(done)] for seq in continuing(choices[i], done)}
        allowed.append(sorted(nexts) or None)
    return allowed


def continuing(choices: Sequence[Sequence[int]], reply: list[int]) -> list[Sequence[int]]:
    """The choices that start with ``reply`` and go on past it."""
    return [c for c in choices if len(c) > len(reply) and list(c[: len(reply)]) == reply]


def _cache_keyword(model: torch.nn.Module) -> str:
    """transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


@torch.no_grad()
def sample_replies(
    model: torch.nn.Module,
    prompts: Sequence[Tensor],
    settings: SamplingSettings,
    *,
    pad_id: int,
    choices: Sequence[Sequence[Sequence[int]]] | None = None,
    prefix_cache: PrefixCache | None = None,
) -> tuple[list[Tensor], list[Tensor]]:
    """Sample one reply per prompt with ``model`` (a transformers causal LM).

    Args:
        prompts: R int64 token sequences, each non-empty.
        settings: see :class:`SamplingSettings`.
        pad_id: fills the left padding (masked out).
        choices: per prompt, the token sequences the reply must be one of (each ending
            with an eos id), or an empty list for a free reply. At each step the policy is
            the model's distribution renormalised over the tokens that continue one of
            them: the log-probs are of that distribution (a token that was the only way on
            has log-prob 0), and ``allowed`` records the sets for training.
        prefix_cache: the prompts of the call before, kept
            (:class:`~gigpo_torchrl.policy.prefix_cache.PrefixCache`): each prompt
            continues the longest opening it shares with one of them instead of encoding
            it again, and this call's prompts are kept for the next.

    Returns:
        :class:`Replies`: the reply tokens, their log-probs and the allowed sets.

    Raises:
        ValueError: when a prompt plus ``max_new_tokens`` would reach past the model's
            sliding attention window (see :func:`~gigpo_torchrl.policy.masks.check_window`),
            or when the model's logits are NaN (a diverged model).
    """
    device = next(model.parameters()).device
    check_window(model.config, max(map(len, prompts), default=0) + settings.max_new_tokens)
    distinct: dict[tuple[int, ...], int] = {}  # a prompt's tokens -> its index in unique
    unique: list[Tensor] = []
    source = []  # per prompt, its index in unique
    for prompt in prompts:
        key = tuple(prompt.tolist())
        if key not in distinct:
            distinct[key] = len(unique)
            unique.append(prompt)
        source.append(distinct[key])
    cache_keyword = _cache_keyword(model)
    with record_function("gigpo/prefill"):
        # every run of tokens that several prompts share encoded once (a prefix tree)
        kv, mask, logits = prefill_prompts(
            model, unique, pad_id=pad_id, cache_keyword=cache_keyword, prefix_cache=prefix_cache
        )
        rows = torch.tensor(source, device=device)
        logits = logits[rows]
        # each reply continues its own copy of its prompt's cache
        if device.type == "cuda" if settings.static_cache is None else settings.static_cache:
            decoder = StaticDecoder(
                model,
                kv,
                rows,
                mask[rows],
                settings.max_new_tokens,
                cache_keyword,
                compile=settings.compile_decode,
            )
        else:
            decoder = DynamicDecoder(
                model, kv, rows, mask[rows], settings.max_new_tokens, cache_keyword
            )

    eos = torch.tensor(settings.eos_ids, dtype=torch.long, device=device)
    if isinstance(decoder, StaticDecoder) and not choices and not SYNC_EVERY_STEP:
        tokens, log_probs, lengths = _sample_ahead(decoder, logits, settings, eos)
        allowed = None
    else:
        tokens, log_probs, lengths, allowed = _sample_watched(
            decoder, logits, settings, eos, choices
        )
    lengths = lengths.tolist()
    return Replies(
        [tokens[i, :n] for i, n in enumerate(lengths)],
        [log_probs[i, :n] for i, n in enumerate(lengths)],
        [_padded(allowed[i][:n]) for i, n in enumerate(lengths)] if choices else None,
    )


# Benchmarks set it to read each step's tokens back before the next step also on a static
# cache (as choices always do), to measure what running ahead saves.
SYNC_EVERY_STEP = False


def _sample_watched(decoder, logits: Tensor, settings: SamplingSettings, eos: Tensor, choices):
    """The decode loop that reads each step's tokens back to the host before the next step:
    finished replies leave the batch, and ``choices`` restrict each step's tokens.

    Returns int64 ``[R, max_new_tokens]`` tokens, float ``[R, max_new_tokens]`` log-probs,
    int64 ``[R]`` reply lengths (all on the CPU) and, per reply, the allowed sets of each
    step (empty lists without ``choices``)."""
    count = len(logits)
    tokens = torch.zeros(count, settings.max_new_tokens, dtype=torch.long)
    log_probs = torch.zeros(count, settings.max_new_tokens)
    lengths = torch.full((count,), settings.max_new_tokens, dtype=torch.long)
    active = torch.arange(count)  # batch row -> reply index
    steps_allowed: list[list] = [[] for _ in range(count)]  # per reply, per token
    for t in range(settings.max_new_tokens):
        allowed = _allowed(choices, active.tolist(), tokens[:, :t])
        if allowed is not None:
            # the policy is the model's distribution renormalised over the allowed tokens
            keep = torch.zeros_like(logits, dtype=torch.bool)
            for k, ids in enumerate(allowed):
                keep[k, ids if ids is not None else slice(None)] = True
            logits = logits.masked_fill(~keep, float("-inf"))
        if choices:
            for k, i in enumerate(active.tolist()):
                steps_allowed[i].append((allowed[k] if allowed else None) or [])
        token = _pick(logits, settings)
        log_prob = logits.log_softmax(-1).gather(-1, token[:, None]).squeeze(-1)
        # one device-to-host copy per step (token ids are exact in float32 below 2**24)
        picked = torch.stack([token.float(), log_prob, torch.isin(token, eos).float()]).cpu()
        if bool(picked[1].isnan().any()):
            raise _diverged(int(picked[1].isnan().sum()), len(active), t)
        ended = picked[2].bool()
        tokens[active, t] = picked[0].long()
        log_probs[active, t] = picked[1]
        lengths[active[ended]] = t + 1
        if choices:
            ended |= _complete_forced(choices, active, tokens, log_probs, lengths, steps_allowed, t)
        if bool(ended.any()):
            keep = torch.nonzero(~ended).squeeze(-1)
            if keep.numel() == 0:
                break
            active = active[keep]
            keep = keep.to(logits.device)
            token = token[keep]
            decoder.keep(keep)
        if t + 1 == settings.max_new_tokens:
            break
        with record_function("gigpo/decode_step"):
            logits = decoder.step(token)
    return tokens, log_probs, lengths, steps_allowed


def _sample_ahead(
    decoder: StaticDecoder, logits: Tensor, settings: SamplingSettings, eos: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The decode loop on a static cache, where finished replies keep their rows anyway:
    tokens, log-probs and reply ends stay on the device, so the host queues step after step
    without waiting for one to finish (on a GPU, the host's work for a step overlaps the
    kernels of the step before). The host reads back only whether every reply has ended,
    a step late on a CUDA device (so at most one step runs past the last eos), and checks
    the log-probs for NaN once at the end. A finished reply's row goes on sampling; what it
    samples past its eos is dropped.

    Returns, on the CPU: int64 ``[R, max_new_tokens]`` tokens, float ``[R, max_new_tokens]``
    log-probs and int64 ``[R]`` reply lengths."""
    device, count, limit = logits.device, len(logits), settings.max_new_tokens
    tokens = torch.zeros(count, limit, dtype=torch.long, device=device)
    log_probs = torch.zeros(count, limit, device=device)
    lengths = torch.full((count,), limit, dtype=torch.long, device=device)
    done = torch.zeros(count, dtype=torch.bool, device=device)
    ended_by = _EndWatch(device, limit)
    for t in range(limit):
        token = _pick(logits, settings)
        tokens[:, t] = token
        log_probs[:, t] = logits.log_softmax(-1).gather(-1, token[:, None]).squeeze(-1)
        ended = torch.isin(token, eos) & ~done
        lengths.masked_fill_(ended, t + 1)
        done |= ended
        if t + 1 == limit or ended_by.step(t, done):
            break
        with record_function("gigpo/decode_step"):
            logits = decoder.step(token)
    tokens, log_probs, lengths = tokens.cpu(), log_probs.cpu(), lengths.cpu()
    bad = log_probs.isnan() & (torch.arange(limit) < lengths[:, None])
    if bool(bad.any()):
        t = int(bad.any(0).nonzero()[0])
        raise _diverged(int(bad[:, t].sum()), int((lengths > t).sum()), t)
    return tokens, log_probs, lengths


class _EndWatch:
    """Whether every reply has ended, read without stalling a CUDA device: each step's
    answer is copied to pinned host memory as the device gets to it, and the host reads
    the previous step's (by then done or nearly, while this step's kernels run). On a CPU
    the answer is this step's."""

    def __init__(self, device: torch.device, steps: int):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.flags = torch.zeros(steps, dtype=torch.bool, pin_memory=True)
            self.events = [torch.cuda.Event() for _ in range(steps)]

    def step(self, t: int, done: Tensor) -> bool:
        """Record step ``t``'s bool ``[R]`` ``done``; True once every reply is known to
        have ended."""
        if not self.cuda:
            return bool(done.all())
        self.flags[t].copy_(done.all(), non_blocking=True)
        self.events[t].record()
        if t == 0:
            return False
        self.events[t - 1].synchronize()
        return bool(self.flags[t - 1])


def _diverged(rows: int, of: int, t: int) -> ValueError:
    return ValueError(
        f"the model's next-token logits are NaN (or all -inf) for {rows} of {of} replies "
        f"at reply token {t}: its weights or activations have diverged"
    )


def _complete_forced(choices, active, tokens, log_probs, lengths, steps_allowed, t) -> Tensor:
    """Finish, without a forward pass, every active reply that only one of its choices
    still continues after token ``t``: each remaining token is the only one allowed, so it
    has log-prob 0 under the renormalised distribution and needs no logits (with one-token
    actions, every reply is then complete after the prompt's forward pass). Writes the
    tokens, their log-probs, the reply length and the singleton allowed sets in place;
    returns bool ``[len(active)]`` (on the CPU), the rows finished."""
    limit = tokens.shape[1]
    done = torch.zeros(len(active), dtype=torch.bool)
    for k, i in enumerate(active.tolist()):
        ways = continuing(choices[i], tokens[i, : t + 1].tolist())
        if len(ways) != 1:
            continue
        rest = list(ways[0][t + 1 : limit])
        tokens[i, t + 1 : t + 1 + len(rest)] = torch.tensor(rest, dtype=torch.long)
        log_probs[i, t + 1 : t + 1 + len(rest)] = 0.0
        lengths[i] = t + 1 + len(rest)
        steps_allowed[i].extend([token] for token in rest)
        done[k] = True
    return done


def _padded(steps: list[list[int]]) -> Tensor:
    """int64 ``[len(steps), K]``: each step's allowed ids, padded with -1 (K = 0 for a free
    reply: every token was allowed)."""
    width = max((len(ids) for ids in steps), default=0)
    out = torch.full((len(steps), width), -1, dtype=torch.long)
    for t, ids in enumerate(steps):
        out[t, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


class Replies(NamedTuple):
    """What :func:`sample_replies` returns, per prompt (on the CPU).

    Attributes:
        tokens: the reply tokens, up to and including the first eos (or ``max_new_tokens``).
        log_probs: each reply token's log-prob under the distribution it was sampled from.
        allowed: with ``choices``, int64 ``[len(reply), K]`` per reply: the token ids that
            were allowed at each step (padded with -1; K = 0 for a free reply); else None.
    """

    tokens: list[Tensor]
    log_probs: list[Tensor]
    allowed: list[Tensor] | None
