"""Packed teacher forcing: each distinct prompt encoded once, the LM head on reply tokens only.

A step row is ``(prompt tokens, reply tokens)``; training needs the log-prob of every reply
token given everything before it. Scoring rows one padded sequence each wastes most of the
work: the N rows of an episode group often share their prompt (GIGPO groups steps by
identical state), prompts are ~20× longer than replies, and a full-vocabulary LM head over
every prompt position is a fifth of the model's compute. Here:

- Rows with the same prompt become one *packed sequence*: the prompt once, then the token
  trie of its replies (identical reply prefixes are shared too). An attention mask lets
  each token see exactly its own ancestors and position ids continue each reply right after
  the prompt, so every reply token is computed with exactly the context it has alone: the
  log-probs and their gradients equal those of separate sequences (the shared prompt's
  encoding simply receives the gradients of all its replies).
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
    """

    input_ids: Tensor
    position_ids: Tensor
    attention_mask: Tensor
    gather: Tensor
    targets: Tensor
    lengths: Tensor
    real_tokens: int

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
        )


def _as_list(tokens: Tensor | Sequence[int]) -> list[int]:
    return tokens.tolist() if isinstance(tokens, Tensor) else list(tokens)


def _trie_sequence(
    prompt: list[int], replies: list[list[int]]
) -> tuple[list[int], list[int], list[int], list[list[int]]]:
    """One packed sequence: ``(tokens, parent, depth, predictors)``.

    ``parent[i]`` is the node before node ``i`` (-1 for the first prompt token), ``depth[i]``
    its position in its row; ``predictors[r][j]`` is the node whose output predicts token
    ``j`` of reply ``r``. Nodes are numbered so that a parent always comes first.
    """
    tokens = list(prompt)
    parent = list(range(-1, len(prompt) - 1))
    depth = list(range(len(prompt)))
    children: dict[tuple[int, int], int] = {}
    predictors = []
    for reply in replies:
        node = len(prompt) - 1
        path = []
        for token in reply:
            path.append(node)
            child = children.get((node, token))
            if child is None:
                child = len(tokens)
                children[node, token] = child
                tokens.append(token)
                parent.append(node)
                depth.append(depth[node] + 1)
            node = child
        predictors.append(path)
    return tokens, parent, depth, predictors


def group_by_prompt(prompts: Sequence[Tensor | Sequence[int]]) -> list[list[int]]:
    """Indices of the rows that share each distinct prompt, in order of first appearance."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(tuple(_as_list(prompt)), []).append(i)
    return list(groups.values())


def pack_rows(
    prompts: Sequence[Tensor | Sequence[int]],
    responses: Sequence[Tensor | Sequence[int]],
) -> PackedBatch:
    """Pack rows into one sequence per distinct prompt (see the module docstring).

    Args:
        prompts: R prompt token sequences, each non-empty.
        responses: R reply token sequences (any ids; an empty reply contributes nothing).

    Returns:
        A :class:`PackedBatch` on the CPU, whose ``gather``/``targets`` list the reply
        tokens row by row in the order given.
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
    for s, rows in enumerate(group_by_prompt(prompt_lists)):
        tokens, parent, depth, predictors = _trie_sequence(
            prompt_lists[rows[0]], [reply_lists[i] for i in rows]
        )
        sequences.append((tokens, parent, depth, len(prompt_lists[rows[0]])))
        for i, path in zip(rows, predictors, strict=True):
            row_predictors[i] = (s, path)

    width = max(len(seq[0]) for seq in sequences)
    count = len(sequences)
    input_ids = np.zeros((count, width), dtype=np.int64)
    position_ids = np.zeros((count, width), dtype=np.int64)
    # Padding attends to itself only: a query with no key would give NaN in attention.
    mask = np.broadcast_to(np.eye(width, dtype=bool), (count, width, width)).copy()
    for s, (tokens, parent, depth, prompt_len) in enumerate(sequences):
        n = len(tokens)
        input_ids[s, :n] = tokens
        position_ids[s, :n] = depth
        ancestors = mask[s]
        ancestors[:n, :n] = np.tril(np.ones((n, n), dtype=bool))  # right for the prompt chain
        for node in range(prompt_len, n):  # a reply node sees its parent's ancestors, itself
            ancestors[node, :n] = ancestors[parent[node], :n]
            ancestors[node, node] = True
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
    )


