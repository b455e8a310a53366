"""The CPU examples run from start to end (the SmolLM2 one is the main job; vLLM needs a GPU)."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "expected"),
    [("train_sokoban_tiny.py", "iteration 4:"), ("custom_env.py", "You are at 0.")],
)
def test_example_runs(script, expected, tmp_path):
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert expected in out.stdout


def test_vllm_example_explains_itself_without_a_checkpoint():
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "train_vllm_qwen.py")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 1 and "vLLM rollouts on a GPU" in out.stderr
