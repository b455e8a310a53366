"""Packed teacher forcing: each distinct prompt encoded once, the LM head on reply tokens only.

A step row is ``(prompt tokens, reply tokens)``; training needs the log-prob of every reply
token given everything before it. Scoring rows one padded sequence each wastes most of the
work: the N rows of an episode group often share their prompt (GIGPO groups steps by
identical state), prompts are ~20× longer than replies, and a full-vocabulary LM head over
every prompt position is a fifth of the model's compute. Here:

- Rows become *packed sequences*: the token trie of their full sequences (prompt, then
  reply), so a prefix several rows share is encoded once — the same prompt of the N rows
  of a group in one state, and the system prompt, task and unchanged parts of the
  observation that distinct prompts start with. An attention mask lets each token see
  exactly its own ancestors and position ids restart along each path, so every reply token
  is computed with exactly the context it has alone: the log-probs and their gradients
  equal those of separate sequences (a shared prefix's encoding simply receives the
  gradients of all the rows below it).
- Hidden states are gathered at the positions that predict a reply token before the LM
  head, so no logits are ever computed for prompt positions.
- :func:`plan_micro_batches` fills micro-batches up to a padded-token budget with sequences
  sorted by length, so padding stays small.

Masks come from lengths, never from token values: a reply may contain the pad, eos or any
other special token and is still scored in full.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from gigpo_torchrl.policy import weight_copies
from gigpo_torchrl.policy.attention_kernels import attention_kernels
from gigpo_torchrl.policy.frozen_layers import FrozenStates, run_layers
from gigpo_torchrl.policy.masks import check_window, for_attention


@dataclass
class PackedBatch:
    """Rows packed into ``S`` sequences of ``L`` positions, ready for a decoder forward.

    Attributes:
        input_ids: int64 ``[S, L]`` (padding positions hold 0).
        position_ids: int64 ``[S, L]``: each token's position in its own row.
        attention_mask: bool ``[S, 1, L, L]``: True where a query position may attend a
            key position (its trie ancestors and itself; padding attends only itself).
        gather: int64 ``[T]``: flat index into ``[S * L]`` of the position whose hidden
            state predicts each reply token, rows after one another in the order given.
        targets: int64 ``[T]``: the reply tokens.
        lengths: int64 ``[R]``: reply length of each row (``T = lengths.sum()``).
        real_tokens: positions holding a token (the rest of ``S * L`` is padding).
        allowed: int64 ``[T, K]`` or None: for replies sampled among a restricted set of
            tokens, the ids allowed at each reply token (-1 padded; a token with no allowed
            id was free), whose log-probs are then renormalised over that set.
        nodes: int64 ``[S, L]`` or None: each position's node in the token trie of a
            :class:`~gigpo_torchrl.policy.frozen_layers.FrozenStates` (-1 for padding), when
            packed with its ``index``.
    """

    input_ids: Tensor
    position_ids: Tensor
    attention_mask: Tensor
    gather: Tensor
    targets: Tensor
    lengths: Tensor
    real_tokens: int
    allowed: Tensor | None = None
    nodes: Tensor | None = None

    @property
    def padded_tokens(self) -> int:
        return self.input_ids.numel()

    def to(self, device: torch.device | str) -> PackedBatch:
        return PackedBatch(
            *(
                t.to(device, non_blocking=True)
                for t in (
                    self.input_ids,
                    self.position_ids,
                    self.attention_mask,
                    self.gather,
                    self.targets,
                    self.lengths,
                )
            ),
            real_tokens=self.real_tokens,
            **{
                name: None if t is None else t.to(device, non_blocking=True)
                for name, t in (("allowed", self.allowed), ("nodes", self.nodes))
            },
        )


def _as_list(tokens: Tensor | Sequence[int]) -> list[int]:
    return tokens.tolist() if isinstance(tokens, Tensor) else list(tokens)


def _trie(rows: Sequence[tuple[list[int], list[int]]]) -> tuple[list, list, list, list, dict]:
    """The token trie of rows ``(prompt, reply)``: ``(tokens, parent, depth, predictors,
    children)``.

    Every row's full sequence (prompt then reply) is a path from a root; rows sharing a
    prefix share its nodes. ``parent[i]`` is the node before node ``i`` (-1 at a root),
    ``depth[i]`` its position in its rows; ``predictors[r][j]`` is the node whose output
    predicts token ``j`` of row ``r``'s reply; ``children[(parent, token)]`` is the node
    of ``token`` after ``parent``. A parent always comes before its children.
    """
    tokens: list[int] = []
    parent: list[int] = []
    depth: list[int] = []
    children: dict[tuple[int, int], int] = {}
    predictors = []
    for prompt, reply in rows:
        node, path = -1, []
        for position, token in enumerate(prompt + reply):
            if position >= len(prompt):
                path.append(node)
            child = children.get((node, token))
            if child is None:
                child = len(tokens)
                children[node, token] = child
                tokens.append(token)
                parent.append(node)
                depth.append(position)
            node = child
        predictors.append(path)
    return tokens, parent, depth, predictors, children


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def plan_sequences(
    prompts: Sequence[Tensor | Sequence[int]],
    responses: Sequence[Tensor | Sequence[int]],
    *,
    max_sequence: int = 512,
) -> list[list[int]]:
    """Which rows share a packed sequence: row indices per sequence.

    Rows with the same prompt always share one. Distinct prompts are sorted (so that the
    ones with the longest common prefix are neighbours) and consecutive ones share a
    sequence while its trie stays within ``max_sequence`` positions: the common system
    prompt, task and unchanged parts of the observation are then encoded once per sequence.
    A prompt group longer than ``max_sequence`` gets a sequence of its own.
    """
    return _sequences(prompts, responses, max_sequence)[0]


def _sequences(prompts, responses, max_sequence: int) -> tuple[list[list[int]], list[int]]:
    """:func:`plan_sequences` and an upper bound of each sequence's trie size."""
    groups = group_by_prompt(prompts)
    keys = [tuple(_as_list(prompts[g[0]])) for g in groups]
    sequences: list[list[int]] = []
    sizes: list[int] = []
    previous: tuple[int, ...] = ()
    for g in sorted(range(len(groups)), key=keys.__getitem__):
        replies = sum(len(responses[i]) for i in groups[g])  # their trie may share more
        added = len(keys[g]) - _common_prefix(keys[g], previous) + replies
        if sequences and sizes[-1] + added <= max_sequence:
            sequences[-1].extend(groups[g])
            sizes[-1] += added
        else:
            sequences.append(list(groups[g]))
            sizes.append(len(keys[g]) + replies)
        previous = keys[g]
    return sequences, sizes