def plan_micro_batches(
    prompts: Sequence[Tensor | Sequence[int]],
    responses: Sequence[Tensor | Sequence[int]],
    *,
    max_tokens: int | None = None,
    max_rows: int | None = None,
) -> list[list[int]]:
    """Split rows into micro-batches: lists of row indices covering every row once.

    Rows that share a prompt stay together (one packed sequence). Sequences are sorted by
    length and a micro-batch takes sequences while its padded size — sequences × the
    longest — stays within ``max_tokens``, so each holds sequences of similar length. A
    sequence longer than ``max_tokens`` gets a micro-batch of its own. ``max_rows`` caps the
    rows per micro-batch instead (splitting a prompt's rows if it must); with neither, one
    micro-batch holds everything.
    """
    if max_tokens is not None and max_rows is not None:
        raise ValueError("give max_tokens or max_rows, not both")
    for name, value in (("max_tokens", max_tokens), ("max_rows", max_rows)):
        bad = isinstance(value, bool) or not isinstance(value, int) or value < 1
        if value is not None and bad:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    groups = group_by_prompt(prompts)
    # Upper bound of a sequence's length (the trie can only be shorter): cheap and stable.
    size = {g[0]: len(prompts[g[0]]) + sum(len(responses[i]) for i in g) for g in groups}
    groups.sort(key=lambda g: size[g[0]], reverse=True)
    if max_rows is not None:
        rows = [i for g in groups for i in g]
        return [rows[k : k + max_rows] for k in range(0, len(rows), max_rows)]
    if max_tokens is None:
        return [[i for g in groups for i in g]] if groups else []
    batches: list[list[int]] = []
    longest = count = 0
    for group in groups:
        # sorted longest first: the first sequence of a micro-batch sets its width
        if batches and (count + 1) * longest <= max_tokens:
            batches[-1].extend(group)
            count += 1
        else:
            batches.append(list(group))
            longest, count = size[group[0]], 1
    return batches


def reply_log_probs(
    model: torch.nn.Module, packed: PackedBatch, *, entropy: bool = False
) -> tuple[Tensor, Tensor | None]:
    """Teacher-forced log-prob of every reply token of ``packed``, under ``model``.

    Runs the decoder body over the packed sequences and the LM head only at the ``[T]``
    gathered positions. ``model`` is a transformers causal LM (or a peft model around one)
    whose logits are its output embedding applied to the last hidden state.

    Returns:
        ``(log_probs, entropy)``: float32 ``[T]`` on the model's device, differentiable when
        grad is enabled; ``entropy`` (no grad) is the entropy of the full next-token
        distribution at each reply position, or None unless asked for.
    """
    config = model.config
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(config, name, None) not in (None, 1.0):
            raise ValueError(
                f"models with {name} are not supported by packed scoring: their logits are "
                "not the output embedding of the hidden state alone"
            )
    attention = getattr(config, "_attn_implementation", "sdpa")
    mask = packed.attention_mask
    if attention == "eager":  # eager attention adds its mask to the scores
        mask = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(
            ~mask, torch.finfo(torch.float32).min
        )
    elif attention != "sdpa":
        raise ValueError(
            f"attention implementation {attention!r} does not take the packed 4D mask; "
            "load the model with attn_implementation='sdpa' or 'eager'"
        )
    hidden = model.get_decoder()(
        input_ids=packed.input_ids,
        attention_mask=mask,
        position_ids=packed.position_ids,
        use_cache=False,
    ).last_hidden_state
    selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, packed.gather)
    logits = model.get_output_embeddings()(selected).float()
    log_softmax = logits.log_softmax(-1)
    log_probs = log_softmax.gather(-1, packed.targets[:, None]).squeeze(-1)
    ent = None
    if entropy:
        with torch.no_grad():
            ent = -(log_softmax.exp() * log_softmax).sum(-1)
    return log_probs, ent
