"""Prompt prefill over a prefix tree: every token that several prompts share is encoded once.

An agent's prompts share text at several depths: the system prompt and task open every
prompt, the N attempts of a group read the same task and, for their first steps, the same
observations, and attempts standing in the same state read the same prompt. The distinct
prompts of a batch are laid out as a compressed prefix tree (each node holds a run of
tokens that all prompts below it share); the nodes are encoded level by level in batched
forward calls, each node's rows continuing a copy of its parent's cache. The result is one
cache row per distinct prompt, as if each had been encoded alone (left-padded holes masked
out), and the logits after its last token.

How the tree is encoded depends on what a forward call costs (:func:`plan`): on a CPU every
level, split into calls of similar run lengths where padding would cost more than a call;
on a GPU, where a call's host time dominated a prefill, the tree cut to two levels.

Across calls, a :class:`~gigpo_torchrl.policy.prefix_cache.PrefixCache` keeps the roots that
several prompts shared (the system prompt, at every turn): a root that opens with a kept
run continues its keys and values instead of encoding them again (:func:`reuse`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache

from gigpo_torchrl.policy.prefix_cache import PrefixCache

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
        level: 0 for a root, else the parent's level + 1.
        cached: for a root whose keys and values are kept from an earlier call (not
            encoded), the index of that kept run (:func:`reuse`); else -1.
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
    """The tree with each root that opens with at least ``min_run`` tokens of a ``kept``
    run (the longest match) split there: a new root marked ``cached`` holds those tokens
    (their keys and values come from the kept run, not encoded), and the rest of the old
    root's run, if any, becomes its child. A prompt that ends in the root keeps its last
    token in an encoded node, for its logits. Parents first, levels set again."""
    kept = [list(tokens) for tokens in kept]  # slices of a list equal only lists
    out: list[PrefixNode] = []
    new_index: dict[int, int] = {}
    for i, node in enumerate(nodes):
        shared, which = 0, -1
        if node.parent == -1:
            run = list(prompts[node.member][: node.end])
            for k, tokens in enumerate(kept):
                common = _common_length(run, tokens)
                if common > shared:
                    shared, which = common, k
            if node.terminal != -1:
                shared = min(shared, node.end - 1)
        if shared < min_run:
            out.append(dataclasses.replace(node, parent=new_index.get(node.parent, -1)))
        else:
            out.append(PrefixNode(0, shared, node.member, -1, cached=which))
            if shared < node.end:
                out.append(PrefixNode(shared, node.end, node.member, len(out) - 1, node.terminal))
        new_index[i] = len(out) - 1
    for node in out:
        node.level = 0 if node.parent == -1 else out[node.parent].level + 1
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


def shared_roots(nodes: Sequence[PrefixNode]) -> list[int]:
    """The encoded nodes whose run, from the prompts' first token, opens several prompts:
    roots with children, and the rest of such a root after a kept run (a cached root's
    only child). These are kept for the next call: the next turn's prompts open the same
    way."""
    children: dict[int, list[int]] = {}
    for i, node in enumerate(nodes):
        children.setdefault(node.parent, []).append(i)
    return [
        i
        for i, n in enumerate(nodes)
        if n.cached == -1
        and i in children
        and (n.parent == -1 or (nodes[n.parent].cached != -1 and children[n.parent] == [i]))
    ]


def _left_padded(runs: Sequence[Tensor], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in runs)
    ids = torch.full((len(runs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, tokens in enumerate(runs):
        ids[i, width - len(tokens) :] = tokens
        mask[i, width - len(tokens) :] = 1
    return ids, mask


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
        if node.cached == -1:  # a kept run is not encoded
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
) -> tuple[list[PrefixNode], list[list[int]]]:
    """The prefix tree of distinct prompts as encoded on a device of ``device_type`` (see
    :data:`MAX_LEVELS`), its roots continuing the ``kept`` runs they open with
    (:func:`reuse`: a kept run adds a level that is not encoded, and the rest of a longer
    root gets a call of its own, to be kept in turn), and its forward calls
    (:func:`schedule`, :data:`CALL_TOKENS`)."""
    nodes = prefix_tree(prompts, MIN_SHARED_RUN)
    levels = MAX_LEVELS.get(device_type, 2)
    if levels is not None:
        nodes = flatten(nodes, levels)
    nodes = reuse(nodes, prompts, kept, MIN_SHARED_RUN)
    return nodes, schedule(nodes, CALL_TOKENS.get(device_type, float("inf")))


def encoded_tokens(nodes: Sequence[PrefixNode], calls: Sequence[Sequence[int]]) -> int:
    """The tokens ``calls`` encode, padding included."""
    return sum(len(call) * max(nodes[i].end - nodes[i].start for i in call) for call in calls)


# What one more forward call costs, in prompt tokens, by device type: on 2 CPU cores a
# SmolLM2-135M forward costs about 35 ms plus 1.2 ms per token (benchmarks/bench_rollout.py
# prints it). Elsewhere, unmeasured: one call per level.
CALL_TOKENS = {"cpu": 32.0}
# How many levels of the tree are encoded separately, by device type (None: all; 2
# elsewhere). On a GPU a forward call's host time was most of a prefill's (154 ms of host
# time for 49 ms of kernels per turn, profiled on an H200): there the prefill stays the one
# measured, the prefix all prompts share and then the rest of every prompt in one call.
MAX_LEVELS: dict[str, int | None] = {"cpu": None}


class _Encoded:
    """The forward calls made so far (and the kept runs used): per call, per-layer keys and
    values ``[n, H, w, D]``, the mask ``[n, w]`` and the last logits ``[n, V]`` (None for a
    kept run); ``at[node] = (call, row)``."""

    def __init__(self):
        self.calls: list[tuple[list[tuple[Tensor, Tensor]], Tensor, Tensor | None]] = []
        self.at: dict[int, tuple[int, int]] = {}

    def add(self, nodes: Sequence[int], kv, mask: Tensor, logits: Tensor | None) -> None:
        """Record a call (or a kept run) whose rows hold ``nodes``, in order."""
        self.at.update((n, (len(self.calls), row)) for row, n in enumerate(nodes))
        self.calls.append((kv, mask, logits))

    def gather(
        self, nodes: Sequence[int], with_logits: bool = False
    ) -> tuple[list[tuple[Tensor, Tensor]], Tensor, Tensor | None]:
        """The rows of ``nodes``, right-aligned to the widest of their calls (holes masked),
        and their logits when asked for."""
        first_kv, first_mask, first_logits = self.calls[self.at[nodes[0]][0]]
        device = first_mask.device
        width = max(self.calls[self.at[n][0]][1].shape[1] for n in nodes)
        kv = [
            (
                k.new_zeros(len(nodes), k.shape[1], width, k.shape[3]),
                v.new_zeros(len(nodes), v.shape[1], width, v.shape[3]),
            )
            for k, v in first_kv
        ]
        mask = torch.zeros(len(nodes), width, dtype=torch.long, device=device)
        logits = first_logits.new_empty(len(nodes), first_logits.shape[1]) if with_logits else None
        by_call: dict[int, list[tuple[int, int]]] = {}
        for into, n in enumerate(nodes):
            call, row = self.at[n]
            by_call.setdefault(call, []).append((into, row))
        for call, pairs in by_call.items():
            call_kv, call_mask, call_logits = self.calls[call]
            into = torch.tensor([i for i, _ in pairs], device=device)
            rows = torch.tensor([r for _, r in pairs], device=device)
            offset = width - call_mask.shape[1]
            for (k, v), (k_out, v_out) in zip(call_kv, kv, strict=True):
                k_out[into, :, offset:] = k[rows]
                v_out[into, :, offset:] = v[rows]
            mask[into, offset:] = call_mask[rows]
            if with_logits:
                logits[into] = call_logits[rows]
        return kv, mask, logits


@torch.no_grad()
def prefill_prompts(
    model: torch.nn.Module,
    prompts: Sequence[Tensor],
    *,
    pad_id: int,
    cache_keyword: str,
    prefix_cache: PrefixCache | None = None,
) -> tuple[DynamicCache, Tensor, Tensor]:
    """Encode distinct prompts over their prefix tree (see the module docstring).

    Args:
        model: a transformers causal LM.
        prompts: U distinct, non-empty int64 token sequences.
        pad_id: fills the holes (masked out).
        cache_keyword: the model's name for the cache argument.
        prefix_cache: runs kept from earlier calls, which the prompts' roots continue
            when they open with one; this call's shared roots are kept in it.

    Returns:
        ``(cache, mask, logits)``: a ``DynamicCache`` of U rows of width W; int64 ``[U, W]``
        mask, 1 where a cached position is one of the prompt's tokens (in order); float
        ``[U, V]`` logits after each prompt's last token. All on the model's device.
    """
    device = next(model.parameters()).device
    seqs = [p.tolist() for p in prompts]
    kept = list(prefix_cache.valid_for(model)) if prefix_cache is not None else []
    nodes, calls = plan(seqs, device.type, [entry.tokens for entry in kept])
    encoded = _Encoded()
    for i, node in enumerate(nodes):
        if node.cached != -1:
            entry = kept[node.cached]
            prefix_cache.used(entry, node.end)
            run = [(k[:, :, : node.end], v[:, :, : node.end]) for k, v in entry.kv]
            encoded.add([i], run, torch.ones(1, node.end, dtype=torch.long, device=device), None)
    for call in calls:
        runs = [torch.as_tensor(seqs[nodes[i].member][nodes[i].start : nodes[i].end]) for i in call]
        ids, mask = _left_padded(runs, pad_id)
        ids, mask = ids.to(device), mask.to(device)
        if nodes[call[0]].parent == -1:  # a level's calls are all roots or all children
            cache = DynamicCache(config=model.config)
        else:
            past_kv, past_mask, _ = encoded.gather([nodes[i].parent for i in call])
            cache = DynamicCache(ddp_cache_data=past_kv, config=model.config)
            mask = torch.cat([past_mask, mask], 1)
        past = mask.shape[1] - ids.shape[1]
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp_min(0)[:, past:],
            use_cache=True,
            logits_to_keep=1,
            **{cache_keyword: cache},
        )
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        encoded.add(call, kv, mask, out.logits[:, -1].float())
    if prefix_cache is not None:
        for i in shared_roots(nodes):
            kv, mask, _ = encoded.gather([i])
            held = mask[0].nonzero().squeeze(-1)  # its tokens, without the calls' holes
            run = [(k[:, :, held], v[:, :, held]) for k, v in kv]
            prefix_cache.keep(seqs[nodes[i].member][: nodes[i].end], run)
    # one row per prompt, from the call that encoded its last run
    ends = {node.terminal: i for i, node in enumerate(nodes) if node.terminal != -1}
    kv, mask, logits = encoded.gather([ends[u] for u in range(len(prompts))], with_logits=True)
    return DynamicCache(ddp_cache_data=kv, config=model.config), mask, logits
