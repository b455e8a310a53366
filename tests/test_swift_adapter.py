"""ms-swift-style environments (async reset/step over the message history) as TextEnvs."""

import re
import warnings

import pytest
import torch
from tensordict import TensorDict

from gigpo_torchrl.collector import GroupCollector
from gigpo_torchrl.envs import SwiftEnvGame, TextEnv, make_env, register_swift_envs, stable_hash
from gigpo_torchrl.policy import LLMPolicy, make_char_tokenizer, make_tiny_model


class GuessEnv:
    """Written as for ms-swift: the env parses the action out of the last message itself."""

    closed = 0

    async def reset(self, config):
        self.secret = config.data_dict["seed"] % 5
        self.low, self.high = 0, 4
        return (
            "Guess a number from 0 to 4.",
            {"state_hash": (self.low, self.high)},
            "You are playing a guessing game.",
        )

    async def step(self, messages):
        assert messages[0]["role"] == "system" and messages[-1]["role"] == "assistant"
        self.received = messages
        found = re.search(r"\d+", messages[-1]["content"])
        if found is None:
            return "Say a number.", -0.1, False, {"state_hash": (self.low, self.high)}
        guess = int(found.group())
        if guess == self.secret:
            return "Correct!", 1.0, True, {"state_hash": "won", "success": True}
        if guess < self.secret:
            self.low = max(self.low, guess + 1)
        else:
            self.high = min(self.high, guess - 1)
        word = "higher" if guess < self.secret else "lower"
        return f"Go {word}.", 0.0, False, {"state_hash": (self.low, self.high)}

    def close(self):
        GuessEnv.closed += 1


class StuckEnv:
    """Reports no state and always says the same thing: GIGPO cannot tell steps apart."""

    async def reset(self, config):
        return "Waiting.", {}, ""

    async def step(self, messages):
        return "Waiting.", 0.0, len(messages) >= 4, {}  # two steps

    async def close(self):
        pass


def test_a_swift_env_plays_through_text_env():
    env = TextEnv(lambda: SwiftEnvGame(GuessEnv), batch_size=2, max_steps=6)
    td = env.reset(TensorDict({"seed": torch.tensor([3, 3])}, [2]))  # secret 3 for both
    assert td["task"][0] == "You are playing a guessing game."
    assert td["state_hash"][0] == stable_hash((0, 4))
    td["action_text"] = ["I guess 1", "maybe 4?"]
    out = env.step(td)["next"]
    assert out["observation"][0] == "Go higher." and out["observation"][1] == "Go lower."
    assert out["state_hash"][0] == stable_hash((2, 4))
    out["action_text"] = ["3", "3"]
    out = env.step(out)["next"]
    assert out["success"].reshape(-1).tolist() == [True, True]
    assert out["reward"].reshape(-1).tolist() == [1.0, 1.0]
    game = env.games[0]
    assert [m["role"] for m in game.messages] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
    ]
    env.close()
    assert GuessEnv.closed == 2


def test_without_state_hash_the_observation_is_the_anchor():
    game = SwiftEnvGame(StuckEnv)
    game.reset(0)
    assert game.state() is None  # TextEnv then hashes the observation text
    game.close()


def test_a_static_env_warns_once_that_gigpo_is_grpo_there():
    env = TextEnv(lambda: SwiftEnvGame(StuckEnv), batch_size=2, max_steps=10)
    with pytest.warns(UserWarning, match="StuckEnv: neither info\\['state_hash'\\] nor"):
        td = env.reset()
        for _ in range(2):
            td["action_text"] = ["wait", "wait"]
            td = env.step(td)["next"]
    assert td["done"].all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        env.reset()  # a second static episode: no second warning
    env.close()


def test_register_swift_envs_takes_an_ms_swift_envs_dict():
    register_swift_envs({"test-guess": GuessEnv}, max_steps=4)
    env = make_env("test-guess", batch_size=1)
    assert env.max_steps == 4
    assert env.reset()["observation"][0] == "Guess a number from 0 to 4."
    env.close()


def test_a_swift_env_receives_the_whole_reply_unchanged():
    """ms-swift envs parse the assistant message themselves: no cleaning, no 256 cap."""
    reply = "Let me think.\n\n  Lower  than four,\tso:  <answer>3</answer>  " + "x" * 400
    env = TextEnv(lambda: SwiftEnvGame(GuessEnv), batch_size=1)
    assert env.raw_actions == [True]
    td = env.reset(TensorDict({"seed": torch.tensor([3])}, [1]))
    td["action_text"] = [reply]
    out = env.step(td)["next"]
    assert out["action_valid"].item() and out["success"].item()
    assert env.games[0].env.received[-1] == {"role": "assistant", "content": reply}
    td = env.reset(TensorDict({"seed": torch.tensor([3])}, [1]))
    td["action_text"] = [None]  # still text only
    assert not env.step(td)["next", "action_valid"].item()


def test_the_collector_hands_swift_envs_the_raw_reply():
    tokenizer = make_char_tokenizer()
    policy = LLMPolicy(make_tiny_model(tokenizer), tokenizer, max_new_tokens=6, forbid_special=True)
    collector = GroupCollector(
        lambda b: TextEnv(lambda: SwiftEnvGame(GuessEnv), batch_size=b, max_steps=2),
        policy,
        num_groups=1,
        num_generations=2,
    )
    batch = collector.collect()
    replies = list(batch["text", "response"])
    assert list(batch["action_text"]) == replies  # not parsed: the whole reply
    for i, game in enumerate(collector.env.games):
        sent = [m["content"] for m in game.messages if m["role"] == "assistant"]
        mine = [r for r, t in zip(replies, batch["traj_id"].tolist(), strict=True) if t == i]
        assert sent == mine
