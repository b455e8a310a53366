"""Env workers and generation replicas as Ray actors: the rows of the single-process collector.

A local Ray instance (loopback address asked for, 80 MiB object store, no dashboard) is
started once for the module; every test skips when Ray is not installed.
"""

import pytest
import torch

ray = pytest.importorskip("ray")

from tensordict import TensorDict  # noqa: E402

from gigpo_torchrl.collector import GroupCollector  # noqa: E402
from gigpo_torchrl.collector.ray_workers import ShardedTextEnv  # noqa: E402
from gigpo_torchrl.envs import InvalidAction, StepResult, TextEnv, TextGame  # noqa: E402
from gigpo_torchrl.policy import LLMPolicy, make_policy  # noqa: E402
from tests.envs_helpers import Counter  # noqa: E402

KEYS = [
    "group_id",
    "traj_id",
    "step",
    "state_hash",
    "action_valid",
    "success",
    ("next", "reward"),
    ("next", "env_reward"),
    ("next", "done"),
    ("next", "terminated"),
    ("next", "truncated"),
]
TEXT = ["observation", "action_text", ("text", "prompt"), ("text", "response")]
TOKENS = [("tokens", "prompt"), ("tokens", "response"), ("tokens", "full")]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(
        address="local",
        num_cpus=2,
        object_store_memory=80 * 2**20,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
    )
    yield
    ray.shutdown()


class Walk(TextGame):
    """Walk a line of ``seed % 5 + 3`` cells to its end; "back" at cell 0 is invalid, "jump"
    breaks the game (an env error); the state is the position."""

    task = "Reach the end of the line."

    def reset(self, seed):
        self.length, self.at = seed % 5 + 3, 0
        return f"cell {self.at} of {self.length}"

    def step(self, action):
        if action == "jump":
            raise RuntimeError("the line snapped")
        if action == "back" and self.at == 0:
            raise InvalidAction("already at the start")
        self.at += 1 if action == "forward" else -1
        done = self.at == self.length - 1
        return StepResult(f"cell {self.at} of {self.length}", float(done), done, success=done)

    def admissible_actions(self):
        return ["forward", "back", "jump"]

    def state(self):
        return self.at


def walk_env(batch):
    return TextEnv(Walk, batch_size=batch, max_steps=6)


def walk_parse(reply, admissible):
    """The tiny model's reply as a move: mostly forward, sometimes back, a jump (the game
    fails) or an inadmissible "fly"."""
    return ["forward", "forward", "forward", "back", "jump", "fly"][sum(map(ord, reply)) % 6]


def collect(policy, env, batches=2, **options):
    torch.manual_seed(0)  # the replies follow torch's RNG
    collector = GroupCollector(
        env, policy, num_groups=3, num_generations=2, seed=5, parse=walk_parse, **options
    )
    try:
        return [collector.collect() for _ in range(batches)], collector.stats
    finally:
        collector.shutdown()


