"""Ray options of gigpo-train and GroupCollector, checked without starting Ray (and without
Ray installed: these tests run everywhere)."""

import importlib.util
import sys

import pytest

from gigpo_torchrl.collector import GroupCollector
from gigpo_torchrl.train.cli import parse_config


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--num_env_workers", "-1"], "--num_env_workers -1 must be an integer >= 0"),
        (
            ["--num_groups", "2", "--num_env_workers", "9"],
            "--num_env_workers 9: more workers than the 8 env",
        ),
        (
            ["--num_groups", "2", "--num_policy_replicas", "3"],
            "serves whole groups, and --num_groups is 2",
        ),
        (
            ["--num_policy_replicas", "2", "--num_env_workers", "3"],
            "--num_env_workers 3 must be a multiple of --num_policy_replicas 2",
        ),
        (
            ["--num_policy_replicas", "1", "--backend", "vllm"],
            "with --backend vllm generation already runs in vLLM's engine",
        ),
    ],
)
def test_bad_ray_options_are_named(argv, message):
    if importlib.util.find_spec("ray") is None and "-1" not in argv:
        message = "need Ray: pip install 'gigpo-torchrl\\[ray\\]'"
    with pytest.raises(ValueError, match=message):
        parse_config(argv)


def test_without_ray_the_options_say_how_to_install_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a)
    )
    with pytest.raises(ValueError, match=r"need Ray: pip install 'gigpo-torchrl\[ray\]'"):
        parse_config(["--num_env_workers", "2"])
    assert parse_config([]).num_env_workers == 0  # the default needs no Ray
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails
    with pytest.raises(ImportError, match=r"pip install 'gigpo-torchrl\[ray\]'"):
        GroupCollector("frozenlake", None, num_groups=1, num_generations=2, num_env_workers=2)
