"""Anchor keys for GIGPO's step groups: exact state, state with history, or similar text.

GIGPO's step advantage compares rows that acted from the same *anchor*. Each function here
turns flat ``[N]`` step rows into an int64 anchor key per row; rows of one episode group with
equal keys form a step group (``anchor_groups`` does the grouping).

- ``"state"``: the row's ``state_hash`` itself.
- ``"history:k"`` (:func:`history_anchor`): the state and the last ``k`` (state, action)
  pairs of the trajectory, so the same view reached by different recent pasts is a different
  anchor.
- ``"similar"`` (:func:`similar_text_anchor`): observation texts that are near-duplicates
  (estimated Jaccard similarity of their word shingles at least a threshold, MinHash with
  LSH banding, connected components) share an anchor. The result does not depend on the row
  order and is the same in every process; 100k rows take about a second.

All are vectorised (numpy/torch) except for the per-text tokenising and hashing, which is
done once per distinct text.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from gigpo_torchrl.functional.returns import trajectory_layout
from gigpo_torchrl.functional.segments import dense_ids, segment_ids

ANCHOR_MODES = ("state", "history:k", "similar")
_MASK64 = (1 << 64) - 1
_WORDS = re.compile(r"\w+")
_SPACES = re.compile(r"[ \t]+")


def parse_anchor(anchor: str) -> tuple[str, int]:
    """``"state"`` → ``("state", 0)``, ``"history:3"`` → ``("history", 3)``, ``"similar"`` →
    ``("similar", 0)``; ``ValueError`` for anything else."""
    if anchor in ("state", "similar"):
        return anchor, 0
    if isinstance(anchor, str) and anchor.startswith("history:"):
        k = anchor.partition(":")[2]
        if k.isdigit() and int(k) >= 1:
            return "history", int(k)
    raise ValueError(
        f"anchor={anchor!r} must be 'state', 'history:k' (k a positive integer, e.g. "
        "'history:2') or 'similar'"
    )


# -- 64-bit hashing ----------------------------------------------------------------------


def _signed(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _shift_right(x: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 values (torch's ``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(x: Tensor) -> Tensor:
    """SplitMix64's finaliser on int64 tensors (wrapping arithmetic): a bijection of the 64-bit
    values in which every input bit changes about half of the output bits."""
    x = x + _GOLDEN
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def combine64(seed: Tensor, value: Tensor) -> Tensor:
    """Order-sensitive combination of two int64 hashes (``combine64(a, b) != combine64(b, a)``)."""
    return mix64(seed ^ mix64(value))


def text_hash(text: str) -> int:
    """Stable signed 64-bit hash of a string (BLAKE2b, the same in every process)."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def text_hashes(texts: Sequence[str]) -> Tensor:
    """int64 ``[N]``: :func:`text_hash` of each text, computed once per distinct text."""
    cache: dict[str, int] = {}
    out = [cache[t] if t in cache else cache.setdefault(t, text_hash(t)) for t in texts]
    return torch.tensor(out, dtype=torch.int64)


# -- history:k ----------------------------------------------------------------------------

_START = _signed(0x5354415254000000)  # "START": a past step before the episode began


