"""``--env module:name``: train one's own game from the command line without packaging it."""

import json
import sys
import textwrap
from pathlib import Path

import pytest

from gigpo_torchrl.envs import make_env
from gigpo_torchrl.envs.registry import env_spec, split_env_name
from gigpo_torchrl.train.cli import main, parse_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

GAME = '''
from gigpo_torchrl.envs import InvalidAction, StepResult, TextGame, register_env


@register_env("{name}", max_steps=4)
class KeyDoor(TextGame):
    """Take the key, then open the door."""

    task = "Open the door."

    def reset(self, seed):
        self.has_key = False
        return "A key lies here. A door is closed."

    def step(self, action):
        if action == "take key":
            self.has_key = True
            return StepResult("You hold the key.", reward=0.0)
        if action == "open door" and self.has_key:
            return StepResult("The door opens.", reward=1.0, terminated=True, success=True)
        raise InvalidAction("take key, then open door")

    def admissible_actions(self):
        return ["take key", "open door"]

    def state(self):
        return self.has_key
'''


def write_game(folder: Path, module: str, name: str) -> Path:
    path = folder / f"{module}.py"
    path.write_text(textwrap.dedent(GAME.format(name=name)))
    return path


def test_split_env_name():
    assert split_env_name("sokoban") == (None, "sokoban")
    assert split_env_name("gym:FrozenLake-v1") == (None, "gym:FrozenLake-v1")
    assert split_env_name("my_games:keydoor") == ("my_games", "keydoor")
    assert split_env_name("games/key door.py:keydoor") == ("games/key door.py", "keydoor")


def test_a_py_file_path(tmp_path):
    path = write_game(tmp_path, "door_games", "keydoor-file")
    env = make_env(f"{path}:keydoor-file", batch_size=2)
    td = env.reset()
    td["action_text"] = ["take key", "open door"]
    assert env.step(td)["next", "action_valid"].reshape(-1).tolist() == [True, False]
    # imported once: the same spec again, no "already registered" error
    assert env_spec(f"{path}:keydoor-file") is env_spec("keydoor-file")


def test_a_module_in_the_current_folder(tmp_path, monkeypatch):
    # as under the gigpo-train console script, the current folder is not on sys.path
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.chdir(tmp_path)
    write_game(tmp_path, "my_games_cwd", "keydoor-cwd")
    config = parse_config(["--env", "my_games_cwd:keydoor-cwd", "--model", "tiny"])
    assert config.env == "my_games_cwd:keydoor-cwd"
    assert env_spec("keydoor-cwd").max_steps == 4


def test_errors_name_the_module(tmp_path, capsys):
    path = write_game(tmp_path, "other_games", "keydoor-other")
    for env, message in [
        ("no_such_games_module:keydoor", "no module named 'no_such_games_module'"),
        (f"{tmp_path}/missing.py:keydoor", "missing.py' does not exist"),
        (f"{path}:chess", "registers no env 'chess'; it registered: keydoor-other"),
    ]:
        assert main(["--env", env, "--model", "tiny"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"gigpo-train: error: --env {env}:") and message in err, err


def test_train_the_custom_env_example_from_the_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["--env", f"{EXAMPLES / 'custom_env.py'}:number-line", "--model", "tiny"]
    argv += ["--iterations", "1", "--num_groups", "2", "--num_generations", "2"]
    argv += ["--max_new_tokens", "4", "--val_groups", "2", "--run_name", "nl"]
    assert main(argv) == 0
    records = (tmp_path / "runs" / "nl" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["iteration"] for r in records] == [0, 1, 1]


@pytest.mark.parametrize("script", ["custom_env.py"])
def test_the_example_module_does_not_train_when_imported(script, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env_spec(f"{EXAMPLES / script}:number-line")
    assert not (tmp_path / "runs").exists()
