"""Argument checks shared by every environment entry point: seeds and batch sizes.

Seeds are checked here once, for every env (registered, ``gym:``, PettingZoo, ms-swift or
a user's own ``TextGame``): a game's ``reset`` always receives a Python ``int`` in
``[0, 2**63)``.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

MAX_SEED = 2**63  # exclusive: seeds travel as int64 tensors


def check_seed(value: object, name: str = "seed") -> int:
    """``value`` as an ``int`` in ``[0, 2**63)``; ``ValueError`` naming it otherwise.

    Integers of any kind (``int``, numpy integers, one-element integer tensors) are accepted;
    ``bool``, floats (even ``3.0``), strings and anything else are refused.
    """
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not _bad_dtype(value):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}={value!r} must be an integer in [0, 2**63)")
    value = int(value)
    if not 0 <= value < MAX_SEED:
        raise ValueError(f"{name}={value!r} must be an integer in [0, 2**63)")
    return value


def _bad_dtype(tensor: torch.Tensor) -> bool:
    return tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool


def check_seeds(seeds: object, batch: int) -> list[int]:
    """The ``batch`` seeds of a reset TensorDict's ``"seed"`` entry, each checked.

    Accepts an integer tensor of ``batch`` elements (any shape that flattens to it) or a
    sequence of ``batch`` integers.
    """
    if isinstance(seeds, torch.Tensor):
        if _bad_dtype(seeds):
            raise ValueError(f"seed must hold integers, got a {seeds.dtype} tensor: {seeds}")
        values = seeds.reshape(-1).tolist()
    elif isinstance(seeds, Sequence) and not isinstance(seeds, str):
        values = list(seeds)
    else:
        raise ValueError(f"seed must be an integer tensor of {batch} seeds, got {seeds!r}")
    if len(values) != batch:
        raise ValueError(f"seed has {len(values)} values for a batch of {batch}")
    return [check_seed(v) for v in values]


def check_batch_size(value: object) -> int:
    """The number of elements of a one-dimensional batch: an int, ``[n]`` or ``torch.Size([n])``.

    Text environments batch along one dimension, as torchrl's ``batch_size`` arguments are
    written: ``3``, ``[3]``, ``(3,)`` and ``torch.Size([3])`` all mean 3 elements.
    """
    size = value
    if isinstance(size, Sequence) and not isinstance(size, str):
        if len(size) != 1:
            raise ValueError(
                f"batch_size={value!r}: text environments batch along one dimension; "
                "give an int or a one-element list such as [3]"
            )
        (size,) = size
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
        raise ValueError(f"batch_size={value!r} must be a positive integer (or [n], torch.Size)")
    return int(size)
