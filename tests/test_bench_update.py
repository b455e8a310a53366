"""benchmarks/bench_update.py end to end on the tiny model: its table and its lines."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_update.py"


@pytest.mark.slow
def test_tiny_configuration_prints_both_schemes_the_fresh_batch_and_frozen_layer_lines():
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", "tiny", "--env", "lake-walk", "--groups", "2"]
        + ["--generations", "2", "--max-steps", "2", "--max-new-tokens", "4", "--repeats", "1"]
        + ["--fresh-batches", "2", "--train-layers", "1", "--mini-batch-size", "2"],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout
    head = re.search(r"^tiny, lake-walk: (\d+) step rows, (\d+) tokens", out, re.MULTILINE)
    assert head, out
    row_tokens = int(head.group(2))
    fresh = re.search(
        r"^updates of 2 fresh batches \((\d+) row tokens, bfloat16 autocast\): every SDPA "
        r"kernel .+ [\d.]+s, again .+ [\d.]+s; the update's own .+ [\d.]+s$",
        out,
        re.MULTILINE,
    )
    assert fresh, out
    # two other batches of the same game and shape: of the same order of tokens, not the same
    assert int(fresh.group(1)) != 2 * row_tokens and int(fresh.group(1)) > row_tokens
    rows = {
        label: (float(seconds), int(rate), float(padding))
        for label, seconds, rate, padding in re.findall(
            r"^(before|after): .+?\s+([\d.]+)\s+(\d+)\s+([\d.]+)%$", out, re.MULTILINE
        )
    }
    assert set(rows) == {"before", "after"}
    # tokens/s is the row tokens over the seconds (printed to 0.01 s: within that rounding)
    for seconds, rate, _ in rows.values():
        assert row_tokens / (seconds + 0.005) - 1 <= rate <= row_tokens / (seconds - 0.005) + 1
    # the packed scheme shares prompts: fewer positions than the rows' tokens
    packed = re.search(r"after: \d+ micro-batches, (\d+) positions processed for (\d+)", out)
    assert packed and int(packed.group(1)) < int(packed.group(2)) == row_tokens
    frozen = re.search(
        r"^frozen layers encoded once \(1 of 2 layers, mini-batches of 2 random rows, "
        r"(?:bfloat16 autocast|float32), medians of 1 taking turns\): once ([\d.]+)s, in every "
        r"mini-batch ([\d.]+)s \(([\d.]+)x\); positions through the frozen layers: (\d+) "
        r"once, (\d+) in the mini-batches$",
        out,
        re.MULTILINE,
    )
    assert frozen, out
    once_s, every_s, ratio = (float(frozen.group(i)) for i in (1, 2, 3))
    assert (every_s - 0.005) / (once_s + 0.005) - 0.005 <= ratio
    assert ratio <= (every_s + 0.005) / max(once_s - 0.005, 1e-9) + 0.005
    # the rows' shared openings go through the frozen layer once, not in each mini-batch
    assert 0 < int(frozen.group(4)) < int(frozen.group(5))
    last = out.strip().splitlines()[-1]
    speed = re.fullmatch(r"update speed-up: ([\d.]+)x, padding: ([\d.]+)%", last)
    assert speed, last
    before_s, after_s = rows["before"][0], rows["after"][0]
    low, high = (before_s - 0.005) / (after_s + 0.005), (before_s + 0.005) / (after_s - 0.005)
    assert low - 0.005 <= float(speed.group(1)) <= high + 0.005
    assert float(speed.group(2)) == rows["after"][2]
