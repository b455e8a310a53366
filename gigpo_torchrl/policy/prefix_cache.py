"""The keys and values of the prompts one prefill encoded, kept for the next.

An agent's prompts repeat much of the turn before: every prompt opens with the system
prompt and its task, and an episode's next prompt often opens as its last did (the same
observations in its history window; the same state again after a move that changed
nothing). A :class:`PrefixCache` keeps the cache rows of the prompts that
:func:`~gigpo_torchrl.policy.prefill.prefill_prompts` encoded; at the next call each prompt
continues the longest opening it shares with one of them, and only the rest of it is
encoded (:func:`~gigpo_torchrl.policy.prefill.reuse`).

Kept keys and values are only right for the weights that computed them. The cache is
emptied whenever the model's parameters or buffers are modified in place through their
autograd version counters (an optimizer step, ``load_state_dict``, ``copy_``), replaced, or
whenever the autocast setting, the model's mode or its device changes. Writes through
``tensor.data`` bypass those counters: after one, call :meth:`PrefixCache.clear`
(:class:`~gigpo_torchrl.collector.GroupCollector` clears its policy's cache at the start
of every batch in any case).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor

from gigpo_torchrl.policy.stacked_kv import take_columns


class KeptPrompts:
    """The prompts of one prefill with their cache rows, which hold holes (masked padding).

    Args:
        tokens: U prompts' token ids.
        kv: every layer's keys and values, ``[L, U, H, W, D]`` each.
        mask: int64 ``[U, W]``, 1 where a column holds one of the row's prompt tokens (in
            order).
    """

    def __init__(self, tokens: Sequence[Sequence[int]], kv: tuple[Tensor, Tensor], mask):
        self.tokens = [tuple(t) for t in tokens]
        self.kv = kv
        # per row, the columns of its tokens (one copy to the host per prefill)
        mask = mask.cpu()
        columns, ends = mask.nonzero()[:, 1].tolist(), mask.sum(-1).cumsum(0).tolist()
        starts = [0, *ends[:-1]]
        self.columns = [columns[start:end] for start, end in zip(starts, ends, strict=True)]

    def openings(self, spans: Sequence[tuple[int, int]]) -> tuple[tuple[Tensor, Tensor], Tensor]:
        """Per ``(row, length)``: the keys and values of that kept prompt's first ``length``
        tokens, without holes, left-padded to the longest: every layer's, ``[L, n, H, w, D]``
        each, and the int64 ``[n, w]`` mask."""
        width = max(length for _, length in spans)
        keys, values = self.kv
        device = keys.device
        # built as lists, then one tensor each: no tensor operation per row
        index = [[0] * (width - n) + self.columns[row][:n] for row, n in spans]
        mask = [[0] * (width - n) + [1] * n for _, n in spans]
        index, mask = (torch.tensor(t, device=device) for t in (index, mask))
        rows = torch.tensor([row for row, _ in spans], device=device)[:, None]
        return (take_columns(keys, rows, index), take_columns(values, rows, index)), mask


def weights_key(model: torch.nn.Module) -> tuple:
    """What the kept keys and values depend on besides the tokens: each parameter's and
    buffer's storage and in-place version, the model's mode, and the autocast setting of
    its device type."""
    device = next(model.parameters()).device
    tensors = itertools.chain(model.parameters(), model.buffers())
    return (
        tuple((t.data_ptr(), t._version) for t in tensors),
        model.training,
        device,
        torch.is_autocast_enabled(device.type),
        torch.get_autocast_dtype(device.type),
    )


class PrefixCache:
    """The last prefill's prompts, kept for the next call of
    :func:`~gigpo_torchrl.policy.prefill.prefill_prompts` (see the module docstring).

    Attributes:
        kept: the prompts of the last prefill, or None.
        reused_tokens: prompt tokens taken from the kept rows instead of encoded, since
            construction (what the cache saved, for benchmarks and logs; counted against
            the prefix tree of each call's prompts, where a shared run is encoded once).
    """

    def __init__(self):
        self.kept: KeptPrompts | None = None
        self.reused_tokens = 0
        self._key: tuple | None = None

    def clear(self) -> None:
        """Forget the kept prompts."""
        self.kept = None
        self._key = None

    def valid_for(self, model: torch.nn.Module) -> KeptPrompts | None:
        """The kept prompts, forgotten first if ``model``'s weights (or the autocast setting)
        changed since they were kept."""
        key = weights_key(model)
        if key != self._key:
            self.kept = None
            self._key = key
        return self.kept

    def keep(self, kept: KeptPrompts) -> None:
        """Keep ``kept`` in place of the prompts kept before."""
        self.kept = kept