def group_by_prompt(prompts: Sequence[Tensor | Sequence[int]]) -> list[list[int]]:
    """Indices of the rows that share each distinct prompt, in order of first appearance."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(tuple(_as_list(prompt)), []).append(i)
    return list(groups.values())


def pack_rows(
    prompts: Sequence[Tensor | Sequence[int]],
    responses: Sequence[Tensor | Sequence[int]],
    *,
    max_sequence: int = 512,
    allowed: Sequence[Tensor] | None = None,
    index: dict[tuple[int, int], int] | None = None,
) -> PackedBatch:
    """Pack rows into token-trie sequences (see the module docstring and
    :func:`plan_sequences`).

    Args:
        prompts: R prompt token sequences, each non-empty.
        responses: R reply token sequences (any ids; an empty reply contributes nothing).
        max_sequence: positions per packed sequence, where distinct prompts share one.
        allowed: per row, int64 ``[len(response), K]`` (see :attr:`PackedBatch.allowed`).
        index: the trie of a batch holding these rows
            (:attr:`~gigpo_torchrl.policy.frozen_layers.FrozenStates.index`): each
            position's node in it goes to :attr:`PackedBatch.nodes`.

    Returns:
        A :class:`PackedBatch` on the CPU, whose ``gather``/``targets`` list the reply
        tokens row by row in the order given.

    Raises:
        ValueError: for an empty prompt, or a row that ``index``'s batch does not hold.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    prompt_lists = [_as_list(p) for p in prompts]
    reply_lists = [_as_list(r) for r in responses]
    for i, prompt in enumerate(prompt_lists):
        if not prompt:
            raise ValueError(f"row {i} has an empty prompt: nothing predicts its first token")
    sequences = []
    row_predictors: list[tuple[int, list[int]]] = [(0, [])] * len(prompts)
    plan = plan_sequences(prompt_lists, reply_lists, max_sequence=max_sequence)
    for s, rows in enumerate(plan):
        tokens, parent, depth, predictors, _ = _trie(
            [(prompt_lists[i], reply_lists[i]) for i in rows]
        )
        sequences.append((tokens, parent, depth))
        for i, path in zip(rows, predictors, strict=True):
            row_predictors[i] = (s, path)

    width = max(len(seq[0]) for seq in sequences)
    count = len(sequences)
    input_ids = np.zeros((count, width), dtype=np.int64)
    position_ids = np.zeros((count, width), dtype=np.int64)
    # Padding attends to itself only: a query with no key would give NaN in attention.
    mask = np.broadcast_to(np.eye(width, dtype=bool), (count, width, width)).copy()
    nodes = None if index is None else np.full((count, width), -1, dtype=np.int64)
    for s, (tokens, parent, depth) in enumerate(sequences):
        input_ids[s, : len(tokens)] = tokens
        position_ids[s, : len(tokens)] = depth
        if nodes is not None:
            nodes[s, : len(tokens)] = _nodes_in(index, tokens, parent)
        ancestors = mask[s]
        for node, up in enumerate(parent):  # a node sees its parent's ancestors and itself
            if up >= 0:
                ancestors[node, :node] = ancestors[up, :node]
    gather = [s * width + node for s, path in row_predictors for node in path]
    targets = [token for reply in reply_lists for token in reply]
    return PackedBatch(
        input_ids=torch.from_numpy(input_ids),
        position_ids=torch.from_numpy(position_ids),
        attention_mask=torch.from_numpy(mask).unsqueeze(1),
        gather=torch.tensor(gather, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
        lengths=torch.tensor([len(r) for r in reply_lists], dtype=torch.long),
        real_tokens=sum(len(seq[0]) for seq in sequences),
        allowed=None if allowed is None else _stack_allowed(allowed),
        nodes=None if nodes is None else torch.from_numpy(nodes),
    )


def _nodes_in(index: dict[tuple[int, int], int], tokens: list[int], parent: list[int]):
    """The nodes of a sequence's trie (``tokens``, ``parent``: parents first) in the
    batch's trie ``index``."""
    out: list[int] = []
    for token, up in zip(tokens, parent, strict=True):
        node = index.get((out[up] if up >= 0 else -1, token))
        if node is None:
            raise ValueError(
                "a row is not one of the batch whose frozen-layer states were encoded "
                "(encode_frozen over the whole batch first)"
            )
        out.append(node)
    return out


def _stack_allowed(allowed: Sequence[Tensor]) -> Tensor:
    """The rows' ``[len, K_r]`` allowed sets as one ``[T, max K]``, -1 padded."""
    width = max((a.shape[1] for a in allowed), default=0)
    return torch.cat(
        [torch.nn.functional.pad(a, (0, width - a.shape[1]), value=-1) for a in allowed]
    ).long()


def plan_micro_batches(
    prompts: Sequence[Tensor | Sequence[int]],
    responses: Sequence[Tensor | Sequence[int]],
    *,
    max_tokens: int | None = None,
    max_rows: int | None = None,
    max_sequence: int = 512,
) -> list[list[int]]:
    """Split rows into micro-batches: lists of row indices covering every row once.

    Rows are grouped into packed sequences (:func:`plan_sequences`), which stay whole.
    Sequences are sorted by length and a micro-batch takes sequences while its padded size
    — sequences × the longest — stays within ``max_tokens``, so each holds sequences of
    similar length. A sequence longer than ``max_tokens`` gets a micro-batch of its own.
    ``max_rows`` caps the rows per micro-batch instead (splitting a sequence if it must);
    with neither, one micro-batch holds everything.
    """
    if max_tokens is not None and max_rows is not None:
        raise ValueError("give max_tokens or max_rows, not both")
    for name, value in (
        ("max_tokens", max_tokens),
        ("max_rows", max_rows),
        ("max_sequence", max_sequence),
    ):
        bad = isinstance(value, bool) or not isinstance(value, int) or value < 1
        if (value is not None or name == "max_sequence") and bad:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    sequences, size = _sequences(prompts, responses, max_sequence)
    order = sorted(range(len(sequences)), key=size.__getitem__, reverse=True)
    if max_rows is not None:
        rows = [i for k in order for i in sequences[k]]
        return [rows[k : k + max_rows] for k in range(0, len(rows), max_rows)]
    if max_tokens is None:
        return [[i for k in order for i in sequences[k]]] if sequences else []
    batches: list[list[int]] = []
    longest = count = 0
    for k in order:
        # sorted longest first: the first sequence of a micro-batch sets its width
        if batches and (count + 1) * longest <= max_tokens:
            batches[-1].extend(sequences[k])
            count += 1
        else:
            batches.append(list(sequences[k]))
            longest, count = size[k], 1
    return batches


def reply_log_probs(
    model: torch.nn.Module,
    packed: PackedBatch,
    *,
    entropy: bool = False,
    entropy_grad: bool = False,
    frozen: FrozenStates | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Teacher-forced log-prob of every reply token of ``packed``, under ``model``.

    Runs the decoder body over the packed sequences and the LM head only at the ``[T]``
    gathered positions. ``model`` is a transformers causal LM (or a peft model around one)
    whose logits are its output embedding applied to the last hidden state. With ``frozen``
    (:func:`encode_frozen` of a batch holding these rows, ``packed`` with its ``index``)
    the forward starts at the lowest trained layer, from the states kept there.

    Returns:
        ``(log_probs, entropy)``: float32 ``[T]`` on the model's device, differentiable when
        grad is enabled; ``entropy`` is the entropy of the next-token distribution at each
        reply position (renormalised over the allowed set where ``packed.allowed``
        restricts it), differentiable only with ``entropy_grad``, or None unless asked for.
    """
    config = model.config
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(config, name, None) not in (None, 1.0):
            raise ValueError(
                f"models with {name} are not supported by packed scoring: their logits are "
                "not the output embedding of the hidden state alone"
            )
    check_window(config, int(packed.position_ids.max()) + 1)
    # under autocast, frozen weights read the sampler's copies instead of being cast again
    kept = weight_copies.copies(model, make=False)
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    inputs = {
        "attention_mask": for_attention(config, packed.attention_mask),
        "position_ids": packed.position_ids,
        "use_cache": False,
    }
    if frozen is not None and packed.nodes is None:
        raise ValueError("reply_log_probs with frozen states needs rows packed with its index")
    # a batch's packed shapes are new to cuDNN's attention (policy/attention_kernels.py); the
    # backward runs the kernels the forward picked
    with attention_kernels(packed.input_ids.device.type):
        if frozen is None:
            hidden = weight_copies.call(
                decoder,
                weight_copies.frozen_within(kept, model, decoder),
                input_ids=packed.input_ids,
                **inputs,
            ).last_hidden_state
        else:
            states = frozen.hidden[packed.nodes.clamp_min(0)]  # padding reads node 0: unscored
            hidden = run_layers(
                model, kept, frozen.depth, None, final_norm=True, inputs_embeds=states, **inputs
            )
    selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, packed.gather)
    logits = weight_copies.call(
        head, weight_copies.frozen_within(kept, model, head), input=selected
    ).float()
    if packed.allowed is not None and packed.allowed.shape[1] > 0:
        logits = _restrict(logits, packed.allowed, packed.targets)
    log_softmax = logits.log_softmax(-1)
    log_probs = log_softmax.gather(-1, packed.targets[:, None]).squeeze(-1)
    ent = None
    if entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            probs = log_softmax.exp()
            ent = -(probs * log_softmax.masked_fill(probs == 0, 0)).sum(-1)
    return log_probs, ent


@torch.no_grad()
def encode_frozen(
    model: torch.nn.Module,
    prompts: Sequence[Tensor | Sequence[int]],
    responses: Sequence[Tensor | Sequence[int]],
    *,
    depth: int,
    max_tokens: int | None = 4096,
    max_rows: int | None = None,
    max_sequence: int = 512,
) -> FrozenStates:
    """The states entering decoder layer ``depth`` at every node of the rows' token trie
    (prompt, then reply), each node encoded once (see
    :mod:`~gigpo_torchrl.policy.frozen_layers`).

    Args:
        model: a causal LM whose embedding and layers below ``depth`` require no grad
            (:func:`~gigpo_torchrl.policy.frozen_layers.frozen_depth`).
        prompts, responses: the batch's R rows, as for :func:`pack_rows`.
        depth: the frozen layers, at least 1.
        max_tokens, max_rows, max_sequence: the forward calls' sizes, as for
            :func:`plan_micro_batches` (no activations are kept for backward here).

    Returns:
        :class:`~gigpo_torchrl.policy.frozen_layers.FrozenStates` on the model's device.
    """
    if not prompts:
        raise ValueError("encode_frozen needs at least one row")
    if depth < 1:
        raise ValueError(f"depth={depth!r} must be at least 1 (frozen_depth(model) frozen layers)")
    prompt_lists = [_as_list(p) for p in prompts]
    reply_lists = [_as_list(r) for r in responses]
    index = _trie(list(zip(prompt_lists, reply_lists, strict=True)))[4]
    device = next(model.parameters()).device
    kept = weight_copies.copies(model, make=False)
    hidden, positions = None, 0
    plan = plan_micro_batches(
        prompt_lists,
        reply_lists,
        max_tokens=max_tokens,
        max_rows=max_rows,
        max_sequence=max_sequence,
    )
    for batch in plan:
        packed = pack_rows(
            [prompt_lists[i] for i in batch],
            [reply_lists[i] for i in batch],
            max_sequence=max_sequence,
            index=index,
        ).to(device)
        check_window(model.config, int(packed.position_ids.max()) + 1)
        with attention_kernels(device.type):
            states = run_layers(
                model,
                kept,
                0,
                depth,
                final_norm=False,
                input_ids=packed.input_ids,
                attention_mask=for_attention(model.config, packed.attention_mask),
                position_ids=packed.position_ids,
                use_cache=False,
            )
        if hidden is None:
            hidden = states.new_zeros(len(index), states.shape[-1])
        real = packed.nodes >= 0
        hidden[packed.nodes[real]] = states[real]
        positions += packed.real_tokens
    return FrozenStates(depth, index, hidden, positions)


def _restrict(logits: Tensor, allowed: Tensor, targets: Tensor) -> Tensor:
    """``[T, V]`` logits with every id outside each token's allowed set at -inf (tokens
    with no allowed ids keep the full vocabulary). The target is always allowed."""
    restricted = (allowed >= 0).any(-1)
    vocab = logits.shape[-1]
    # padding (-1) goes to an extra column, dropped after
    keep = torch.zeros(logits.shape[0], vocab + 1, dtype=torch.bool, device=logits.device)
    keep.scatter_(-1, allowed.masked_fill(allowed < 0, vocab), True)
    keep = keep[:, :vocab]
    keep[~restricted] = True
    keep.scatter_(-1, targets[:, None], True)
    return logits.masked_fill(~keep, float("-inf"))
