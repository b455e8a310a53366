"""The registry: decorator and call registration, entry points, gym: names, errors."""

import os
import subprocess
import sys
import textwrap

import pytest

from gigpo_torchrl.envs import TextEnv, env_spec, list_envs, make_env, register_env
from tests.envs_helpers import Counter


def test_register_with_the_decorator_and_by_call():
    @register_env("test-counter", max_steps=7)
    class ToFive(Counter):
        """Count to five.

        More text that is not the description."""

        def __init__(self, target: int = 5):
            super().__init__(target)

    register_env("test-counter-2", lambda target=2: Counter(target))
    assert {"test-counter", "test-counter-2"} <= set(list_envs())
    assert env_spec("test-counter").description == "Count to five."
    env = make_env("test-counter", batch_size=2, seed=0)
    assert isinstance(env, TextEnv) and env.max_steps == 7 and env.batch_size == (2,)
    assert make_env("test-counter-2", target=9, max_steps=3).games[0].target == 9
    with pytest.raises(ValueError, match="'test-counter' is already registered"):
        register_env("test-counter", Counter)
    register_env("test-counter", Counter, overwrite=True)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: make_env("no-such-env"), "unknown env 'no-such-env'; registered envs: .*taxi"),
        (lambda: register_env("", Counter), "env name ''"),
        (lambda: register_env("gym:x", Counter), "env name 'gym:x'"),
        (lambda: register_env("x", Counter, max_steps=0), "max_steps=0"),
        (lambda: register_env("x", "not callable"), "must be callable"),
    ],
)
def test_errors_name_the_bad_value(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_gym_prefix_wraps_any_gymnasium_id():
    env = make_env("gym:FrozenLake-v1", batch_size=1, seed=0, max_steps=5)
    td = env.reset()
    assert "\x1b" not in td["observation"][0]  # colour codes removed
    assert td["admissible_actions"][0] == ("0", "1", "2", "3")
    td["action_text"] = ["2"]
    assert env.step(td)["next", "action_valid"].item()


def test_a_third_party_package_registers_through_the_entry_point(tmp_path):
    """A package installed next to us, with no import from the test, is found by list_envs."""
    (tmp_path / "third_party_envs.py").write_text(
        textwrap.dedent(
            """
            from gigpo_torchrl.envs import StepResult, TextGame, register_env

            @register_env("third-party-echo", max_steps=3)
            class Echo(TextGame):
                def reset(self, seed):
                    return "say anything"

                def step(self, action):
                    return StepResult(action, terminated=True)
            """
        )
    )
    dist = tmp_path / "third_party_envs-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: third-party-envs\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[gigpo_torchrl.envs]\necho = third_party_envs\n")
    script = (
        "from gigpo_torchrl.envs import list_envs, make_env; "
        "print(sorted(list_envs())); print(make_env('third-party-echo').max_steps)"
    )
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True
    ).stdout.splitlines()
    assert "third-party-echo" in out[0] and "frozenlake" in out[0]
    assert out[1] == "3"
