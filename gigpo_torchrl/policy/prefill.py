"""Prompt prefill over a prefix tree: every token that several prompts share is encoded once.

An agent's prompts share text at several depths: the system prompt and task open every
prompt, the N attempts of a group read the same task and, for their first steps, the same
observations, and attempts standing in the same state read the same prompt. The distinct
prompts of a batch are laid out as a compressed prefix tree (each node holds a run of
tokens that all prompts below it share); the nodes are encoded level by level in batched
forward calls, each node's rows continuing its parent's: gathered with room after them, which
the call's forward writes into in place (:data:`IN_PLACE`). The result is one cache row per
distinct prompt, as if each had been encoded alone (left-padded holes masked out), every
layer's in one tensor (:mod:`~gigpo_torchrl.policy.stacked_kv`), and the logits after its
last token.

How the tree is encoded depends on what a forward call costs (:func:`plan`): on a CPU every
level, split into calls of similar run lengths where padding would cost more than a call;
on a GPU, where a call's host time dominated a prefill, the tree cut to two levels.

Across calls, a :class:`~gigpo_torchrl.policy.prefix_cache.PrefixCache` keeps the prompts
a call encoded: at the next call (an agent's next turn) each prompt continues the longest
opening it shares with one of them instead of encoding it again (:func:`reuse`).
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache

from gigpo_torchrl.policy import weight_copies
from gigpo_torchrl.policy.attention_kernels import attention_kernels
from gigpo_torchrl.policy.decoding import GrowingKV
from gigpo_torchrl.policy.masks import for_attention
from gigpo_torchrl.policy.prefix_cache import KeptPrompts, PrefixCache
from gigpo_torchrl.policy.stacked_kv import StackedKV, put_rows, stacked, take_rows

# A shared run shorter than this is not worth a forward call of its own: its tokens are
# encoded again in each branch below it. (Benchmarks raise it to measure what sharing saves.)
MIN_SHARED_RUN = 8


@dataclass
class PrefixNode:
    """One run of tokens, ``prompts[member][start:end]``, shared by every prompt below it.

    Attributes:
        start, end: the run's token range (the parent's run ends at ``start``).
        member: a distinct prompt that contains the run.
        parent: the parent's index in the node list, -1 for a root.
        terminal: the distinct prompt that ends with this run, or -1.
        level: 0 for a root (or, after :func:`reuse`, below a cached root), else the
            parent's level + 1.
        cached: for a root whose keys and values are kept from an earlier call (not
            encoded), the index of the kept prompt that opens with its run
            (:func:`reuse`); else -1.
    """

    start: int
    end: int
    member: int
    parent: int
    terminal: int = -1
    level: int = 0
    cached: int = -1


def prefix_tree(
    prompts: Sequence[Sequence[int]], min_run: int = MIN_SHARED_RUN
) -> list[PrefixNode]:
    """The compressed prefix tree of distinct, non-empty token sequences, parents first.

    Each prompt ends at exactly one node (its ``terminal``); a run shared by several
    prompts but shorter than ``min_run`` tokens is folded into the runs below it, unless a
    prompt ends there. Every prompt keeps its own last token in its terminal node, so that
    its logits come out of the forward that encodes that node.
    """
    if len(set(map(tuple, prompts))) != len(prompts) or any(len(p) == 0 for p in prompts):
        raise ValueError("prefix_tree needs distinct, non-empty prompts")
    prompts = [list(p) for p in prompts]  # slices of a list equal only lists
    nodes: list[PrefixNode] = []
    # (members sharing prompts[m][:start], each longer than start; their parent node)
    pending = [(list(range(len(prompts))), 0, -1)]
    while pending:  # a stack, not recursion: one level per branching, as many as prompts
        members, start, parent = pending.pop()
        first = prompts[members[0]]
        end = min(
            (_common_length(first, prompts[m], start) for m in members[1:]), default=len(first)
        )
        here = parent
        if end > start:
            here = len(nodes)
            nodes.append(PrefixNode(start, end, members[0], parent))
        branches: dict[int, list[int]] = {}
        for m in members:
            if len(prompts[m]) == end:
                nodes[here].terminal = m
            else:
                branches.setdefault(prompts[m][end], []).append(m)
        pending.extend((branch, end, here) for branch in reversed(branches.values()))
    return _fold_short_runs(nodes, min_run)


def _fold_short_runs(nodes: list[PrefixNode], min_run: int) -> list[PrefixNode]:
    """Drop the non-terminal nodes whose run is shorter than ``min_run``: their children
    start where they started. Renumbers the rest, parents first, and sets the levels."""
    keep: list[int] = []
    new_index: dict[int, int] = {}
    for i, node in enumerate(nodes):  # parents come before their children
        parent = node.parent
        if parent != -1 and parent not in new_index:  # the parent was folded away
            folded = nodes[parent]
            node.start, node.parent = folded.start, folded.parent
        if node.terminal == -1 and node.end - node.start < min_run:
            continue
        node.parent = new_index.get(node.parent, -1)
        new_index[i] = len(keep)
        keep.append(i)
    out = [nodes[i] for i in keep]
    for node in out:
        node.level = 0 if node.parent == -1 else out[node.parent].level + 1
    return out


def reuse(
    nodes: Sequence[PrefixNode],
    prompts: Sequence[Sequence[int]],
    kept: Sequence[Sequence[int]],
    min_run: int = MIN_SHARED_RUN,
) -> list[PrefixNode]:
    """The tree with every run that ``kept`` prompts (an earlier call's) already hold
    taken from them instead of encoded.

    A prompt's kept opening is the longest one it shares with a kept prompt
    (:func:`longest_openings`). A node that the kept opening of a prompt below it reaches
    into is replaced by a new root marked ``cached`` (that kept prompt's index; its tokens
    ``[0, c)`` are never encoded) and, if the openings stop short of the node's end, the
    rest of its run as that root's child; a node's children hang below whichever of the
    two holds its last token, and a prompt that ends in it keeps its last token encoded,
    for its logits. Cached roots that nothing hangs below are dropped. Parents first;
    levels count encoded ancestors only (a node below a cached root is on level 0, so that
    a level's calls may mix roots and continuations).
    """
    opening = longest_openings(prompts, kept, min_run)
    # per node, the furthest a kept opening of a prompt below it reaches, and its kept prompt
    reach = [(0, -1)] * len(nodes)
    for i in reversed(range(len(nodes))):  # children come after their parents
        node = nodes[i]
        if node.terminal != -1:
            reach[i] = max(reach[i], opening[node.terminal])
        if node.parent != -1:
            reach[node.parent] = max(reach[node.parent], reach[i])
    out: list[PrefixNode] = []
    holds: dict[int, int] = {}  # node -> the new node that holds its run's last token
    for i, node in enumerate(nodes):
        parent = holds.get(node.parent, -1)
        length, which = reach[i]
        covered = min(length, node.end - (node.terminal != -1))
        if covered <= node.start:
            out.append(dataclasses.replace(node, parent=parent))
        else:
            out.append(PrefixNode(0, covered, node.member, -1, cached=which))
            if covered < node.end:
                out.append(PrefixNode(covered, node.end, node.member, len(out) - 1, node.terminal))
        holds[i] = len(out) - 1
    used = {node.parent for node in out}
    keep = [i for i, node in enumerate(out) if node.cached == -1 or i in used]
    index = {old: new for new, old in enumerate(keep)}
    out = [dataclasses.replace(out[i], parent=index.get(out[i].parent, -1)) for i in keep]
    for node in out:
        parent = node.parent
        node.level = 0 if parent == -1 or out[parent].cached != -1 else out[parent].level + 1
    return out


def longest_openings(
    prompts: Sequence[Sequence[int]], kept: Sequence[Sequence[int]], min_run: int = MIN_SHARED_RUN
) -> list[tuple[int, int]]:
    """Per prompt, ``(length, k)``: the longest opening it shares with ``kept[k]``, its last
    token left out (``(0, -1)`` when shorter than ``min_run`` tokens). Found among the two
    kept prompts next to it in sorted order: no other shares more."""
    order = sorted(range(len(kept)), key=lambda k: list(kept[k]))
    ranked = [list(kept[k]) for k in order]  # slices of a list equal only lists
    out = []
    for prompt in prompts:
        prompt = list(prompt)
        at = bisect.bisect_left(ranked, prompt)
        best = max(
            (
                (_common_length(prompt, ranked[j]), order[j])
                for j in (at - 1, at)
                if 0 <= j < len(ranked)
            ),
            default=(0, -1),
        )
        length = min(best[0], len(prompt) - 1)
        out.append((length, best[1]) if length >= min_run else (0, -1))
    return out


def _common_length(a: list[int], b: list[int], start: int = 0) -> int:
    """How many leading tokens ``a`` and ``b`` share, the first ``start`` known to match."""
    low, high = start, min(len(a), len(b))
    while low < high:  # bisection on slice equality: the comparisons run in C
        middle = (low + high + 1) // 2
        if a[low:middle] == b[low:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def _rounded_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _left_padded(
    runs: Sequence[Sequence[int]], pad_id: int, pad_shape: tuple[int, int] = (1, 1)
) -> tuple[Tensor, Tensor]:
    """Int64 ``[R, W]`` ids and mask of ``runs`` left-padded, R and W rounded up to the
    multiples ``pad_shape``; a row past the runs attends only to its last (padding) token,
    so that its attention has a key. Built as lists, then one tensor each: a call's rows
    cost no tensor operation apiece."""
    rows, columns = pad_shape
    width = _rounded_up(max(len(r) for r in runs), columns)
    spare = [[0] * (width - 1) + [1]] * (_rounded_up(len(runs), rows) - len(runs))
    ids = [[pad_id] * (width - len(r)) + list(r) for r in runs]
    ids += [[pad_id] * width] * len(spare)
    mask = [[0] * (width - len(r)) + [1] * len(r) for r in runs] + spare
    return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)


def schedule(nodes: Sequence[PrefixNode], call_tokens: float) -> list[list[int]]:
    """The forward calls that encode ``nodes``: lists of node indices, level by level (a
    node's parent is encoded in an earlier call or kept from an earlier prefill).

    Each call pads its runs to its longest, so a level whose runs differ in length is split
    into calls of similar runs: the split that minimises the padded tokens plus
    ``call_tokens`` per call (what a forward costs beyond its tokens; ``inf``: one call per
    level).
    """
    levels: dict[int, list[int]] = {}
    for i, node in enumerate(nodes):
        if node.cached == -1:  # a kept opening is not encoded
            levels.setdefault(node.level, []).append(i)
    calls = []
    for _, members in sorted(levels.items()):
        members.sort(key=lambda i: nodes[i].end - nodes[i].start)
        if call_tokens == float("inf"):
            calls.append(members)
            continue
        runs = [nodes[i].end - nodes[i].start for i in members]
        # best[j]: the cheapest cost of the j shortest runs; cut[j]: where its last call starts
        best, cut = [0.0] + [float("inf")] * len(runs), [0] * (len(runs) + 1)
        for j in range(1, len(runs) + 1):
            for i in range(j):
                cost = best[i] + (j - i) * runs[j - 1] + call_tokens
                if cost < best[j]:
                    best[j], cut[j] = cost, i
        bounds, j = [], len(runs)
        while j:
            bounds.append((cut[j], j))
            j = cut[j]
        calls.extend(members[i:j] for i, j in reversed(bounds))
    return calls


def flatten(nodes: Sequence[PrefixNode], levels: int) -> list[PrefixNode]:
    """The tree cut to ``levels`` levels (at least 1): a prompt that ends deeper gets one
    run from the end of its ancestor on the last kept level above (from its start for
    ``levels=1``), and the shared runs in between are encoded in each prompt's run."""
    if levels < 1:
        raise ValueError(f"levels={levels!r} must be at least 1")
    out: list[PrefixNode] = []
    new_index: dict[int, int] = {}
    for i, node in enumerate(nodes):
        if node.level < levels - 1:
            new_index[i] = len(out)
            out.append(dataclasses.replace(node, parent=new_index.get(node.parent, -1)))
        elif node.terminal != -1:
            anchor = node.parent
            while anchor != -1 and nodes[anchor].level >= levels - 1:
                anchor = nodes[anchor].parent
            start = nodes[anchor].end if anchor != -1 else 0
            level = nodes[anchor].level + 1 if anchor != -1 else 0
            parent = new_index.get(anchor, -1)
            out.append(PrefixNode(start, node.end, node.terminal, parent, node.terminal, level))
    return out


def plan(
    prompts: Sequence[Sequence[int]], device_type: str, kept: Sequence[Sequence[int]] = ()
) -> tuple[list[PrefixNode], list[list[int]], int]:
    """The prefix tree of distinct prompts as encoded on a device of ``device_type`` (see
    :data:`MAX_LEVELS`), the runs that ``kept`` prompts already hold taken from them
    (:func:`reuse`), and its forward calls (:func:`schedule`, :data:`CALL_TOKENS`); last,
    how many of the tree's tokens the kept prompts spare encoding."""
    nodes = prefix_tree(prompts, MIN_SHARED_RUN)
    levels = MAX_LEVELS.get(device_type, 2)
    if levels is not None:
        nodes = flatten(nodes, levels)
    tree_tokens = _run_tokens(nodes)
    nodes = reuse(nodes, prompts, kept, MIN_SHARED_RUN)
    calls = schedule(nodes, CALL_TOKENS.get(device_type, float("inf")))
    return nodes, calls, tree_tokens - _run_tokens(nodes)


def _run_tokens(nodes: Sequence[PrefixNode]) -> int:
    return sum(node.end - node.start for node in nodes if node.cached == -1)


def encoded_tokens(nodes: Sequence[PrefixNode], calls: Sequence[Sequence[int]]) -> int:
    """The tokens ``calls`` encode, padding included."""
    return sum(len(call) * max(nodes[i].end - nodes[i].start for i in call) for call in calls)


# What one more forward call costs, in prompt tokens, by device type: on 2 CPU cores a
# SmolLM2-135M forward costs about 35 ms plus 1.2 ms per token (benchmarks/bench_rollout.py
# prints it). Elsewhere, unmeasured: one call per level.
CALL_TOKENS = {"cpu": 32.0}
# How many levels of the tree are encoded separately, by device type (None: all; 2
# elsewhere). On a GPU a forward call's host time was most of a prefill's (154 ms of host
# time for 49 ms of kernels per turn, profiled on an H200): there the prefix all prompts
# share, then the rest of every prompt in one call (the whole tree: 2.78 against 1.84 s a
# batch in bench_rollout's Sokoban run on an H200).
MAX_LEVELS: dict[str, int | None] = {"cpu": None}
# The multiples ``(rows, columns)`` that each forward call's batch and widths are padded up
# to, by device type (none where absent). PyTorch keeps cuDNN's attention graphs in a cache
# keyed on the exact batch size, query length and key length, and every prefill of a fresh
# batch meets new shapes; cuDNN's attention took 1.6 ms of host time per layer and call
# there (profiled on an H200). Padded, the shapes recur between turns and batches; off,
# since leaving cuDNN out (policy/attention_kernels.py) did better on fresh batches
# (benchmarks/bench_rollout.py's fresh-batch line).
PAD_SHAPES: dict[str, tuple[int, int]] = {}


# A call that continues cached rows writes its keys and values into the gathered rows, in
# room kept after them (:class:`~gigpo_torchrl.policy.decoding.GrowingKV`), under a mask built
# here (:func:`causal_mask`). Benchmarks switch it off to measure what that saves: the rows
# then go through a transformers ``DynamicCache``, which copies them at its construction and
# again, concatenating, in every layer's forward.
IN_PLACE = True


class _Encoded:
    """The forward calls made so far (and the kept openings used): per call, its rows' keys and
    values (:data:`~gigpo_torchrl.policy.stacked_kv.StackedKV`), the mask ``[n, w]`` and the
    last logits ``[n, V]`` (None for a kept opening); ``at[node] = (call, row)``."""

    def __init__(self):
        self.calls: list[tuple[StackedKV, Tensor, Tensor | None]] = []
        self.at: dict[int, tuple[int, int]] = {}

    def add(self, nodes: Sequence[int], kv: StackedKV, mask: Tensor, logits: Tensor | None):
        """Record a call (or the kept openings) whose rows hold ``nodes``, in order."""
        self.at.update((n, (len(self.calls), row)) for row, n in enumerate(nodes))
        self.calls.append((kv, mask, logits))

    def gather(
        self, nodes: Sequence[int], with_logits: bool = False, columns: int = 1, room: int = 0
    ) -> tuple[StackedKV, Tensor, Tensor | None]:
        """The rows of ``nodes``, right-aligned to the widest of their calls (rounded up to
        a multiple of ``columns``; holes masked), and their logits when asked for. A node -1
        (none: a root's parent, or a padding row) gives a row of holes. The keys and values
        have ``room`` more columns, left unset, after the mask's: for a forward to write
        into (:class:`~gigpo_torchrl.policy.decoding.GrowingKV`)."""
        known = [n for n in nodes if n != -1]
        (first_k, first_v), first_mask, first_logits = self.calls[self.at[known[0]][0]]
        device = first_mask.device
        widths = [self.calls[self.at[n][0]][1].shape[1] for n in known]
        width = _rounded_up(max(widths), columns)
        # the columns left of the narrowest call's rows (and all of a row of holes) are holes
        holes = width if len(known) < len(nodes) else width - min(widths)
        keys, values = (
            t.new_empty(t.shape[0], len(nodes), t.shape[2], width + room, t.shape[4])
            for t in (first_k, first_v)
        )
        # zeros, not whatever was there: a masked key's weight is 0, but 0 * NaN is NaN
        keys[:, :, :, :holes] = 0
        values[:, :, :, :holes] = 0
        mask = torch.zeros(len(nodes), width, dtype=torch.long, device=device)
        logits = first_logits.new_empty(len(nodes), first_logits.shape[1]) if with_logits else None
        by_call: dict[int, list[tuple[int, int]]] = {}
        for into, n in enumerate(nodes):
            if n != -1:
                call, row = self.at[n]
                by_call.setdefault(call, []).append((into, row))
        for call, pairs in by_call.items():
            (k, v), call_mask, call_logits = self.calls[call]
            into = torch.tensor([i for i, _ in pairs], device=device)
            rows = torch.tensor([r for _, r in pairs], device=device)
            offset = width - call_mask.shape[1]
            put_rows(keys, into, slice(offset, width), take_rows(k, rows))
            put_rows(values, into, slice(offset, width), take_rows(v, rows))
            mask[into, offset:] = call_mask[rows]
            if with_logits:
                logits[into] = call_logits[rows]
        return (keys, values), mask, logits


def causal_mask(mask: Tensor, new: int) -> Tensor:
    """Boolean ``[n, 1, new, W]``: true where each of a call's ``new`` last columns (its
    queries) attends: the real tokens (``mask``, int64 ``[n, W]``) at or before its own
    column. What transformers builds from the 2-D mask and a cache of ``W - new`` columns,
    built here, since the call's cache is not one of transformers' classes (for one new
    token a row and no holes transformers builds none: :func:`prefill_prompts` leaves such a
    call to it)."""
    width = mask.shape[1]
    causal = torch.ones(new, width, dtype=torch.bool, device=mask.device).tril(width - new)
    return mask.bool()[:, None, None, :] & causal


@torch.no_grad()
def prefill_prompts(
    model: torch.nn.Module,
    prompts: Sequence[Tensor],
    *,
    pad_id: int,
    cache_keyword: str,
    prefix_cache: PrefixCache | None = None,
) -> tuple[StackedKV, Tensor, Tensor]:
    """Encode distinct prompts over their prefix tree (see the module docstring).

    Args:
        model: a transformers causal LM.
        prompts: U distinct, non-empty int64 token sequences.
        pad_id: fills the holes (masked out).
        cache_keyword: the model's name for the cache argument.
        prefix_cache: the prompts of the call before, whose openings these prompts
            continue where they share them (:func:`reuse`); these prompts are kept in it
            for the next call.

    Returns:
        ``(kv, mask, logits)``: the cache rows, keys and values ``[L, U, H, W, D]`` of every
        layer (:data:`~gigpo_torchrl.policy.stacked_kv.StackedKV`;
        ``DynamicCache(ddp_cache_data=list(zip(*kv)))`` makes them a transformers cache);
        int64 ``[U, W]`` mask, 1 where a cached position is one of the prompt's tokens (in
        order); float ``[U, V]`` logits after each prompt's last token. All on the model's
        device.
    """
    device = next(model.parameters()).device
    seqs = [p.tolist() for p in prompts]
    kept = prefix_cache.valid_for(model) if prefix_cache is not None else None
    nodes, calls, reused = plan(seqs, device.type, kept.tokens if kept is not None else ())
    encoded = _Encoded()
    cached = [i for i, node in enumerate(nodes) if node.cached != -1]
    if cached:  # the kept openings, as one call that encoded nothing
        kv, mask = kept.openings([(nodes[i].cached, nodes[i].end) for i in cached])
        encoded.add(cached, kv, mask, None)
        prefix_cache.reused_tokens += reused
    pad_shape = PAD_SHAPES.get(device.type, (1, 1))
    weights = weight_copies.tensors(model)
    for call in calls:
        runs = [seqs[nodes[i].member][nodes[i].start : nodes[i].end] for i in call]
        ids, mask = _left_padded(runs, pad_id, pad_shape)
        ids, mask = ids.to(device), mask.to(device)
        parents = [nodes[i].parent for i in call] + [-1] * (len(ids) - len(call))
        new = ids.shape[1]
        if parents.count(-1) == len(parents):  # transformers' cache and mask, as for any prompt
            cache, attention_mask = DynamicCache(config=model.config), mask
        else:  # roots (and padding rows) get a row of holes where the others continue
            past, past_mask, _ = encoded.gather(parents, columns=pad_shape[1], room=new)
            width = past_mask.shape[1]
            mask = torch.cat([past_mask, mask], 1)
            # a row holds its prompt's first `end` tokens: with one new token a row and no
            # hole in any row (a padding row is all holes), transformers gives attention no
            # mask at all (other numbers, by float rounding); such a call goes through its cache
            unmasked = (
                new == 1 and len(ids) == len(call) and all(nodes[i].end == width + 1 for i in call)
            )
            if IN_PLACE and not unmasked:
                cache = GrowingKV(list(past[0].unbind()), list(past[1].unbind()), width)
                attention_mask = for_attention(model.config, causal_mask(mask, new))
            else:
                rows = [(k[..., :width, :], v[..., :width, :]) for k, v in zip(*past, strict=True)]
                cache = DynamicCache(ddp_cache_data=rows, config=model.config)
                attention_mask = mask
        with attention_kernels(device.type):
            out = weight_copies.call(
                model,
                weights,
                input_ids=ids,
                attention_mask=attention_mask,
                position_ids=(mask.cumsum(-1) - 1).clamp_min(0)[:, -new:],
                use_cache=True,
                logits_to_keep=1,
                **{cache_keyword: cache},
            )
        n = len(call)  # the padding rows dropped
        in_place = isinstance(cache, GrowingKV)
        kv = (past[0][:, :n], past[1][:, :n]) if in_place else stacked(cache, n)
        encoded.add(call, kv, mask[:n], out.logits[:n, -1].float())
    # one row per prompt, from the call that encoded its last run
    ends = {node.terminal: i for i, node in enumerate(nodes) if node.terminal != -1}
    kv, mask, logits = encoded.gather([ends[u] for u in range(len(prompts))], with_logits=True)
    if prefix_cache is not None:
        prefix_cache.keep(KeptPrompts(seqs, kv, mask))
    return kv, mask, logits
