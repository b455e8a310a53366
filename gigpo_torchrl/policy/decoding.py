"""Decode steps for :func:`~gigpo_torchrl.policy.sampling.sample_replies`, after the prompts'
prefill: one new token per active reply per step, returning the logits of the next.

Two ways, one interface (``keep`` the rows still active, ``step`` with their tokens):

- :class:`DynamicDecoder` writes each step into room kept after the prompts' cache and
  drops the rows of finished replies, so no compute is spent on them. Used on the CPU,
  where a step's cost is its arithmetic.
- :class:`StaticDecoder` writes into a preallocated cache of a fixed shape (batch and length
  rounded up to buckets) and, on a CUDA device, replays the step as a captured CUDA graph.
  A small model's decode step on a GPU is bound by launching its kernels (about 1,500 at
  SmolLM2-135M's 30 layers) one by one from Python, not by their arithmetic; a graph
  launches them all at once (2.3k -> 5.8k tokens/s measured on an H200, see the README).
  Finished rows stay in the batch and their outputs are ignored: the fixed shape lets one
  graph serve every step.
  Buffers and graphs are kept per model and reused by every later call with the same
  bucket; the storage grows (by half again at least) when a longer prompt comes, and the
  graphs are then captured again. The model's weights may change in place between calls
  (an optimizer step), not move (a new ``.to()`` or a replaced parameter starts afresh).
"""

from __future__ import annotations

import warnings
import weakref

import torch
from torch import Tensor

from gigpo_torchrl.policy import weight_copies
from gigpo_torchrl.policy.folded_attention import folding_gqa
from gigpo_torchrl.policy.masks import for_attention
from gigpo_torchrl.policy.stacked_kv import StackedKV, take_rows

# Batch sizes round up to a power of two from this one, cache lengths to a multiple of
# LENGTH_BUCKET tokens: a few buckets (and graphs) serve a whole run of growing prompts.
MIN_BATCH_BUCKET = 8
LENGTH_BUCKET = 128

# Decode steps a DynamicDecoder makes room for at first (more as replies grow).
INITIAL_ROOM = 64