def history_anchor(
    state_hash: Tensor, action_hash: Tensor, traj_id: Tensor, step: Tensor, k: int
) -> Tensor:
    """Anchor = the current state and the last ``k`` (state, action) pairs of the trajectory.

    Row ``t`` of a trajectory gets ``H(s_t, (s_{t-1}, a_{t-1}), ..., (s_{t-k}, a_{t-k}))``, the
    pairs in that order (most recent first); pairs before the episode's start are a fixed
    "start" marker, so an early step and a later one with the same last pairs differ when
    ``k`` reaches past the start. ``k = 0`` gives ``state_hash`` back.

    Args:
        state_hash: int64 ``[N]`` state before each row's action.
        action_hash: int64 ``[N]`` hash of each row's action (e.g. :func:`text_hashes`).
        traj_id, step: int64 ``[N]``; every trajectory complete (steps ``0..L-1``).
        k: pairs of history, ``>= 0``.

    Returns:
        int64 ``[N]``, in the input row order.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k={k!r} must be an integer >= 0")
    if k == 0 or state_hash.numel() == 0:
        return state_hash.clone()
    layout = trajectory_layout(traj_id, step)
    state = state_hash.index_select(0, layout.order)
    pair = combine64(state, action_hash.index_select(0, layout.order))
    sorted_step = step.index_select(0, layout.order)
    key = mix64(state)
    for j in range(1, k + 1):
        # in trajectory order the row j places earlier is step t-j of the same trajectory
        earlier = torch.roll(pair, j)
        key = combine64(key, torch.where(sorted_step >= j, earlier, _START))
    return key.index_select(0, layout.position)


# -- similar -------------------------------------------------------------------------------


class TextLines(NamedTuple):
    """Distinct texts as sequences of distinct normalised lines (lowercased, whitespace runs
    collapsed, blank lines dropped).

    Attributes:
        lines: the distinct lines.
        owner: int64 ``[E]`` text of each entry, ascending (a text's lines are together).
        line: int64 ``[E]`` line of each entry, in the text's order.
        key: int64 ``[T]`` stable hash of each text's line sequence: texts that differ only
            in case, spacing or blank lines get the same key.
    """

    lines: list[str]
    owner: np.ndarray
    line: np.ndarray
    key: np.ndarray


def split_lines(texts: Sequence[str]) -> TextLines:
    """:class:`TextLines` of ``texts``; each distinct line is normalised and hashed once."""
    raw_index: dict[str, int] = {}
    flat: list[int] = []
    counts = np.zeros(len(texts), dtype=np.int64)
    for i, text in enumerate(texts):
        ids = [raw_index.setdefault(line, len(raw_index)) for line in text.lower().split("\n")]
        counts[i] = len(ids)
        flat.extend(ids)
    norm_index: dict[str, int] = {}
    raw_to_norm = np.array(
        [norm_index.setdefault(" ".join(raw.split()), len(norm_index)) for raw in raw_index],
        dtype=np.int64,
    )
    lines = list(norm_index)
    nonempty = np.array([bool(line) for line in lines], dtype=bool)
    line = raw_to_norm[np.array(flat, dtype=np.int64)]
    owner = np.repeat(np.arange(len(texts), dtype=np.int64), counts)
    keep = nonempty[line] if line.size else np.zeros(0, dtype=bool)
    line, owner = line[keep], owner[keep]
    # order-sensitive text key: a wrapping sum of (line hash, position) items, then mixed
    line_hash = np.array([text_hash(x) for x in lines], dtype=np.int64).view(np.uint64)
    per_text = np.bincount(owner, minlength=len(texts))
    start = np.cumsum(per_text) - per_text
    position = np.arange(line.size, dtype=np.int64) - start[owner]
    with np.errstate(over="ignore"):
        items = _mix64_np(line_hash[line] ^ _mix64_np(position.astype(np.uint64) + np.uint64(1)))
        total = np.zeros(len(texts), dtype=np.uint64)
        present = per_text > 0
        if present.any():
            total[present] = np.add.reduceat(items, start[present])
        key = _mix64_np(total ^ _mix64_np(per_text.astype(np.uint64))).view(np.int64)
    return TextLines(lines, owner, line, key)


def _lsh_shape(num_perm: int, threshold: float) -> tuple[int, int]:
    """(bands, rows per band): the most rows per band for which a pair at the threshold is
    still a candidate with probability >= 0.999 (candidates are then checked)."""
    best = (num_perm, 1)
    for rows in range(1, num_perm + 1):
        if num_perm % rows == 0 and 1.0 - (1.0 - threshold**rows) ** (num_perm // rows) >= 0.999:
            best = (num_perm // rows, rows)
    return best


def _mix64_np(x: np.ndarray) -> np.ndarray:
    """:func:`mix64` on uint64 numpy arrays (callers silence overflow warnings)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _permutations(num_perm: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed random affine maps ``x -> a·x + b`` (mod 2**64, ``a`` odd: bijections)."""
    rng = np.random.default_rng(0x61C8864680B583EB)
    multipliers = rng.integers(0, 2**63, num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    return multipliers, rng.integers(0, 2**63, num_perm, dtype=np.uint64)


_CHUNK = 1 << 15  # rows per block in the [rows, num_perm] steps, to bound memory


def _segment_min(table: np.ndarray, index: np.ndarray, owner: np.ndarray, count: int) -> np.ndarray:
    """``out[t] = min(table[index[e]] for e with owner[e] == t)``, ``owner`` ascending; an
    owner without entries gets the largest value (the identity of min)."""
    out = np.full((count, table.shape[1]), np.iinfo(table.dtype).max, dtype=table.dtype)
    per = np.bincount(owner, minlength=count)
    start = np.cumsum(per) - per
    for low in range(0, count, _CHUNK):
        high = min(count, low + _CHUNK)
        present = np.nonzero(per[low:high])[0] + low
        if present.size == 0:
            continue
        first, last = start[low], start[high - 1] + per[high - 1]
        block = table[index[first:last]]
        out[present] = np.minimum.reduceat(block, start[present] - first, axis=0)
    return out


def _line_signatures(lines: list[str], num_perm: int) -> tuple[np.ndarray, np.ndarray]:
    """MinHash signatures (uint32 ``[L, P]``) of each line's shingles (its words and word
    bigrams, hashed stably), and whether the line has a word."""
    vocab: dict[str, int] = {}
    flat: list[int] = []
    lengths = np.zeros(len(lines), dtype=np.int64)
    for i, line in enumerate(lines):
        words = _WORDS.findall(line)
        lengths[i] = len(words)
        flat.extend([vocab.setdefault(w, len(vocab)) for w in words])
    word_hash = np.array([text_hash(w) for w in vocab], dtype=np.int64).view(np.uint64)
    words = word_hash[np.array(flat, dtype=np.int64)]
    owner = np.repeat(np.arange(len(lines)), lengths)
    same = owner[1:] == owner[:-1]  # bigrams of neighbouring words of one line
    with np.errstate(over="ignore"):
        bigrams = _mix64_np(words[:-1] ^ _mix64_np(words[1:]))[same]
        shingles = np.concatenate([_mix64_np(words), bigrams])
        owner = np.concatenate([owner, owner[:-1][same]])
        order = np.argsort(owner, kind="stable")
        shingles, owner = shingles[order], owner[order]
        multipliers, offsets = _permutations(num_perm)
        out = np.full((len(lines), num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
        per = np.bincount(owner, minlength=len(lines))
        start = np.cumsum(per) - per
        present = np.nonzero(per)[0]
        for low in range(0, present.size, _CHUNK):
            rows = present[low : low + _CHUNK]
            first, last = start[rows[0]], start[rows[-1]] + per[rows[-1]]
            # multiply-shift: the high 32 bits of a random affine map of the 64-bit hashes
            permuted = (shingles[first:last, None] * multipliers + offsets) >> np.uint64(32)
            out[rows] = np.minimum.reduceat(permuted.astype(np.uint32), start[rows] - first, axis=0)
    return out, lengths > 0


def minhash_signatures(
    texts: TextLines, num_perm: int = 128, boilerplate: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """MinHash signatures of the texts' shingle sets: the words and word bigrams of their
    lines, boilerplate lines (``boilerplate[line]`` True) left out unless nothing with a
    word would be left.

    A text's shingles are the union of its lines', so its signature is the element-wise
    minimum of its lines' signatures: each distinct line is tokenised and hashed once, which
    makes a batch of game observations (whose lines recur) cheap.

    Returns:
        ``(signatures, has_shingles)``: uint32 ``[T, num_perm]`` and bool ``[T]`` (a text
        without a word has no shingle and a meaningless signature).
    """
    count = texts.key.size
    line_sig, has_words = _line_signatures(texts.lines, num_perm)
    use = has_words[texts.line] if texts.line.size else np.zeros(0, dtype=bool)
    if boilerplate is not None and use.any():
        kept = use & ~boilerplate[texts.line]
        # texts made only of boilerplate keep all their lines
        fallback = np.bincount(texts.owner[kept], minlength=count) == 0
        use = kept | (use & fallback[texts.owner])
    owner = texts.owner[use]
    signatures = _segment_min(line_sig, texts.line[use], owner, count)
    return signatures, np.bincount(owner, minlength=count) > 0


def boilerplate_lines(
    texts: TextLines, node_text: np.ndarray, num_groups: int, fraction: float
) -> np.ndarray:
    """bool ``[L]``: lines found in at least ``fraction`` of the nodes (distinct (episode
    group, text) pairs; ``node_text[i]`` is node i's text), when there are two groups or
    more. Text repeated in nearly every observation of different tasks (instructions,
    legends, headers) says nothing about the state."""
    out = np.zeros(len(texts.lines), dtype=bool)
    if num_groups < 2 or texts.line.size == 0:
        return out
    count = texts.key.size
    pairs = np.unique(texts.owner * len(texts.lines) + texts.line)  # a line once per text
    owner, line = pairs // len(texts.lines), pairs % len(texts.lines)
    nodes_per_text = np.bincount(node_text, minlength=count)
    found = np.bincount(line, weights=nodes_per_text[owner], minlength=len(texts.lines))
    return found >= fraction * node_text.size


def connected_components(num_nodes: int, src: Tensor, dst: Tensor) -> Tensor:
    """Component of each node of an undirected graph, as its smallest node index.

    Vectorised union-find: every edge hooks the larger of its two roots under the smaller,
    then pointer jumping flattens the trees; O((N + E) log N).
    """
    labels = torch.arange(num_nodes, dtype=torch.int64)
    if src.numel() == 0:
        return labels
    while True:
        low = torch.minimum(labels[src], labels[dst])
        hooked = labels.scatter_reduce(0, labels[src], low, reduce="amin")
        hooked = hooked.scatter_reduce(0, labels[dst], low, reduce="amin")
        while True:
            jumped = hooked[hooked]
            if torch.equal(jumped, hooked):
                break
            hooked = jumped
        if torch.equal(hooked, labels):
            return labels
        labels = hooked


def _candidate_pairs(
    sig: Tensor, group: Tensor, tie: Tensor, bands: int, rows: int, window: int
) -> Tensor:
    """LSH: int64 ``[2, E]`` pairs (i < j) of nodes that share a band bucket of the same
    group and stand at most ``window`` apart in the bucket's (hash) order."""
    c = sig.shape[0]
    sig = sig.reshape(c, bands, rows)
    bucket = combine64(group[:, None], torch.arange(bands)[None, :])
    for r in range(rows):
        bucket = combine64(bucket, sig[:, :, r])
    bucket = bucket.reshape(-1)
    member = torch.arange(c).repeat_interleave(bands)
    by_tie = torch.argsort(tie[member], stable=True)
    order = by_tie[torch.argsort(bucket[by_tie], stable=True)]
    bucket, member = bucket[order], member[order]
    links = [torch.zeros(0, dtype=torch.int64)]
    for w in range(1, min(window, bucket.numel() - 1) + 1):
        same = torch.nonzero(bucket[w:] == bucket[:-w]).reshape(-1)
        a, b = member[same], member[same + w]
        links.append(torch.minimum(a, b) * c + torch.maximum(a, b))
    pairs = torch.unique(torch.cat(links))  # c * c < 2**63 for any batch that fits memory
    return torch.stack([pairs // c, pairs % c])


def similar_text_anchor(
    texts: Sequence[str],
    group: Tensor | None = None,
    *,
    threshold: float = 0.8,
    num_perm: int = 128,
    boilerplate: float | None = 0.9,
    window: int = 2,
) -> Tensor:
    """Anchor keys that put near-duplicate texts of an episode group together.

    1. Texts are compared as sequences of lines, lowercased, with whitespace runs collapsed
       and blank lines dropped; texts equal in that form are one node per episode group.
    2. Boilerplate: when the batch holds two episode groups or more, lines found in at least
       ``boilerplate`` of the nodes (instructions, legends, headers repeated in nearly every
       observation of different tasks) are left out before shingling, unless nothing would
       be left. ``None`` never leaves anything out.
    3. Shingles: the words and word bigrams of each line; MinHash with ``num_perm``
       permutations estimates the Jaccard similarity of two texts' shingle sets.
    4. LSH banding proposes candidate pairs inside each episode group (a pair at the
       threshold is proposed with probability >= 0.999): in each band bucket, each node and
       the next ``window`` nodes in a fixed (hash) order. A pair whose estimated similarity
       (the share of equal signature entries) is at least ``threshold`` is an edge.
    5. The connected components of the edges (vectorised union-find) are the anchors; each
       is keyed by the smallest text key among its members.

    Grouping is transitive (A~B and B~C put A, B and C together). Nothing depends on the row
    order or the process: the same texts give the same anchors however the rows are
    permuted. A text without any word (empty, punctuation only) is linked only to texts
    equal to it.

    Args:
        texts: ``N`` observation strings.
        group: int64 ``[N]`` episode group of each row (None: one group). Texts of different
            groups are never linked.
        threshold: estimated Jaccard similarity in ``(0, 1]`` at or above which two texts are
            near-duplicates.
        num_perm: MinHash permutations (the estimate's standard deviation is about
            ``sqrt(J(1-J)/num_perm)``, 0.035 at J=0.8 for 128).
        boilerplate: fraction of the nodes, see step 2.
        window: neighbours checked per node in each band bucket.

    Returns:
        int64 ``[N]`` anchor key of each row.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, int | float):
        raise ValueError(f"threshold={threshold!r} must be a number in (0, 1]")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold={threshold!r} must be in (0, 1]")
    if boilerplate is not None and not 0.0 < boilerplate <= 1.0:
        raise ValueError(f"boilerplate={boilerplate!r} must be None or in (0, 1]")
    n = len(texts)
    if group is None:
        group = torch.zeros(n, dtype=torch.int64)
    group = group.reshape(-1).long().cpu()
    if group.numel() != n:
        raise ValueError(f"group has {group.numel()} entries for {n} texts")
    if n == 0:
        return torch.zeros(0, dtype=torch.int64)
    index: dict[str, int] = {}
    row_text = [index.setdefault(text, len(index)) for text in texts]
    distinct = list(index)
    bad = next((t for t in distinct if not isinstance(t, str)), None)
    if bad is not None:
        raise ValueError(f"texts must be strings, got {type(bad).__name__}")
    split = split_lines(distinct)
    # texts equal once normalised are one text: number them by their key
    text_of, _ = dense_ids(torch.from_numpy(split.key))
    row_text = text_of[torch.tensor(row_text, dtype=torch.int64)]
    group_index, group_counts = dense_ids(group)
    node, num_nodes, _ = segment_ids(group_index, row_text)
    first_row = torch.full((num_nodes,), n, dtype=torch.int64)
    first_row = first_row.scatter_reduce(0, node, torch.arange(n), reduce="amin")
    node_group = group_index[first_row]
    node_text = row_text[first_row]  # a normalised text id
    # one representative raw text per normalised text
    count = int(text_of.max()) + 1
    rep = torch.full((count,), len(distinct), dtype=torch.int64)
    rep = rep.scatter_reduce(0, text_of, torch.arange(len(distinct)), reduce="amin")
    node_raw = rep[node_text].numpy()
    node_key = torch.from_numpy(split.key)[rep[node_text]]
    lines = None
    if boilerplate is not None:
        lines = boilerplate_lines(split, node_raw, group_counts.numel(), boilerplate)
    signatures, has = minhash_signatures(split, num_perm, lines)
    node_sig = torch.from_numpy(signatures.view(np.int32))[torch.from_numpy(node_raw)]
    candidates = torch.nonzero(torch.from_numpy(has)[torch.from_numpy(node_raw)]).reshape(-1)
    src = dst = torch.zeros(0, dtype=torch.int64)
    if candidates.numel() > 1:
        bands, rows = _lsh_shape(num_perm, float(threshold))
        pairs = candidates[
            _candidate_pairs(
                node_sig[candidates],
                node_group[candidates],
                node_key[candidates],
                bands,
                rows,
                window,
            )
        ]
        need = math.ceil(threshold * num_perm - 1e-9)
        keep = torch.cat(
            [
                (node_sig[chunk[0]] == node_sig[chunk[1]]).sum(1) >= need
                for chunk in pairs.split(_CHUNK, dim=1)
            ]
            or [torch.zeros(0, dtype=torch.bool)]
        )
        src, dst = pairs[0][keep], pairs[1][keep]
    component = connected_components(num_nodes, src, dst)
    anchor = torch.full((num_nodes,), torch.iinfo(torch.int64).max, dtype=torch.int64)
    anchor = anchor.scatter_reduce(0, component, node_key, reduce="amin")
    return anchor[component][node]
