"""GIGPOAdvantage inside torchrl's losses: GRPOLoss with a tiny LM, and critic-free ClipPPOLoss."""

import torch
from tensordict import TensorDict, lazy_stack
from tensordict.nn import TensorDictModule
from torchrl.modules import ProbabilisticActor
from torchrl.objectives import ClipPPOLoss
from torchrl.objectives.llm import GRPOLoss

from gigpo_torchrl import GIGPOAdvantage
from gigpo_torchrl.policy import scoring_wrapper

# (traj, step, state_hash, reward, observation, response) of one group of two trajectories
STEPS = [
    (0, 0, 11, 0.0, "start", "go left"),
    (0, 1, 12, 1.0, "left room", "open"),
    (1, 0, 11, 0.0, "start", "go right, then wait"),
    (1, 1, 13, 0.0, "right room", "x"),
]


def step_rows(tokenizer):
    """Ragged LLM step rows with the keys of docs/semantics.md, lazily stacked as torchrl's
    LLM data."""
    rows = []
    for traj, step, state, reward, observation, response in STEPS:
        chat = [{"role": "user", "content": observation}]
        prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        prompt_ids = torch.tensor(tokenizer.encode(prompt))
        reply_ids = torch.tensor(tokenizer.encode(response) + [tokenizer.eos_token_id])
        rows.append(
            TensorDict(
                {
                    "group_id": torch.tensor(0),
                    "traj_id": torch.tensor(traj),
                    "step": torch.tensor(step),
                    "state_hash": torch.tensor(state),
                    ("next", "reward"): torch.tensor([reward]),
                    ("next", "done"): torch.tensor([step == 1]),
                    ("tokens", "prompt"): prompt_ids,
                    ("tokens", "full"): torch.cat([prompt_ids, reply_ids]),
                }
            )
        )
    return lazy_stack(rows)


def test_grpo_loss_forward_backward_with_gigpo_advantage(tiny):
    tokenizer, model = tiny
    actor = scoring_wrapper(model, tokenizer)
    batch = step_rows(tokenizer)
    # Behaviour log-probs by teacher forcing, scored into a fresh output so that the prompt
    # tokens the "sft" mask needs stay in the batch.
    with torch.no_grad():
        scored = actor(
            batch.select(("tokens", "full")),
            tensordict_out=lazy_stack([TensorDict() for _ in STEPS]),
        )
    batch.update(scored.select(("log_probs", "full")))

    loss = GRPOLoss(actor, masking_strategy="sft")
    loss.make_value_estimator(GIGPOAdvantage(gamma=0.5))
    batch = loss.value_estimator(batch)
    advantage = batch["advantage"]
    assert advantage.shape == (4, 1, 1)
    assert batch["step_group_size"].reshape(-1).tolist() == [2, 1, 2, 1]

    out = loss(batch)
    # The policy has not moved, so every ratio is 1 and the token-mean objective is minus the
    # advantage averaged over response tokens (reply + <|im_end|>) only.
    lengths = torch.tensor([len(tokenizer.encode(r)) + 1 for *_, r in STEPS], dtype=torch.float)
    expected = -(advantage.reshape(-1) * lengths).sum() / lengths.sum()
    torch.testing.assert_close(out.loss_objective.detach(), expected, rtol=1e-5, atol=1e-6)

    model.zero_grad()
    out.loss_objective.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


def test_critic_free_clip_ppo_loss_takes_the_estimator():
    torch.manual_seed(0)
    actor = ProbabilisticActor(
        TensorDictModule(torch.nn.Linear(3, 4), in_keys=["observation"], out_keys=["logits"]),
        in_keys=["logits"],
        distribution_class=torch.distributions.Categorical,
        return_log_prob=True,
    )
    td = TensorDict(
        {
            "observation": torch.randn(3, 3),
            "group_id": torch.zeros(3, dtype=torch.long),
            "traj_id": torch.tensor([0, 0, 1]),
            "step": torch.tensor([0, 1, 0]),
            "state_hash": torch.tensor([11, 12, 11]),
            ("next", "reward"): torch.tensor([[0.0], [1.0], [0.0]]),
            ("next", "done"): torch.tensor([[False], [True], [True]]),
        },
        [3],
    )
    with torch.no_grad():
        actor(td)
    loss = ClipPPOLoss(actor_network=actor, critic_network=None, entropy_bonus=False)
    loss.make_value_estimator(GIGPOAdvantage(gamma=0.5))
    td = loss.value_estimator(td)
    assert td["advantage"].shape == (3, 1)
    # A_E = ±sqrt(1/2); state 11 has step returns 0.5 and 0, so A_S = ±sqrt(1/2) there
    s = 0.5**0.5
    expected = torch.tensor([[2 * s], [s], [-2 * s]])
    torch.testing.assert_close(td["advantage"], expected)
    out = loss(td)
    # ratio 1: the clipped surrogate is minus the mean advantage
    torch.testing.assert_close(out["loss_objective"].detach(), -expected.mean())
    out["loss_objective"].backward()
    assert actor.module[0].module.weight.grad.abs().sum() > 0