class DynamicDecoder:
    """Decode steps on a cache holding one row per active reply, each step's keys and
    values written in place into storage with room for the next steps (a ``DynamicCache``
    concatenates, copying the whole cache at every step: on a CPU at 64 rows of 360 tokens
    that took longer than the step's attention). The room grows by half again when used
    up (up to ``max_new_tokens`` steps), so a long limit costs no memory until replies
    reach it. The rows of finished replies are dropped, so no compute is spent on them.

    Args:
        model: the causal LM that filled ``prompts``.
        prompts: the prompts' cache rows, every layer's keys and values ``[L, U, H, width, D]``
            (:data:`~gigpo_torchrl.policy.stacked_kv.StackedKV`), one per distinct prompt.
        rows: int64 ``[R]``: the ``prompts`` row each reply continues.
        mask: int64 ``[R, width]``, 1 where a cached position is a real token.
        max_new_tokens: decode steps at most.
        cache_keyword: the model's name for the cache argument.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        prompts: StackedKV,
        rows: Tensor,
        mask: Tensor,
        max_new_tokens: int,
        cache_keyword: str,
    ):
        self.model, self.cache_keyword = model, cache_keyword
        self.copies = weight_copies.tensors(model)
        self.prompts, self.rows = prompts, rows
        count, self.width = mask.shape
        self.limit = self.width + max_new_tokens
        # made at the first step: replies forced to their end (one-token actions) never step
        self.kv: GrowingKV | None = None
        # [R, 1, 1, width + max_new_tokens] boolean: true where a row attends
        self.attend = torch.zeros(count, 1, 1, self.limit, dtype=torch.bool, device=mask.device)
        self.attend[:, 0, 0, : self.width] = mask.bool()
        self.positions = mask.sum(-1, keepdim=True) - 1

    def keep(self, rows: Tensor) -> None:
        """Keep only the active rows at indices ``rows`` (int64, on the model's device)."""
        if self.kv is None:
            self.rows = self.rows[rows]
        else:
            self.kv.keys = [k[rows] for k in self.kv.keys]
            self.kv.values = [v[rows] for v in self.kv.values]
        self.attend, self.positions = self.attend[rows], self.positions[rows]

    def step(self, token: Tensor) -> Tensor:
        """Feed int64 ``[rows]`` tokens; return the float ``[rows, V]`` next-token logits."""
        if self.kv is None:
            room = min(self.limit, self.width + INITIAL_ROOM)
            keys, values = (_widened(take_rows(t, self.rows), room) for t in self.prompts)
            self.kv = GrowingKV(list(keys.unbind()), list(values.unbind()), self.width)
            self.prompts = None
        end = self.kv.length + 1
        if end > self.kv.keys[0].shape[2]:
            room = min(self.limit, end + self.kv.length // 2)
            self.kv.keys = [_widened(k[:, :, : self.kv.length], room) for k in self.kv.keys]
            self.kv.values = [_widened(v[:, :, : self.kv.length], room) for v in self.kv.values]
        self.attend[:, 0, 0, end - 1] = True
        self.positions = self.positions + 1
        out = weight_copies.call(
            self.model,
            self.copies,
            input_ids=token[:, None],
            attention_mask=for_attention(self.model.config, self.attend[..., :end]),
            position_ids=self.positions,
            use_cache=True,
            **{self.cache_keyword: self.kv},
        )
        self.kv.length = end
        return out.logits[:, -1].float()


def _widened(filled: Tensor, length: int) -> Tensor:
    """``filled`` ``[..., n, D]`` copied into the first ``n`` positions of a new
    ``[..., length, D]`` tensor (the rest uninitialised)."""
    out = filled.new_empty(*filled.shape[:-2], length, filled.shape[-1])
    out[..., : filled.shape[-2], :] = filled
    return out


class GrowingKV:
    """The cache a transformers attention layer writes to through ``update``: per layer,
    keys and values ``[B, H, capacity, D]`` of which the first ``length`` positions are
    filled; a step's keys and values go in at ``length`` and attention reads the positions
    up to them (``length`` moves on once every layer has written: see
    :class:`DynamicDecoder`)."""

    def __init__(self, keys: list[Tensor], values: list[Tensor], length: int):
        self.keys, self.values, self.length = keys, values, length

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        end = self.length + key_states.shape[2]
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[:, :, self.length : end] = key_states
        values[:, :, self.length : end] = value_states
        return keys[:, :, :end], values[:, :, :end]


class StaticKV:
    """The cache a transformers attention layer writes to through ``update``: per layer,
    keys and values ``[B, H, L, D]``, the new token's written at position ``slot`` (an int64
    ``[1]`` device tensor, so that one captured graph serves every step).

    Under bfloat16 autocast the keys and values are kept in bfloat16, which attention casts
    them to anyway: that changes no result and halves what each step reads.
    """

    def __init__(self, keys: list[Tensor], values: list[Tensor], slot: Tensor):
        self.keys, self.values, self.slot = keys, values, slot

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys.index_copy_(2, self.slot, key_states.to(keys.dtype))
        values.index_copy_(2, self.slot, value_states.to(values.dtype))
        return keys, values


class _Bucket:
    """The inputs, cache views and graph of one (batch, length) bucket: a captured graph
    reads these very tensors, so every decoder of the bucket fills them in place."""

    def __init__(self, store: _Store, batch: int, length: int):
        device = store.device
        keys, values = [], []
        for (k_flat, v_flat), (heads, k_dim, v_dim) in zip(
            store.storage, store.layout[0], strict=True
        ):
            # the first elements of the layer's storage, as a contiguous cache
            keys.append(k_flat[: batch * heads * length * k_dim].view(batch, heads, length, k_dim))
            values.append(
                v_flat[: batch * heads * length * v_dim].view(batch, heads, length, v_dim)
            )
        self.kv = StaticKV(keys, values, torch.zeros(1, dtype=torch.long, device=device))
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        # [B, 1, 1, L] boolean: true where a row attends
        self.attend = torch.zeros(batch, 1, 1, length, dtype=torch.bool, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor | None = None  # the captured step's output
        self.captured_as: tuple | None = None  # the decoder's ``way`` when captured


class _Store:
    """One model's static cache storage, sized for the largest bucket asked for so far,
    and its buckets. Valid while the model's parameters stay where they are and the cache
    layout (per layer: heads, key and value dims; the dtype) stays the same."""

    def __init__(self, params: tuple, layout: tuple, batch: int, length: int, device):
        self.params, self.layout, self.batch, self.length = params, layout, batch, length
        self.device = device
        per_layer, dtype = layout
        self.storage = [
            (
                torch.zeros(batch * heads * length * k_dim, dtype=dtype, device=device),
                torch.zeros(batch * heads * length * v_dim, dtype=dtype, device=device),
            )
            for heads, k_dim, v_dim in per_layer
        ]
        self.buckets: dict[tuple[int, int], _Bucket] = {}
        self.pool = None  # the graphs' shared memory pool (they never run at once)
        self.capture_failed = False

    def bucket(self, batch: int, length: int) -> _Bucket:
        if (batch, length) not in self.buckets:
            self.buckets[batch, length] = _Bucket(self, batch, length)
        return self.buckets[batch, length]


_STORES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def held_bytes(model: torch.nn.Module) -> int:
    """Bytes that the sampler keeps for ``model`` between calls (and so through an update):
    :class:`StaticDecoder`'s cache storage (its captured graphs' memory pool comes on top,
    on a CUDA device) and, under autocast, the weight copies of
    :mod:`~gigpo_torchrl.policy.weight_copies`; 0 when it keeps none."""
    store = _STORES.get(model)
    tensors = [t for pair in store.storage for t in pair] if store is not None else []
    return sum(t.numel() * t.element_size() for t in tensors) + weight_copies.held_bytes(model)


def release(model: torch.nn.Module) -> None:
    """Drop what the sampler keeps for ``model`` (see :func:`held_bytes`); the next call
    allocates it again (and captures its graphs again)."""
    _STORES.pop(model, None)
    weight_copies.release(model)


def _store_for(model, layout: tuple, batch: int, length: int, device) -> _Store:
    params = tuple(p.data_ptr() for p in model.parameters())
    store = _STORES.get(model)
    if store is not None and (store.params, store.layout) == (params, layout):
        if batch <= store.batch and length <= store.length:
            return store
        # grow (the old graphs go, to be captured again): lengths by half again at least,
        # since prompts that carry an episode's history grow turn after turn
        batch = max(batch, store.batch)
        length = max(length, _bucket(batch, store.length * 3 // 2)[1])
    _STORES.pop(model, None)
    del store  # its memory is free before the new storage is taken
    _STORES[model] = _Store(params, layout, batch, length, device)
    return _STORES[model]


def _bucket(batch: int, length: int) -> tuple[int, int]:
    rows = max(MIN_BATCH_BUCKET, 1 << (batch - 1).bit_length())
    return rows, -(-length // LENGTH_BUCKET) * LENGTH_BUCKET


def _decode_forward(model, cache_keyword, ids, attend, positions, kv, copies) -> Tensor:
    """One decode step's forward: ``[B, V]`` logits (the weight ``copies``, name -> tensor,
    in place of the weights when given: :func:`~gigpo_torchrl.policy.weight_copies.call`)."""
    out = weight_copies.call(
        model,
        copies,
        input_ids=ids,
        attention_mask=for_attention(model.config, attend),
        position_ids=positions,
        use_cache=True,
        **{cache_keyword: kv},
    )
    return out.logits[:, -1]


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _compiled(model):
    """``_decode_forward`` through ``torch.compile`` (one per model): its elementwise ops
    fused into a few kernels per layer. Compiled with dynamic shapes, so that every bucket
    uses the one compilation."""
    if model not in _COMPILED:
        _COMPILED[model] = torch.compile(_decode_forward, dynamic=True)
    return _COMPILED[model]


class StaticDecoder:
    """Decode steps on a static cache, replayed as a CUDA graph on a CUDA device.

    Args:
        model: the causal LM that filled ``prompts``.
        prompts: the prompts' cache rows, every layer's keys and values ``[L, U, H, width, D]``
            (:data:`~gigpo_torchrl.policy.stacked_kv.StackedKV`), one per distinct prompt.
        rows: int64 ``[R]``: the ``prompts`` row each reply continues.
        mask: int64 ``[R, width]``, 1 where a cached position is a real token.
        max_new_tokens: decode steps at most.
        cache_keyword: the model's name for the cache argument.
        capture: replay steps as a CUDA graph (default: when the model is on a CUDA device).
        compile: run each step's forward through ``torch.compile`` (fused kernels; the first
            steps compile, which takes a while), its attention on the key-value heads as
            stored (:mod:`~gigpo_torchrl.policy.folded_attention`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        prompts: StackedKV,
        rows: Tensor,
        mask: Tensor,
        max_new_tokens: int,
        cache_keyword: str,
        capture: bool | None = None,
        compile: bool = False,
    ):
        device = mask.device
        self.compile = compile
        self.model, self.cache_keyword = model, cache_keyword
        capture = device.type == "cuda" if capture is None else capture
        enabled = torch.is_autocast_enabled(device.type)
        self.autocast = (enabled, torch.get_autocast_dtype(device.type) if enabled else None)
        count, self.width = mask.shape
        batch, length = _bucket(count, self.width + max_new_tokens)
        keys, values = prompts
        layout = (
            ((keys.shape[2], keys.shape[4], values.shape[4]),) * len(keys),
            self.autocast[1] or keys.dtype,
        )
        self.store = _store_for(model, layout, batch, length, device)
        # under autocast the graphs read these copies of the weights (refreshed in place)
        copies = weight_copies.copies(model)
        self.copies = copies.tensors if copies is not None else None
        # what a captured graph depends on besides its bucket's tensors
        self.way = (self.autocast, compile, copies.generation if copies is not None else None)
        self.bucket = self.store.bucket(batch, length)
        self.capture = capture and not self.store.capture_failed
        b = self.bucket
        keys, values = take_rows(keys, rows), take_rows(values, rows)
        for k_view, v_view, k, v in zip(b.kv.keys, b.kv.values, keys, values, strict=True):
            k_view[:count, :, : self.width] = k
            v_view[:count, :, : self.width] = v
        b.positions.zero_()
        b.positions[:count, 0] = mask.sum(-1) - 1
        b.attend.zero_()
        b.attend[:count, 0, 0, : self.width] = mask.bool()
        # the bucket's spare rows attend to their first position, keeping their softmax finite
        b.attend[count:, 0, 0, 0] = True
        self.slots = torch.arange(count, device=device)  # active row -> bucket row
        self.steps = 0

    def keep(self, rows: Tensor) -> None:
        """Keep only the active rows at indices ``rows`` (int64, on the model's device)."""
        self.slots = self.slots[rows]

    def step(self, token: Tensor) -> Tensor:
        """Feed int64 ``[rows]`` tokens; return the float ``[rows, V]`` next-token logits."""
        b, position = self.bucket, self.width + self.steps
        b.ids[self.slots, 0] = token
        b.positions += 1
        b.attend[:, 0, 0, position] = True
        b.kv.slot.fill_(position)
        self.steps += 1
        if not self.capture:
            logits = self._forward()
        elif b.graph is not None and b.captured_as == self.way:
            b.graph.replay()
            logits = b.logits
        else:
            try:
                self._capture()
                logits = b.logits
            except RuntimeError as error:  # an op the graph cannot hold: decode without
                warnings.warn(
                    f"CUDA graph capture failed, decoding step by step from now on: {error}",
                    stacklevel=2,
                )
                self.store.capture_failed, self.capture = True, False
                logits = self._forward()
        return logits[self.slots].float()

    def _forward(self) -> Tensor:
        b = self.bucket
        inputs = (self.model, self.cache_keyword, b.ids, b.attend, b.positions, b.kv, self.copies)
        if not self.compile:
            return _decode_forward(*inputs)
        # traced, transformers' SDPA would copy the cache out to every query head
        with folding_gqa(self.model):
            return _compiled(self.model)(*inputs)

    def _capture(self) -> None:
        """Capture one step into the bucket's graph and run it (this step's outputs)."""
        b = self.bucket
        enabled, dtype = self.autocast
        # autocast's cast cache would keep tensors of the graph's memory pool
        cast = torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False)
        with torch.cuda.device(b.ids.device):  # streams and graphs of the model's GPU
            warm = torch.cuda.Stream()
            warm.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(warm), cast:
                self._forward()  # lazy set-up (cuBLAS workspaces, kernels) outside capture
            torch.cuda.current_stream().wait_stream(warm)
            if self.store.pool is None:
                self.store.pool = torch.cuda.graph_pool_handle()
            b.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(b.graph, pool=self.store.pool), cast:
                b.logits = self._forward()
            b.captured_as = self.way
            b.graph.replay()
