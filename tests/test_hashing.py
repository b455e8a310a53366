"""Stable state hashes: equal states hash equal in every process and run."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from gigpo_torchrl.envs import normalize_text, stable_hash

STATE = ("room", (1, 2), {"boxes": [(3, 4)], "done": False}, np.arange(3, dtype=np.int8))
SCRIPT = (
    "import numpy as np; from gigpo_torchrl.envs import stable_hash; "
    "print(stable_hash(('room', (1, 2), {'done': False, 'boxes': [(3, 4)]}, "
    "np.arange(3, dtype=np.int8))))"
)


def test_same_hash_in_other_processes_whatever_their_hash_seed():
    expected = stable_hash(STATE)
    for salt in ("0", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=salt)
        out = subprocess.run(
            [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, check=True
        )
        assert int(out.stdout) == expected


def test_equal_values_hash_equal_and_different_ones_differ():
    assert stable_hash([1, 2]) == stable_hash((1, 2))
    assert stable_hash({"a": 1, "b": 2}) == stable_hash({"b": 2, "a": 1})
    assert stable_hash({3, 1, 2}) == stable_hash(frozenset([2, 3, 1]))
    assert stable_hash(torch.tensor([1, 2])) == stable_hash(np.array([1, 2]))
    assert stable_hash(np.int64(5)) == stable_hash(5)
    distinct = [0, 1, -1, "1", b"1", 1.0, True, None, (1,), [[1]], "", np.array([1], np.int32)]
    hashes = [stable_hash(v) for v in distinct]
    assert len(set(hashes)) == len(distinct)
    assert stable_hash(("ab", "c")) != stable_hash(("a", "bc"))


def test_hash_is_a_signed_int64():
    values = [stable_hash(i) for i in range(200)]
    assert all(-(2**63) <= v < 2**63 for v in values)
    assert any(v < 0 for v in values) and any(v > 0 for v in values)


def test_unhashable_states_are_named():
    with pytest.raises(TypeError, match="type object"):
        stable_hash(object())


def test_normalize_text_removes_layout_noise_only():
    assert normalize_text("\n  a   b \t c  \n\n d\n\n") == "a b c\n\nd"
    assert normalize_text("A") != normalize_text("a")
