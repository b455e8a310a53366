"""The CPU examples run from start to end (the SmolLM2 one is the main job; vLLM needs a GPU)."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("train_sokoban_tiny.py", "iteration 4:"),
        ("custom_env.py", "You are at 0."),
        ("pettingzoo_game.py", "Sticks left:"),
    ],
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


def test_pettingzoo_example_is_a_standard_pettingzoo_env_and_a_text_game():
    from pettingzoo.test import api_test

    from gigpo_torchrl.envs import make_env
    from gigpo_torchrl.envs.registry import import_env_module

    module = import_env_module(str(EXAMPLES / "pettingzoo_game.py"))  # registers "nim"
    api_test(module.Nim(), num_cycles=20)
    env = make_env("nim", batch_size=2, seed=0)
    td = env.reset()
    assert list(td["admissible_actions"][0]) == ["take 1", "take 2", "take 3"]
    td["action_text"] = ["take 1", "take 9"]
    assert env.step(td)["next", "action_valid"].reshape(-1).tolist() == [True, False]
