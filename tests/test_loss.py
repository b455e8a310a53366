"""GIGPOLoss: hand-computed values, reply-token-only diagnostics, and gradients that do not
depend on how a mini-batch is split into micro-batches."""

import math

import pytest
import torch
from tensordict import TensorDict, lazy_stack

from gigpo_torchrl import GIGPOAdvantage
from gigpo_torchrl.objectives import LOSS_AGG_MODES, GIGPOLoss, token_weights
from gigpo_torchrl.policy import make_tiny_model
from gigpo_torchrl.policy.packing import pack_rows, reply_log_probs

PROMPTS = ["where now?", "look", "where now?", "a much longer question about the room?"]
REPLIES = ["left", "up", "x", "open the door"]
ADVANTAGES = [1.0, -0.5, 2.0, -1.5]


def batch(tokenizer, model, *, shift=0.0, reference_shift=None, pad_in_reply=False):
    """Step rows whose behaviour log-probs are the model's own minus ``shift`` (so the ratio
    is exp(shift) at every token), optionally with reference log-probs."""
    rows = []
    for prompt, reply, advantage in zip(PROMPTS, REPLIES, ADVANTAGES, strict=True):
        p = torch.tensor(tokenizer.encode(f"<|im_start|>user\n{prompt}<|im_end|>\n"))
        r = torch.tensor(tokenizer.encode(reply) + [tokenizer.eos_token_id])
        if pad_in_reply:
            r = torch.cat([r[:1], torch.tensor([tokenizer.pad_token_id]), r[1:]])
        rows.append(
            TensorDict(
                {
                    ("tokens", "prompt"): p,
                    ("tokens", "response"): r,
                    ("tokens", "full"): torch.cat([p, r]),
                    "advantage": torch.tensor([[advantage]]),
                }
            )
        )
    td = lazy_stack(rows)
    with torch.no_grad():
        packed = pack_rows(
            td.get(("tokens", "prompt"), as_list=True),
            td.get(("tokens", "response"), as_list=True),
        )
        own = reply_log_probs(model, packed)[0].split(packed.lengths.tolist())
    for row, lp in zip(td.tensordicts, own, strict=True):
        row.set(("log_probs", "response"), lp - shift)
        if reference_shift is not None:
            row.set(("ref_log_probs", "response"), lp + reference_shift)
    return td


def lengths():
    return torch.tensor([len(r) + 1 for r in REPLIES])


def test_token_weights_by_hand():
    n = torch.tensor([2, 1, 3])
    torch.testing.assert_close(
        token_weights(n, "token_mean", tokens=6, rows=3), torch.full((6,), 1 / 6)
    )
    torch.testing.assert_close(
        token_weights(n, "seq_mean_token_mean", tokens=6, rows=3),
        torch.tensor([1 / 6, 1 / 6, 1 / 3, 1 / 9, 1 / 9, 1 / 9]),
    )
    torch.testing.assert_close(
        token_weights(n, "seq_mean_token_sum", tokens=6, rows=3), torch.full((6,), 1 / 3)
    )
    with pytest.raises(ValueError, match="loss_agg_mode='sum'"):
        token_weights(n, "sum", tokens=6, rows=3)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_ratio_one_gives_minus_the_aggregated_advantage(tiny, mode):
    tokenizer, model = tiny
    out = GIGPOLoss(model, loss_agg_mode=mode)(batch(tokenizer, model))
    n = lengths().double()
    a = torch.tensor(ADVANTAGES, dtype=torch.float64)
    expected = {
        "token_mean": -(a * n).sum() / n.sum(),
        "seq_mean_token_mean": -a.mean(),
        "seq_mean_token_sum": -(a * n).sum() / len(n),
    }[mode]
    assert float(out["loss_objective"].detach()) == pytest.approx(float(expected), abs=1e-5)
    assert float(out["kl_to_behaviour"]) == pytest.approx(0.0, abs=1e-6)
    assert float(out["clip_fraction"]) == 0.0
    assert float(out["loss_kl_to_ref"].detach()) == 0.0


def test_clipping_and_kl_diagnostics_count_reply_tokens_only(tiny):
    tokenizer, model = tiny
    shift, ref = 0.5, 0.3  # ratio e^0.5 = 1.65 everywhere; reference log-prob + 0.3
    out = GIGPOLoss(model, beta=0.1)(batch(tokenizer, model, shift=shift, reference_shift=ref))
    # every reply token is outside [0.8, 1.2]: the true clip fraction is exactly 1
    assert float(out["clip_fraction"]) == pytest.approx(1.0)
    r = math.exp(shift)
    assert float(out["kl_to_behaviour"]) == pytest.approx(r - 1 - shift, rel=1e-5)
    k3 = math.exp(ref) - ref - 1
    assert float(out["kl_to_ref"]) == pytest.approx(k3, rel=1e-5)
    assert float(out["loss_kl_to_ref"].detach()) == pytest.approx(0.1 * k3, rel=1e-5)
    # clipped: positive advantages use 1.2·A, negative ones r·A (the min of the two)
    n = lengths().double()
    a = torch.tensor(ADVANTAGES, dtype=torch.float64)
    per_row = -torch.where(a > 0, 1.2 * a, r * a)
    expected = (per_row * n).sum() / n.sum()
    assert float(out["loss_objective"].detach()) == pytest.approx(float(expected), rel=1e-5)


def gradient(model, fn):
    model.zero_grad()
    fn()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize(("beta", "entropy_coeff"), [(0.0, 0.0), (0.2, 0.0), (0.0, 0.05)])
