"""The textworld env (optional extra): generated games, caching, facts-based state hashes.

Tests that play games skip when the ``textworld`` package is not installed
(``pip install -e '.[textworld]'``).
"""

import json
import subprocess
import sys

import pytest
import torch
from gigpo_envs.textworld import (
    PRESETS,
    SUCCESS_REWARD,
    TextWorldGame,
    clean_feedback,
    game_file,
    textworld_available,
)
from tensordict import TensorDict

from gigpo_torchrl.envs import list_envs, make_env

needs_textworld = pytest.mark.skipif(
    not textworld_available(), reason="needs the textworld extra: pip install -e '.[textworld]'"
)
TRIVIAL = PRESETS["trivial"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("textworld-cache")


def seeds(*values):
    return TensorDict({"seed": torch.tensor(values)}, [len(values)])


def test_without_the_package_the_env_is_not_registered():
    code = (
        "import sys; sys.modules['textworld'] = None\n"
        "from gigpo_envs import textworld as tw\n"
        "from gigpo_torchrl.envs import list_envs\n"
        "assert not tw.textworld_available()\n"
        "assert 'textworld' not in list_envs(), list_envs()\n"
        "try:\n"
        "    tw.TextWorldGame('trivial')\n"
        "except ValueError as error:\n"
        "    print(error)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "pip install 'gigpo-torchrl[textworld]'" in out.stdout


def test_clean_feedback_drops_prompt_and_status_line():
    raw = "\nYou pick up the key.\n\n\n\n>     -= Attic =-0/6"
    assert clean_feedback(raw) == "You pick up the key."


@needs_textworld
def test_registered_with_its_presets():
    assert "textworld" in list_envs()
    assert list(PRESETS) == ["trivial", "easy", "medium", "hard", "paper"]
    with pytest.raises(ValueError, match="preset='huge'"):
        TextWorldGame("huge")
    with pytest.raises(ValueError, match="nb_rooms=0"):
        TextWorldGame("easy", nb_rooms=0)


@needs_textworld
def test_same_seed_same_game_generated_from_scratch(tmp_path):
    first = game_file(3, cache_dir=tmp_path / "a", **TRIVIAL)
    again = game_file(3, cache_dir=tmp_path / "b", **TRIVIAL)
    other = game_file(4, cache_dir=tmp_path / "a", **TRIVIAL)
    load = lambda path: json.loads(path.with_suffix(".json").read_text())  # noqa: E731
    assert load(first) == load(again)
    assert load(first) != load(other)
    games = [TextWorldGame("trivial", cache_dir=tmp_path / d) for d in ("a", "b")]
    starts = [(g.reset(3), g.task, g.admissible_actions(), g.state()) for g in games]
    assert starts[0] == starts[1]


@needs_textworld
def test_cached_games_are_not_generated_again(cache, monkeypatch):
    path = game_file(11, cache_dir=cache, **TRIVIAL)
    import textworld.generator

    def fail(*args, **kwargs):
        raise AssertionError("generated again")

    monkeypatch.setattr(textworld.generator, "make_game", fail)
    assert game_file(11, cache_dir=cache, **TRIVIAL) == path
    assert path.is_file() and path.with_suffix(".json").is_file()
    assert not list(path.parent.glob(".tmp-*"))  # no leftovers of the atomic write


@needs_textworld
def test_default_cache_is_under_the_project_cache(tmp_path, monkeypatch):
    from gigpo_envs.textworld import textworld_cache_dir

    monkeypatch.setenv("GIGPO_CACHE", str(tmp_path))
    assert textworld_cache_dir() == tmp_path / "textworld"
    path = game_file(5, **TRIVIAL)
    assert tmp_path / "textworld" in path.parents


@needs_textworld
def test_env_exposes_task_observation_inventory_and_commands(cache):
    env = make_env("textworld", batch_size=2, preset="trivial", cache_dir=str(cache))
    td = env.reset(seeds(7, 7))
    assert td["task"][0] and td["task"][0] == td["task"][1]
    observation = td["observation"][0]
    assert "-=" in observation  # the room's name
    assert "carrying" in observation  # the inventory
    admissible = td["admissible_actions"][0]
    assert "look" in admissible and "inventory" in admissible
    assert td["state_hash"][0] == td["state_hash"][1]
    env.close()


@needs_textworld
def test_facts_hash_recurs_when_a_state_is_revisited(cache):
    game = TextWorldGame("easy", cache_dir=cache)
    game.reset(2)
    start = game.state()
    look = game.step("look")  # no change of state, another text
    assert game.state() == start
    inventory = game.step("inventory")
    assert inventory.observation != look.observation and game.state() == start
    # take something and put it back: the facts come back exactly
    take = next(a for a in game.admissible_actions() if a.startswith("take "))
    game.step(take)
    assert game.state() != start
    game.step("drop " + take.removeprefix("take ").split(" from ")[0])
    moved_back = game.state()
    # the object is on the floor now wherever it was before; take and drop again
    game.step(take.split(" from ")[0])
    game.step("drop " + take.removeprefix("take ").split(" from ")[0])
    assert game.state() == moved_back
    game.close()


@needs_textworld
def test_textenv_hash_follows_the_facts_not_the_text(cache):
    env = make_env("textworld", batch_size=1, preset="easy", cache_dir=str(cache))
    td = env.reset(seeds(2))
    start = td["state_hash"].clone()
    td["action_text"] = ["look"]
    out = env.step(td)["next"]
    assert torch.equal(out["state_hash"], start)
    out["action_text"] = ["inventory"]
    again = env.step(out)["next"]
    assert torch.equal(again["state_hash"], start)
    assert again["observation"][0] != out["observation"][0]
    env.close()


@needs_textworld
def test_walkthrough_earns_ten_and_invalid_actions_cost_the_penalty(cache):
    env = make_env("textworld", batch_size=1, preset="easy", cache_dir=str(cache))
    td = env.reset(seeds(8))
    td["action_text"] = ["fly to the moon"]
    td = env.step(td)["next"]
    assert td["reward"].item() == pytest.approx(-0.1)
    assert not td["action_valid"].item()
    plan = env.games[0].walkthrough()
    assert 1 <= len(plan) <= 2 * PRESETS["easy"]["quest_length"]
    rewards = []
    for action in plan:
        td["action_text"] = [action]
        td = env.step(td)["next"]
        rewards.append(td["reward"].item())
    assert rewards[-1] == SUCCESS_REWARD and sum(rewards[:-1]) == 0
    assert td["success"].item() and td["terminated"].item()
    env.close()


@needs_textworld
def test_num_games_plays_a_fixed_set(cache):
    a = TextWorldGame("trivial", num_games=3, cache_dir=cache)
    b = TextWorldGame("trivial", num_games=3, cache_dir=cache)
    assert (a.reset(1), a.task) == (b.reset(4), b.task)


@needs_textworld
@pytest.mark.slow
def test_tiny_textworld_comparison_writes_csv_summary_and_figure(tmp_path, cache):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_textworld.py"
    spec = importlib.util.spec_from_file_location("compare_textworld", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being defined
    try:
        spec.loader.exec_module(module)
        args = ["--tiny", "--out-dir", str(tmp_path), "--cache-dir", str(cache)]
        rows = module.main([*args, "--settings", "grpo", "gigpo", "gigpo-similar"])
    finally:
        del sys.modules[spec.name]
    assert {r["setting"] for r in rows} == {"grpo", "gigpo", "gigpo-similar"}
    assert {r["anchor"] for r in rows} == {"state", "similar"}
    for name in ("compare_textworld.csv", "compare_textworld_summary.csv", "compare_textworld.png"):
        assert (tmp_path / name).is_file()
