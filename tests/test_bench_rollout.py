"""benchmarks/bench_rollout.py: its counts by hand, and the tiny configuration end to end."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_rollout.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_rollout", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prefill_counts_by_hand(bench):
    system = [1] * 10
    a, b = torch.tensor(system + [2, 3]), torch.tensor(system + [4])
    counts = bench.prefill_tokens([[a, b, a]], "cpu")
    assert counts["lock-step (padded)"] == 3 * 12
    assert counts["every prompt"] == 12 + 11 + 12
    assert counts["distinct prompts"] == 12 + 11
    # the shared 10 once, then both remainders padded to 2
    assert counts["one shared prefix"] == 10 + 2 * 2
    # the tree: the shared run, then both branches in one call (padding 1 < a call's cost)
    assert (counts["sampler"], counts["sampler calls"]) == (10 + 2 * 2, 2)


@pytest.mark.slow
def test_tiny_configuration_runs_and_prints_its_ratios():
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", "tiny", "--env", "lake-walk", "--groups", "2"]
        + ["--generations", "2", "--max-steps", "2", "--max-new-tokens", "4", "--no-cb"]
        + ["--dtype", "bfloat16", "--rounds", "2"],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout
    assert "sample_replies (prefix-tree prefill)" in out
    assert "no shared runs" in out
    assert "no prompts kept between turns" in out
    assert "prefill calls copying the cached rows (transformers' cache)" in out
    assert "(no weight copies)" in out  # under autocast, with the LM head frozen
    for part in ("weight copies", "prefill rows written in place"):
        turns = rf"^{part}, sample_replies in 3 rounds .+: with [\d.]+s, without [\d.]+s "
        turns += r"\([\d.]+x\)$"
        assert re.search(turns, out, re.MULTILINE), part
    # the second turn continued the first turn's prompts
    kept = re.search(r"^prompts kept between turns: (\d+) prompt tokens", out, re.MULTILINE)
    assert kept and int(kept.group(1)) > 0
    # the collector's second, warm run replays its first batch: the same replies
    first = re.search(r"^GroupCollector, first batch \(warm-ups\)\s+(\d+)", out, re.MULTILINE)
    again = re.search(r"^GroupCollector \(sample_replies \+ envs\)\s+(\d+)", out, re.MULTILINE)
    assert first and again and first.group(1) == again.group(1)
    assert re.search(r"^fastest sampler: .+, [\d.]+x lock-step$", out, re.MULTILINE)
    assert re.search(r"per-environment turns [\d.]+s \([\d.]+x\)", out)
    assert re.search(r"concatenating DynamicCache \d+ ms, the sampler's decoder \d+ ms", out)
    assert re.search(r"^token draw at \d+ rows of \d+: torch.multinomial [\d.]+ ms, ", out, re.M)
    # under bfloat16 autocast on a CPU, both ways again in float32 (the first wave's precision)
    assert re.search(r"^lock-step model.generate, float32\s+\d+", out, re.MULTILINE)
    assert re.search(r"^sample_replies, float32\s+\d+", out, re.MULTILINE)
    assert re.search(r"^bfloat16 autocast against float32: lock-step [\d.]+x, ", out, re.MULTILINE)
    # --rounds 2: both ways timed twice more, taking turns; the table shows their medians and
    # the speed-up is their ratio (same tokens both ways: the rows' token counts)
    rounds = re.search(
        r"^in 2 rounds taking turns: lock-step ([\d.]+), ([\d.]+)s; "
        r"sample_replies ([\d.]+), ([\d.]+)s \(their table rows and the ratios: medians\)$",
        out,
        re.MULTILINE,
    )
    assert rounds
    lock_s, sampler_s = (float(rounds[i]) + float(rounds[i + 1]) for i in (1, 3))
    row = r"^{}\s+(\d+)\s+([\d.]+) "
    lock = re.search(row.format(re.escape("lock-step model.generate (first wave)")), out, re.M)
    ours = re.search(row.format(re.escape("sample_replies (prefix-tree prefill)")), out, re.M)
    assert abs(float(lock[2]) - lock_s / 2) <= 0.006
    assert abs(float(ours[2]) - sampler_s / 2) <= 0.006
    # the speed-up is their ratio, within what the rounds' printing to 0.01 s allows
    speed_up = re.search(r"^rollout speed-up: ([\d.]+)x$", out, re.MULTILINE)
    tokens = int(ours[1]) / int(lock[1])
    low = tokens * (lock_s / 2 - 0.005) / (sampler_s / 2 + 0.005)
    high = tokens * (lock_s / 2 + 0.005) / (sampler_s / 2 - 0.005)
    assert speed_up and low - 0.005 <= float(speed_up[1]) <= high + 0.005
