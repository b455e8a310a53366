"""benchmarks/compare_estimators.py: the tiny configuration end to end, and its summary."""

import csv
import importlib.util
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_estimators.py"
COLUMNS = [
    "env",
    "estimator",
    "norm",
    "step_advantage_weight",
    "seed",
    "iteration",
    "env_steps",
    "success_rate",
    "mean_return",
    "singleton_fraction",
]


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("compare_estimators", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_tiny_comparison_writes_csv_summary_and_figure(compare, tmp_path, capsys):
    compare.main(["--tiny", "--out-dir", str(tmp_path)])
    with (tmp_path / "compare_small.csv").open() as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames[: len(COLUMNS)] == COLUMNS
        rows = list(reader)
    settings = {(r["estimator"], r["norm"], float(r["step_advantage_weight"])) for r in rows}
    assert settings == {
        ("grpo", "std", 0.0),
        ("rloo", "none", 0.0),
        ("gigpo", "std", 1.0),
        ("gigpo", "none", 1.0),
        ("gigpo", "std", 0.5),
    }
    assert {r["seed"] for r in rows} == {"0"} and {r["env"] for r in rows} == {"frozenlake-4x4"}
    for estimator, norm, weight in settings:
        run = [
            r
            for r in rows
            if (r["estimator"], r["norm"], float(r["step_advantage_weight"]))
            == (estimator, norm, weight)
        ]
        assert [int(r["iteration"]) for r in run] == list(range(len(run)))
        steps = [int(r["env_steps"]) for r in run]
        assert len(run) >= 2 and steps == sorted(steps) and steps[-1] >= 600
    for r in rows:
        assert 0 <= float(r["success_rate"]) <= 1
        assert 0 <= float(r["singleton_fraction"]) <= 1
        assert 0 < float(r["advantage_time_share"]) < 1
    with (tmp_path / "compare_small_summary.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 5
    assert (tmp_path / "compare_small.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "| env | setting | final success |" in out and "gigpo-w0.5" in out


def test_summary_reports_steps_to_target_and_standard_errors(compare):
    def run(seed, successes, setting="gigpo"):
        return [
            {
                "env": "toy",
                "setting": setting,
                "estimator": setting,
                "norm": "std",
                "step_advantage_weight": 1.0,
                "seed": seed,
                "iteration": i,
                "env_steps": 1000 * (i + 1),
                "success_rate": s,
                "singleton_fraction": 0.25,
                "advantage_time_share": 0.01,
                "iteration_s": 0.1,
            }
            for i, s in enumerate(successes)
        ]

    rows = run(0, [0, 0, 1, 1, 1, 1, 1, 1, 1, 1]) + run(1, [0] * 10)
    rows += run(0, [0.1] * 10, "grpo") + run(1, [0.1] * 10, "grpo")
    summary, grpo = compare.summarize(rows, {"toy": 0.5}, window=2)
    assert (summary["setting"], grpo["setting"], grpo["reached_target"]) == ("gigpo", "grpo", 0)
    # paired by seed: 0.8 - 0.1 and 0 - 0.1
    assert summary["mean_success_vs_grpo"] == pytest.approx(0.3)
    assert summary["mean_success_vs_grpo_se"] == pytest.approx(0.4)
    assert summary["mean_success_vs_grpo_wins"] == 1
    # seed 0: trailing 2-iteration mean is 0.5 at iteration 2 (3000 steps); seed 1 never
    assert summary["reached_target"] == 1
    assert summary["env_steps_to_target"] == 3000
    assert summary["final_success"] == pytest.approx(0.5)  # last 10 %: 1 and 0
    assert summary["final_success_se"] == pytest.approx(0.5)
    assert summary["singleton_fraction"] == pytest.approx(0.25)
    assert math.isclose(summary["mean_success"], 0.4)
    table = compare.format_summary([summary, grpo])
    assert "| +0.30 ± 0.40 (1/2) | 3k ± 0k (1/2 ≥ 0.50) |" in table
    assert "| — | — (0/2 ≥ 0.50) |" in table


@pytest.mark.slow
def test_tiny_llm_comparison_records_validation_before_and_after(compare, tmp_path, capsys):
    compare.main(["--path", "llm", "--tiny", "--out-dir", str(tmp_path)])
    rows = compare.read_csv(tmp_path / "compare_llm.csv")
    assert list(rows[0])[: len(COLUMNS)] == COLUMNS
    assert {r["setting"] for r in rows} == {"grpo", "gigpo"}
    assert [r["iteration"] for r in rows if r["setting"] == "gigpo"] == [1, 2]
    # the validation before any update, then after the last iteration
    assert all(0 <= r["val_success_before"] <= 1 for r in rows)
    assert [r["val_success_rate"] == "" for r in rows if r["setting"] == "grpo"] == [True, False]
    assert "| gigpo | 1 |" in capsys.readouterr().out