def assert_same_rows(a, b, exact_log_probs=True):
    assert a.shape == b.shape
    for key in KEYS:
        assert torch.equal(a[key], b[key]), key
    for key in TEXT:
        assert list(a[key]) == list(b[key]), key
    for key in TOKENS:
        for x, y in zip(a.get(key, as_list=True), b.get(key, as_list=True), strict=True):
            assert torch.equal(x, y), key
    pairs = zip(
        a.get(("log_probs", "full"), as_list=True),
        b.get(("log_probs", "full"), as_list=True),
        strict=True,
    )
    for x, y in pairs:
        if exact_log_probs:
            assert torch.equal(x.nan_to_num(), y.nan_to_num())
        else:  # another batch composition: the same tokens, float rounding apart
            torch.testing.assert_close(x, y, equal_nan=True, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def sampling_policy():
    return make_policy("tiny", max_new_tokens=4, temperature=1.0, device="cpu")


@pytest.fixture(scope="module")
def greedy_policy():
    return make_policy("tiny", max_new_tokens=4, temperature=0.0, device="cpu")


@pytest.mark.parametrize("workers", [2, 4])
def test_env_workers_give_the_single_process_rows(sampling_policy, workers):
    """Same groups, initial states, step counts and rows (sampled replies included: the
    policy runs here, its RNG stream unchanged), with shards of unequal sizes too."""
    here, stats_here = collect(sampling_policy, walk_env)
    there, stats_there = collect(sampling_policy, walk_env, num_env_workers=workers)
    for a, b in zip(here, there, strict=True):
        assert_same_rows(a, b)
    assert stats_here == stats_there
    assert stats_there["env_errors"] > 0 and stats_there["invalid_action_rate"] > 0


def test_env_workers_with_a_registered_env_name_and_held_out_tasks(sampling_policy):
    """A registry name builds each shard's games in its worker; held-out probing, excluded
    tasks and redraws (partial resets with a ``_reset`` mask) give the same tasks."""

    def run(**workers):
        torch.manual_seed(0)
        options = dict(num_generations=2, seed=1, max_steps=3, env_kwargs={"size": 3})
        val = GroupCollector(
            "frozenlake",
            sampling_policy,
            num_groups=3,
            held_out=True,
            **(options | {"num_generations": 1}),
            **workers,
        )
        train = GroupCollector(
            "frozenlake",
            sampling_policy,
            num_groups=3,
            exclude_tasks=val.held_out_tasks,
            **options,
            **workers,
        )
        try:
            batches = [val.collect(), train.collect()]
            redrawn = train.stats["tasks_redrawn"]
            return val.held_out_tasks, redrawn, [*batches, train.collect()]
        finally:
            val.shutdown()
            train.shutdown()

    here, there = run(), run(num_env_workers=3)
    assert here[:2] == there[:2] and here[0] and here[1] > 0  # some groups were redrawn
    for a, b in zip(here[2], there[2], strict=True):
        assert_same_rows(a, b)


def test_sharded_env_resets_and_steps_as_one_text_env():
    """Seedless resets draw the same seeds; a partial reset touches only its elements."""
    one = TextEnv(lambda: Counter(target=4), batch_size=5, seed=3)
    shards = ShardedTextEnv(lambda b: TextEnv(lambda: Counter(target=4), batch_size=b), [2, 3])
    shards.set_seed(3)
    a, b = one.reset(), shards.reset()
    assert torch.equal(a["state_hash"], b["state_hash"])
    actions = ["inc", "wait", "dec", "inc", "inc"]
    for td in (a, b):
        td["action_text"] = actions
    a, b = one.step(a)["next"], shards.step(b)["next"]
    for key in ("state_hash", "step", "reward", "action_valid", "done"):
        assert torch.equal(a[key], b[key]), key
    assert list(a["observation"]) == list(b["observation"])
    mask = torch.tensor([True, False, False, True, False])[:, None]
    a = one.reset(TensorDict({"_reset": mask}, [5]))
    b = shards.reset(TensorDict({"_reset": mask}, [5]))
    assert torch.equal(a["state_hash"], b["state_hash"])
    for td in (a, b):
        td["action_text"] = actions
    a, b = one.step(a)["next"], shards.step(b)["next"]
    assert torch.equal(a["step"], b["step"]) and a["step"].tolist() == [1, 2, 2, 1, 2]
    assert torch.equal(a["state_hash"], b["state_hash"])
    assert shards.raw_actions == [False] * 5 and shards.env_errors == 0
    assert "ShardedTextEnv" in repr(shards)
    shards.close()


@pytest.mark.parametrize("workers", [0, 2])
def test_replicas_give_the_single_process_rows_when_greedy(greedy_policy, workers):
    """Two replicas, each a lane of whole groups (its games stepped here or in its own env
    workers): the greedy replies, hence every row, of the single-process collector."""
    here, _ = collect(greedy_policy, walk_env)
    there, stats = collect(greedy_policy, walk_env, num_policy_replicas=2, num_env_workers=workers)
    for a, b in zip(here, there, strict=True):
        assert_same_rows(a, b, exact_log_probs=False)
    assert stats["rows_generated"] == here[-1].shape[0]


def test_replicas_of_a_policy_choosing_among_the_actions(greedy_policy):
    """``constrain_actions``: the replicas get each prompt's admissible actions too."""
    policy = LLMPolicy(
        greedy_policy.model,
        greedy_policy.tokenizer,
        temperature=0.0,
        max_new_tokens=10,
        forbid_special=True,
        constrain_actions=True,
    )
    here, _ = collect(policy, walk_env, batches=1)
    there, _ = collect(policy, walk_env, batches=1, num_policy_replicas=3)
    assert_same_rows(here[0], there[0], exact_log_probs=False)
    assert set(here[0]["text", "response"]) <= {"forward", "back", "jump"}


def test_sampling_replicas_are_reproducible(sampling_policy):
    first, _ = collect(sampling_policy, walk_env, batches=1, num_policy_replicas=2)
    again, _ = collect(sampling_policy, walk_env, batches=1, num_policy_replicas=2)
    assert_same_rows(first[0], again[0])


def test_weights_are_pushed_to_the_replicas():
    """After ``update_policy_weights_`` the replicas reply as the updated model does: with
    its trainable parameters pushed (what the trainer does after an update), then with a
    whole state dict."""
    torch.manual_seed(0)
    policy = make_policy("tiny", max_new_tokens=4, temperature=0.0, device="cpu")
    collector = GroupCollector(
        walk_env, policy, num_groups=2, num_generations=1, seed=2, num_policy_replicas=2
    )
    prompts = ["cell 0 of 4", "cell 2 of 6", "Reach the end of the line."]

    def replies_everywhere():
        here = list(collector._generate_here(prompts)["text", "response"])
        there = [list(collector.replicas.generate(k, prompts)["text", "response"]) for k in (0, 1)]
        return here, there

    try:
        here, there = replies_everywhere()
        assert there == [here, here]
        policy.model.get_output_embeddings().requires_grad_(False)
        with torch.no_grad():
            for p in policy.model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p))
        collector.update_policy_weights_()  # the trainable parameters only
        changed, there = replies_everywhere()
        assert changed != here and there == [changed, changed]
        with torch.no_grad():
            policy.model.get_output_embeddings().weight.mul_(-1)  # frozen: not pushed above
        collector.update_policy_weights_(policy.model.state_dict())
        flipped, there = replies_everywhere()
        assert flipped != changed and there == [flipped, flipped]
        assert collector.replicas.version == 2
    finally:
        collector.shutdown()


