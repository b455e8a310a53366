"""The keys and values of shared prompt prefixes, kept from one sampler call to the next.

Every turn of an agent's episodes opens its prompts with the same text (the system prompt,
often the start of the task's format), and the prefix tree of a turn's prompts
(:mod:`~gigpo_torchrl.policy.prefill`) encodes that shared run once per turn. A
:class:`PrefixCache` keeps the cache rows of those shared runs, so that the next turn's
prompts continue them instead of encoding them again: on a GPU a turn's prefill is then one
forward call instead of two.

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
from dataclasses import dataclass

import torch
from torch import Tensor

# How many shared runs are kept (the most recently used): a batch's turns share one, and a
# few more cover runs that alternate (say, two prompt formats).
MAX_ENTRIES = 4


@dataclass(eq=False)  # entries are told apart by identity, never by comparing tensors
class CachedPrefix:
    """One kept run of prompt tokens, from a prompt's first token.

    Attributes:
        tokens: the run's token ids.
        kv: per layer, keys and values ``[1, H, len(tokens), D]``, as the model cached them.
    """

    tokens: tuple[int, ...]
    kv: list[tuple[Tensor, Tensor]]


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
    """Shared prompt runs kept between calls of
    :func:`~gigpo_torchrl.policy.prefill.prefill_prompts` (see the module docstring).

    Attributes:
        entries: the kept runs, least recently used first (at most ``max_entries``).
        reused_tokens: prompt tokens taken from the cache instead of encoded, since
            construction (what the cache saved, for benchmarks and logs).
    """

    def __init__(self, max_entries: int = MAX_ENTRIES):
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"max_entries={max_entries!r} must be a positive integer")
        self.max_entries = max_entries
        self.entries: list[CachedPrefix] = []
        self.reused_tokens = 0
        self._key: tuple | None = None

    def clear(self) -> None:
        """Forget every kept run."""
        self.entries.clear()
        self._key = None

    def valid_for(self, model: torch.nn.Module) -> list[CachedPrefix]:
        """The kept runs, emptied first if ``model``'s weights (or the autocast setting)
        changed since they were kept."""
        key = weights_key(model)
        if key != self._key:
            self.entries.clear()
            self._key = key
        return self.entries

    def used(self, entry: CachedPrefix, tokens: int) -> None:
        """Record that ``tokens`` leading tokens of ``entry`` were reused."""
        self.reused_tokens += tokens
        self.entries.remove(entry)
        self.entries.append(entry)

    def keep(self, tokens: Sequence[int], kv: list[tuple[Tensor, Tensor]]) -> None:
        """Keep a run (replacing a kept run of the same tokens), dropping the least
        recently used beyond ``max_entries``."""
        tokens = tuple(tokens)
        self.entries = [e for e in self.entries if e.tokens != tokens]
        self.entries.append(CachedPrefix(tokens, kv))
        del self.entries[: -self.max_entries]
