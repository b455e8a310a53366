"""Stable 64-bit state hashes: the same state hashes the same in every process and run.

Python's ``hash`` is salted per process for strings, so it cannot identify anchor states
across rollout workers. Values are encoded to canonical, type-tagged bytes and hashed with
BLAKE2b (8-byte digest) into a signed int64.
"""

from __future__ import annotations

import hashlib
import re
import struct
from typing import Any

import numpy as np

_SPACES = re.compile(r"[ \t]+")


def normalize_text(text: str) -> str:
    """Observation text with layout noise removed: runs of spaces/tabs become one space,
    lines are stripped, blank lines at the start and end are dropped."""
    lines = [_SPACES.sub(" ", line).strip() for line in text.splitlines()]
    return "\n".join(lines).strip("\n")


def _encode(value: Any, out: list[bytes]) -> None:
    if value is None:
        out.append(b"N")
    elif isinstance(value, bool | np.bool_):
        out.append(b"T" if value else b"F")
    elif isinstance(value, int | np.integer):
        text = str(int(value)).encode()
        out.append(b"I%d:" % len(text) + text)
    elif isinstance(value, float | np.floating):
        out.append(b"D" + struct.pack("<d", float(value)))
    elif isinstance(value, str):
        data = value.encode("utf-8", "surrogatepass")
        out.append(b"S%d:" % len(data) + data)
    elif isinstance(value, bytes | bytearray):
        out.append(b"B%d:" % len(value) + bytes(value))
    elif isinstance(value, np.ndarray):
        array = np.ascontiguousarray(value)
        out.append(b"A" + array.dtype.str.encode() + repr(array.shape).encode() + b":")
        out.append(array.tobytes())
    elif hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor
        _encode(value.detach().cpu().numpy(), out)
    elif isinstance(value, tuple | list):
        out.append(b"L%d:" % len(value))
        for item in value:
            _encode(item, out)
    elif isinstance(value, dict):
        out.append(b"M%d:" % len(value))
        for key_bytes, item in sorted((stable_bytes(k), v) for k, v in value.items()):
            out.append(key_bytes)
            _encode(item, out)
    elif isinstance(value, set | frozenset):
        out.append(b"E%d:" % len(value))
        out.extend(sorted(stable_bytes(item) for item in value))
    else:
        raise TypeError(
            f"cannot hash a state of type {type(value).__name__}: return str, bytes, numbers, "
            "numpy arrays, or tuples/lists/dicts/sets of them from TextGame.state()"
        )


def stable_bytes(value: Any) -> bytes:
    """The canonical byte encoding of ``value`` (see :func:`stable_hash`)."""
    out: list[bytes] = []
    _encode(value, out)
    return b"".join(out)


def stable_hash(value: Any) -> int:
    """A signed 64-bit hash of ``value`` that is the same in every process and run.

    Equal values hash equal: ``[1, 2]`` and ``(1, 2)`` are the same sequence, dict and set
    order does not matter, numpy arrays hash by dtype, shape and content.

    Raises:
        TypeError: for values without a canonical encoding (arbitrary objects).
    """
    digest = hashlib.blake2b(stable_bytes(value), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)
