"""Checkpoint files that cannot run code, and the run-folder rules of ``gigpo-train``.

``checkpoint.pt`` is read with ``torch.load(weights_only=True)``: tensors, numbers, strings,
lists, tuples and dicts only, so a file from elsewhere cannot execute anything when it is
loaded. Everything the trainer stores is kept in those forms (the numpy RNG state as a
list, not an array).
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: what a run writes into its folder (``--overwrite`` removes exactly these)
RUN_FILES = (
    "checkpoint.pt",
    "checkpoint.tmp",
    "metrics.jsonl",
    "curves.png",
    "config.yaml",
    "model",
    "scalars",  # torchrl's CSV logger
    "texts",
    "videos",
    "wandb",
)
#: tensorboard's event files, also removed by ``--overwrite``
EVENT_FILES = "events.out.tfevents.*"


def run_files(run_dir: Path) -> list[str]:
    """The names in ``run_dir`` that a training run wrote there (sorted)."""
    if not run_dir.is_dir():
        return []
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    found += [path.name for path in run_dir.glob(EVENT_FILES)]
    return sorted(found)


def clear_run(run_dir: Path) -> None:
    """Delete what :func:`run_files` lists (and nothing else the folder holds)."""
    for name in run_files(run_dir):
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def read_checkpoint(path: Path, *, mmap: bool = True) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``, tensors on the CPU; ``mmap``: read
    tensors lazily from the file, which makes a check of a large checkpoint quick).

    Raises:
        ValueError: one line saying why the file is not a readable checkpoint (truncated,
            corrupted, not a checkpoint, or holding objects other than tensors and plain
            data, which could run code when unpickled).
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (Exception, MemoryError) as error:  # whatever fails, the file is at fault
        raise ValueError(f"{path} is not a readable checkpoint: {_reason(error)}") from None
    if not isinstance(state, dict) or not {"iteration", "model", "rng"} <= set(state):
        raise ValueError(f"{path} is not a gigpo-train checkpoint (missing its entries)")
    return state


def _reason(error: BaseException) -> str:
    """One line for why ``torch.load`` failed (its weights-only messages run to a page)."""
    text = str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "Weights only load failed" in text:
        boilerplate = (
            "Weights only load failed",
            "Please file an issue",
            "Check the documentation",
        )
        detail = next((x for x in lines if not x.startswith(boilerplate)), "")
        if "GLOBAL" in detail:
            return (
                f"it holds Python objects other than tensors and plain data ({detail}); "
                "loading those could run code, so it is refused"
            )
        return f"corrupted ({detail or 'not a pickle torch can read'})"
    if isinstance(error, MemoryError):
        return "corrupted (it claims more memory than there is)"
    return f"{type(error).__name__}" + (f": {lines[0][:300]}" if lines else "")


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) RNG states in forms ``weights_only`` loading accepts."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"] = {
        "key": numpy_state["state"]["key"].tolist(),
        "pos": int(numpy_state["state"]["pos"]),
    }
    return {
        "python": random.getstate(),
        "numpy": numpy_state,
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    numpy_state = dict(state["numpy"])
    numpy_state["state"] = {
        "key": np.asarray(numpy_state["state"]["key"], dtype=np.uint32),
        "pos": numpy_state["state"]["pos"],
    }
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomically(state: dict[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary file, then rename: a killed save leaves the old file."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
