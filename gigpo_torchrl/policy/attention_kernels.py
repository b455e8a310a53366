"""Which SDPA kernels forward calls of new shapes may use, by device type.

The prefill's calls (:mod:`~gigpo_torchrl.policy.prefill`), the update's packed sequences
and the frozen layers' encoding (:mod:`~gigpo_torchrl.policy.packing`) meet shapes that are
new at every batch. PyTorch keeps cuDNN's attention graphs in a cache keyed on the exact
batch size, query length and key length, and building one cost 1.6 ms of host time per
layer and call (profiled on an H200); so on CUDA those calls leave cuDNN's kernel out. The
decode steps, replayed from CUDA graphs at fixed shapes, keep SDPA's own choice.

Measured on an H200 (``benchmarks/bench_rollout.py`` and ``bench_update.py``, SmolLM2-135M's
shape): the prefills of 3 fresh Sokoban batches took 3.14, 2.84 and 2.58 s without cuDNN
against 4.28, 5.99 and 3.98 s with it (2.75, 3.57 and 2.47 s with its graphs built); the
updates of 3 fresh lake-walk batches 2.20 s without against 3.27 s with it (2.30 s built).
"""

from __future__ import annotations

import contextlib

from torch.nn.attention import SDPBackend, sdpa_kernel

# The kernels allowed, by device type (all where absent).
ATTENTION_BACKENDS: dict[str, list[SDPBackend]] = {
    "cuda": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
}


def attention_kernels(device_type: str):
    """A context limiting SDPA to :data:`ATTENTION_BACKENDS`' kernels for ``device_type``
    (no limit where it has none); a kernel the device cannot run fails loudly inside it."""
    backends = ATTENTION_BACKENDS.get(device_type)
    return sdpa_kernel(backends) if backends else contextlib.nullcontext()