def test_gradient_does_not_depend_on_the_micro_batch_split(tiny, device, mode, beta, entropy_coeff):
    tokenizer, model = tiny
    model = model.to(device)
    td = batch(tokenizer, model.cpu(), shift=0.1, reference_shift=-0.2 if beta else None)
    model = model.to(device)
    terms = dict(beta=beta, entropy_coeff=entropy_coeff, loss_agg_mode=mode)
    whole = GIGPOLoss(model, **terms)

    def one_pass():
        out = whole(td)
        (out["loss_objective"] + out["loss_kl_to_ref"] + out["loss_entropy"]).backward()

    expected = gradient(model, one_pass)
    assert float(expected.abs().max()) > 0
    for rows in (1, 3, 4):
        split = GIGPOLoss(model, micro_batch_size=rows, **terms)
        got = gradient(model, lambda split=split: split.backward(td))
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4)
    by_tokens = GIGPOLoss(model, max_tokens_per_micro_batch=30, max_sequence_tokens=30, **terms)
    assert len(by_tokens.micro_batches(td)) > 1
    torch.testing.assert_close(
        gradient(model, lambda: by_tokens.backward(td)), expected, atol=1e-6, rtol=1e-4
    )
    model.cpu()


def test_a_pad_token_inside_a_reply_is_scored_and_trained(tiny):
    tokenizer, model = tiny
    td = batch(tokenizer, model, pad_in_reply=True)
    out = GIGPOLoss(model, micro_batch_size=2).backward(td)
    n = lengths() + 1  # one more token per reply: the pad
    a = torch.tensor(ADVANTAGES)
    assert float(out["loss_objective"].detach()) == pytest.approx(
        float(-(a * n).sum() / n.sum()), abs=1e-5
    )


def test_value_estimator_and_errors(tiny):
    tokenizer, model = tiny
    loss = GIGPOLoss(model)
    loss.make_value_estimator()
    assert isinstance(loss.value_estimator, GIGPOAdvantage)
    td = batch(tokenizer, model)
    del td["advantage"]
    with pytest.raises(ValueError, match="needs 'advantage'"):
        loss(td)
    td = batch(tokenizer, model)
    td.tensordicts[1].set(("log_probs", "response"), torch.zeros(7))
    with pytest.raises(ValueError, match="row 1:.*shape \\(7,\\) but its reply has 3 tokens"):
        loss(td)
    with pytest.raises(ValueError, match="loss_agg_mode='mean'"):
        GIGPOLoss(model, loss_agg_mode="mean")
    with pytest.raises(ValueError, match="max_tokens=0"):
        GIGPOLoss(model, max_tokens_per_micro_batch=0)


def test_entropy_bonus_is_minus_the_coefficient_times_the_aggregated_entropy(tiny):
    tokenizer, model = tiny
    td = batch(tokenizer, model)
    entropies = []  # per reply token, from a plain forward pass of each whole row
    for row in td.tensordicts:
        prompt, reply = row.get(("tokens", "prompt")), row.get(("tokens", "response"))
        with torch.no_grad():
            logits = model(torch.cat([prompt, reply])[None]).logits[0, len(prompt) - 1 : -1]
        p = logits.double().softmax(-1)
        entropies.append(-(p * p.log()).sum(-1))
    n = lengths().double()
    per_row = torch.stack([e.mean() for e in entropies])
    every_token = torch.cat(entropies)
    for mode, aggregate in (
        ("token_mean", every_token.mean()),
        ("seq_mean_token_mean", per_row.mean()),
        ("seq_mean_token_sum", (per_row * n).sum() / len(n)),
    ):
        out = GIGPOLoss(model, entropy_coeff=0.05, loss_agg_mode=mode)(td)
        expected = -0.05 * float(aggregate)
        assert float(out["loss_entropy"].detach()) == pytest.approx(expected, rel=1e-4)
    assert float(out["entropy"]) == pytest.approx(float(every_token.mean()), rel=1e-4)
    # the bonus raises the entropy: one gradient step on it alone increases it
    copy = make_tiny_model(tokenizer, seed=0)
    copy.load_state_dict(model.state_dict())
    optimizer = torch.optim.SGD(copy.parameters(), lr=0.5)
    before = float(GIGPOLoss(copy)(td)["entropy"])
    GIGPOLoss(copy, entropy_coeff=1.0)(td)["loss_entropy"].backward()
    optimizer.step()
    assert float(GIGPOLoss(copy)(td)["entropy"]) > before
    assert float(GIGPOLoss(model)(td)["loss_entropy"]) == 0.0
    with pytest.raises(ValueError, match="entropy_coeff=-0.1"):
        GIGPOLoss(model, entropy_coeff=-0.1)


def test_constrained_replies_are_trained_on_the_distribution_they_were_sampled_from(tiny):
    from gigpo_torchrl.collector import GroupCollector
    from gigpo_torchrl.policy import LLMPolicy

    tokenizer, model = tiny
    policy = LLMPolicy(
        model, tokenizer, max_new_tokens=8, forbid_special=True, constrain_actions=True
    )
    torch.manual_seed(0)
    collector = GroupCollector("sokoban", policy, num_groups=2, num_generations=2, max_steps=3)
    batch = GIGPOAdvantage()(collector.collect())
    assert ("allowed_tokens", "response") in batch.keys(True)
    out = GIGPOLoss(model, micro_batch_size=3).backward(batch)
    # the loss scores each reply like the sampler did: ratio 1 at every token
    assert float(out["kl_to_behaviour"]) < 1e-6 and float(out["clip_fraction"]) == 0
    # forced tokens (the only way on) have probability 1: the entropy of those is 0, so
    # the mean entropy is at most log(4) (four actions to choose among at the first token)
    assert 0 < float(out["entropy"]) < math.log(4)
