"""verl-agent's invalid-action penalty end to end: TextEnv's ``env_reward``, the collector's
step rows, and the training options that wire them into ``GIGPOAdvantage``."""

import math

import pytest
import torch
from tensordict import NonTensorStack, TensorDict

from gigpo_torchrl import GIGPOAdvantage
from gigpo_torchrl.collector import GroupCollector
from gigpo_torchrl.envs import StepResult, TextEnv, TextGame
from gigpo_torchrl.policy import make_char_tokenizer
from gigpo_torchrl.train import TrainConfig


class Walk(TextGame):
    """Two steps of "go" reach the goal (reward 1); anything else is not admissible."""

    task = "Reach the goal."

    def reset(self, seed):
        self.position = 0
        return "at 0"

    def step(self, action):
        self.position += 1
        done = self.position == 2
        return StepResult(f"at {self.position}", reward=float(done), terminated=done, success=done)

    def admissible_actions(self):
        return ["go"]

    def state(self):
        return self.position


def walk_env(batch_size, penalty=0.1):
    return TextEnv(Walk, batch_size=batch_size, max_steps=5, invalid_action_penalty=penalty)


def test_text_env_writes_the_reward_without_the_penalty():
    env = walk_env(2, penalty=0.25)
    td = env.reset()
    assert td["env_reward"].tolist() == [[0.0], [0.0]]
    td["action_text"] = NonTensorStack.from_list(["go", "jump"])
    out = env.step(td)["next"]
    assert out["action_valid"].reshape(-1).tolist() == [True, False]
    assert out["reward"].reshape(-1).tolist() == [0.0, -0.25]
    assert out["env_reward"].reshape(-1).tolist() == [0.0, 0.0]
    td = out.clone()
    td["action_text"] = NonTensorStack.from_list(["go", "go"])
    out = env.step(td)["next"]
    assert out["reward"].reshape(-1).tolist() == [1.0, 0.0]
    assert out["env_reward"].reshape(-1).tolist() == [1.0, 0.0]
    assert out["env_reward"].shape == (2, 1) and out["env_reward"].dtype == torch.float32


class ScriptedPolicy:
    """Replies ``calls[k]`` (one text per active env) at the k-th generation call."""

    def __init__(self, calls):
        self.tokenizer = make_char_tokenizer()  # the collector renders prompts with it
        self.replies = iter(calls)

    def __call__(self, td):
        texts = next(self.replies)
        assert len(texts) == td.shape[0]
        return TensorDict(
            {
                ("text", "response"): NonTensorStack.from_list(texts),
                ("tokens", "response"): torch.zeros(len(texts), 1, dtype=torch.long),
            },
            [len(texts)],
        )


def test_collected_rows_reproduce_the_reference_with_the_penalty():
    # One group of two: env 0 goes, goes; env 1 first says "jump" (invalid, state kept),
    # then goes, goes. This is the worked case of issue 10 (see test_advantage.py).
    policy = ScriptedPolicy([["go", "jump"], ["go", "go"], ["go"]])
    collector = GroupCollector(
        walk_env,
        policy,
        num_groups=1,
        num_generations=2,
        parse=lambda reply, admissible: reply,
    )
    batch = collector.collect()
    assert batch["next", "reward"].reshape(-1).tolist() == pytest.approx(
        [0.0, -0.1, 1.0, 0.0, 1.0]  # rows in collection order, step by step
    )
    assert batch["next", "env_reward"].reshape(-1).tolist() == [0.0, 0.0, 1.0, 0.0, 1.0]
    adv = GIGPOAdvantage(compat="verl-agent", invalid_action_penalty=0.1)
    adv.set_keys(reward="env_reward")
    out = adv(batch)
    by_row = {
        (t, s): a
        for t, s, a in zip(
            out["traj_id"].tolist(),
            out["step"].tolist(),
            out["advantage"].reshape(-1).tolist(),
            strict=True,
        )
    }
    # hand-derived in test_advantage.py::test_verl_agent_invalid_action_penalty_reproduces...
    scale = math.sqrt(0.002) + 1e-6
    d = 0.1475 / 3
    s = d * math.sqrt(3) + 1e-6
    expected = {
        (0, 0): 0.02 / scale + d / s,
        (0, 1): 0.02 / scale,
        (1, 0): -0.08 / scale - 2 * d / s,
        (1, 1): 0.02 / scale + d / s,
        (1, 2): 0.02 / scale,
    }
    assert by_row == pytest.approx(expected, rel=1e-5)  # float32 rewards


def test_train_config_compat_options():
    TrainConfig(compat="verl-agent", invalid_action_penalty=0.2).validate()
    TrainConfig(compat=None, invalid_action_penalty=0.0).validate()
    for bad, message in [
        ({"compat": "swift"}, "--compat 'swift'"),
        ({"invalid_action_penalty": -1.0}, "--invalid_action_penalty -1.0"),
        ({"compat": "verl-agent", "advantage_estimator": "rloo"}, "rloo"),
        ({"env_kwargs": {"invalid_action_penalty": 0.3}}, "--invalid_action_penalty"),
    ]:
        with pytest.raises(ValueError, match=message):
            TrainConfig(**bad).validate()


def test_cli_parses_compat_and_penalty():
    from gigpo_torchrl.train.cli import parse_config

    config = parse_config(["--compat", "verl-agent", "--invalid_action_penalty", "0.2"])
    assert (config.compat, config.invalid_action_penalty) == ("verl-agent", 0.2)
    assert parse_config(["--compat", "none"]).compat is None


def test_trainer_feeds_the_penalty_free_reward_to_a_compat_estimator(tmp_path):
    from gigpo_torchrl.train import Trainer

    config = TrainConfig(
        model="tiny",
        env="sokoban",
        num_groups=1,
        num_generations=2,
        max_turns=2,
        val_groups=1,
        max_new_tokens=4,
        output_dir=str(tmp_path),
        run_name="compat",
        compat="verl-agent",
        invalid_action_penalty=0.3,
    )
    trainer = Trainer(config)
    estimator = trainer.loss.value_estimator
    assert (estimator.compat, estimator.invalid_action_penalty) == ("verl-agent", 0.3)
    assert ("next", "env_reward") in estimator.in_keys
    assert trainer.collector.env.invalid_action_penalty == 0.3  # one penalty for both
    batch = trainer.collector.collect()
    invalid = ~batch["action_valid"].reshape(-1)
    torch.testing.assert_close(
        batch["next", "reward"].reshape(-1),
        batch["next", "env_reward"].reshape(-1) - 0.3 * invalid.float(),
    )
    estimator(batch)
    assert torch.isfinite(batch["advantage"]).all()