def test_bad_worker_counts_are_refused(greedy_policy):
    with pytest.raises(ValueError, match="more workers than the 4 environments"):
        GroupCollector(walk_env, greedy_policy, num_groups=2, num_generations=2, num_env_workers=5)
    with pytest.raises(ValueError, match="serves whole groups, and there are 2"):
        GroupCollector(
            walk_env, greedy_policy, num_groups=2, num_generations=2, num_policy_replicas=3
        )
    with pytest.raises(ValueError, match="must be a multiple of num_policy_replicas=2"):
        GroupCollector(
            walk_env,
            greedy_policy,
            num_groups=2,
            num_generations=2,
            num_policy_replicas=2,
            num_env_workers=3,
        )
    with pytest.raises(ValueError, match="must be an integer >= 0"):
        GroupCollector(walk_env, greedy_policy, num_groups=2, num_generations=2, num_env_workers=-1)


def test_gigpo_train_with_env_workers_and_replicas(tmp_path):
    """One iteration of the trainer: env workers give the rows of a run without them;
    replicas generate, receive the update, and the run completes."""
    from gigpo_torchrl.train import TrainConfig, Trainer

    def trainer(name, **options):
        config = TrainConfig(
            model="tiny", env="sokoban", iterations=1, num_groups=2, num_generations=2,
            max_turns=3, val_groups=2, max_new_tokens=4, micro_batch_size=4,
            output_dir=str(tmp_path), run_name=name, val_at_start=False, num_threads=1,
            **options,
        )  # fmt: skip
        return Trainer(config)

    plain = trainer("plain")
    plain.train()
    workers = trainer("workers", num_env_workers=2)
    workers.train()
    assert_same_rows(plain.last_batch, workers.last_batch)
    replicated = trainer("replicas", num_policy_replicas=2, num_env_workers=2, temperature=0)
    replicated.train()
    assert replicated.collector.replicas.version == 1  # the update was pushed
    assert replicated.last_batch["step"].numel() > 0
