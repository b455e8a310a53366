"""Reply sampling against transformers' own ``generate`` and teacher forcing."""

import dataclasses

import pytest
import torch

from gigpo_torchrl.policy import decoding, make_char_tokenizer, make_tiny_model, sampling
from gigpo_torchrl.policy.sampling import SamplingSettings, draw, sample_replies


@pytest.fixture(params=[False, True], ids=["dynamic-cache", "static-cache"])
def static_cache(request) -> bool:
    """Both decoders: a growing cache, and the static one (a CUDA graph on a GPU)."""
    return request.param


def prompts(tokenizer):
    texts = ["<|im_start|>user\nhello", "<|im_start|>user\na longer prompt here", "x"]
    ids = [torch.tensor(tokenizer.encode(t)) for t in texts]
    return [ids[0], ids[1], ids[0], ids[2], ids[0]]  # the first prompt three times


def test_greedy_replies_equal_transformers_generate(tiny, device, static_cache):
    tokenizer, model = tiny
    model = model.to(device)
    eos = tokenizer.eos_token_id
    settings = SamplingSettings(
        max_new_tokens=12, temperature=0, eos_ids=(eos,), static_cache=static_cache
    )
    replies, _, _ = sample_replies(
        model, prompts(tokenizer), settings, pad_id=tokenizer.pad_token_id
    )
    for prompt, reply in zip(prompts(tokenizer), replies, strict=True):
        out = model.generate(
            prompt[None].to(device),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=device),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
        )[0, len(prompt) :].cpu()
        ends = torch.nonzero(out == eos)
        expected = out[: int(ends[0]) + 1] if len(ends) else out
        assert torch.equal(reply, expected)
    model.cpu()


def test_log_probs_are_the_teacher_forced_ones(tiny, static_cache):
    tokenizer, model = tiny
    torch.manual_seed(0)
    settings = SamplingSettings(
        max_new_tokens=8, temperature=1.3, top_p=0.9, static_cache=static_cache
    )
    batch = prompts(tokenizer)
    replies, log_probs, _ = sample_replies(model, batch, settings, pad_id=tokenizer.pad_token_id)
    assert [len(r) for r in replies] == [8] * 5  # no eos given: every reply is full length
    for prompt, reply, lp in zip(batch, replies, log_probs, strict=True):
        full = torch.cat([prompt, reply])[None]
        with torch.no_grad():
            expected = model(full).logits[0, len(prompt) - 1 : -1].log_softmax(-1)
        torch.testing.assert_close(lp, expected.gather(-1, reply[:, None])[:, 0], atol=1e-4, rtol=0)


def test_identical_prompts_are_prefilled_once_and_sampled_independently(tiny):
    tokenizer, model = tiny
    batch = prompts(tokenizer)
    seen = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    try:
        torch.manual_seed(1)
        replies, _, _ = sample_replies(
            model, batch, SamplingSettings(max_new_tokens=6), pad_id=tokenizer.pad_token_id
        )
    finally:
        hook.remove()
    assert seen[0][0] == 3  # three distinct prompts in the prefill, not five
    assert seen[1][0] == 5  # then one row per reply
    copies = [replies[i].tolist() for i in (0, 2, 4)]
    assert len({tuple(c) for c in copies}) > 1  # the copies are separate samples


def test_forbidden_tokens_and_eos(tiny, static_cache):
    tokenizer, model = tiny
    eos = tokenizer.eos_token_id
    forbidden = tuple(range(4, 60))  # most printable characters
    settings = SamplingSettings(
        max_new_tokens=10, eos_ids=(eos,), forbidden_ids=forbidden, static_cache=static_cache
    )
    torch.manual_seed(2)
    replies, log_probs, _ = sample_replies(
        model, prompts(tokenizer) * 4, settings, pad_id=tokenizer.pad_token_id
    )
    for reply, lp in zip(replies, log_probs, strict=True):
        assert not set(reply.tolist()) & set(forbidden)
        assert len(reply) == len(lp) and bool((lp <= 0).all())
        # a reply ends at its first eos, or runs to the limit without one
        assert eos not in reply[:-1].tolist()
        assert reply[-1] == eos or len(reply) == 10


def counting_steps(monkeypatch) -> list:
    """Calls of either decoder's ``step``, recorded in the returned list."""
    steps = []
    for decoder in (decoding.StaticDecoder, decoding.DynamicDecoder):
        step = decoder.step
        monkeypatch.setattr(decoder, "step", lambda d, t, step=step: steps.append(1) or step(d, t))
    return steps


def test_decoding_ahead_gives_the_replies_without_eos_cut_after_their_first(tiny, monkeypatch):
    """On a static cache the host queues step after step, tokens kept on the device, and a
    finished reply's row goes on sampling (cut at the end): so under one seed every reply
    is the one sampled without eos ids, cut after its first eos, with the same log-probs,
    and decoding stops at the step where the last reply ended (on a CPU, read at once)."""
    tokenizer, model = tiny
    batch = prompts(tokenizer)
    free = SamplingSettings(max_new_tokens=10, temperature=1.0, static_cache=True)
    torch.manual_seed(5)
    tokens, log_probs, _ = sample_replies(model, batch, free, pad_id=tokenizer.pad_token_id)
    # a token from each reply's third to fifth place: the replies end at different steps
    eos = tuple({int(reply[2 + i % 3]) for i, reply in enumerate(tokens)})
    ends = [min(r.tolist().index(e) for e in eos if e in r.tolist()) + 1 for r in tokens]
    assert len(set(ends)) > 1
    steps = counting_steps(monkeypatch)
    torch.manual_seed(5)
    cut = sample_replies(
        model, batch, dataclasses.replace(free, eos_ids=eos), pad_id=tokenizer.pad_token_id
    )
    assert [r.tolist() for r in cut.tokens] == [
        r[:n].tolist() for r, n in zip(tokens, ends, strict=True)
    ]
    for lp, full, n in zip(cut.log_probs, log_probs, ends, strict=True):
        assert torch.equal(lp, full[:n])
    assert len(steps) == max(ends) - 1


@pytest.mark.parametrize(
    "static, watch",
    [(True, False), (True, True), (False, True)],
    ids=["ahead", "static-every-step", "dynamic"],
)
def test_decoding_stops_at_the_step_the_last_reply_ended(tiny, monkeypatch, static, watch):
    tokenizer, model = tiny
    monkeypatch.setattr(sampling, "SYNC_EVERY_STEP", watch)
    steps = counting_steps(monkeypatch)
    # about a third of the vocabulary ends a reply: ends at different steps, all before 12
    settings = SamplingSettings(
        max_new_tokens=12, eos_ids=tuple(range(0, len(tokenizer), 3)), static_cache=static
    )
    torch.manual_seed(6)
    replies, log_probs, _ = sample_replies(
        model, prompts(tokenizer) * 2, settings, pad_id=tokenizer.pad_token_id
    )
    lengths = [len(r) for r in replies]
    assert len(set(lengths)) > 1 and max(lengths) < 12
    assert len(steps) == max(lengths) - 1
    for reply, lp in zip(replies, log_probs, strict=True):
        assert len(lp) == len(reply) and reply[-1] in settings.eos_ids
        assert not set(reply[:-1].tolist()) & set(settings.eos_ids)


def test_a_common_prefix_is_prefilled_once(tiny):
    tokenizer, model = tiny
    system = "<|im_start|>system\nYou play a text game.<|im_end|>\n<|im_start|>user\n"
    texts = [system + "go north", system + "look around you", system + "go north"]
    batch = [torch.tensor(tokenizer.encode(t)) for t in texts]
    seen = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    try:
        torch.manual_seed(3)
        settings = SamplingSettings(max_new_tokens=5, temperature=0.8)
        replies, log_probs, _ = sample_replies(
            model, batch, settings, pad_id=tokenizer.pad_token_id
        )
    finally:
        hook.remove()
    shared = len(tokenizer.encode(system))
    assert tuple(seen[0]) == (1, shared)  # the system prompt and "user" header, once
    assert tuple(seen[1]) == (2, len("look around you"))  # two distinct remainders
    for prompt, reply, lp in zip(batch, replies, log_probs, strict=True):
        with torch.no_grad():
            logits = model(torch.cat([prompt, reply])[None]).logits[0, len(prompt) - 1 : -1]
        expected = logits.log_softmax(-1).gather(-1, reply[:, None])[:, 0]
        torch.testing.assert_close(lp, expected, atol=1e-4, rtol=0)


def test_choices_restrict_replies_to_a_renormalised_distribution(tiny, static_cache):
    tokenizer, model = tiny
    eos = tokenizer.eos_token_id
    up, down, push = (tokenizer.encode(w) + [eos] for w in ("up", "down", "push"))
    batch = prompts(tokenizer)
    torch.manual_seed(4)
    settings = SamplingSettings(
        max_new_tokens=8, temperature=1.5, eos_ids=(eos,), static_cache=static_cache
    )
    choices = [[up, down, push], [up], [], [up, down, push], [down, push]]  # the third is free
    replies, log_probs, allowed = sample_replies(
        model, batch, settings, pad_id=tokenizer.pad_token_id, choices=choices
    )
    for i, (prompt, reply, lp) in enumerate(zip(batch, replies, log_probs, strict=True)):
        with torch.no_grad():
            logits = model(torch.cat([prompt, reply])[None]).logits[0, len(prompt) - 1 : -1]
        if not choices[i]:
            assert allowed[i].shape == (len(reply), 0)
            expected = logits.log_softmax(-1).gather(-1, reply[:, None])[:, 0]
            torch.testing.assert_close(lp, expected, atol=1e-4, rtol=0)
            continue
        assert reply.tolist() in choices[i]
        for t, token in enumerate(reply.tolist()):
            # the tokens that continue one of the choices after the reply so far, by hand
            ways = sorted({c[t] for c in choices[i] if c[:t] == reply[:t].tolist()})
            assert [x for x in allowed[i][t].tolist() if x >= 0] == ways
            expected = logits[t, token] - logits[t, ways].logsumexp(-1)
            assert float(lp[t]) == pytest.approx(float(expected), abs=1e-4)
    assert replies[1].tolist() == up and float(log_probs[1].abs().sum()) == 0  # forced
    # "down" and "push" differ at their first letter: the last one chose there, then forced
    assert float(log_probs[4][0]) < 0 and float(log_probs[4][1:].abs().sum()) == 0


def test_a_reply_only_one_choice_continues_is_completed_without_a_forward_pass(tiny):
    tokenizer, model = tiny
    eos = tokenizer.eos_token_id
    words = ("up", "down", "push the box")  # first tokens differ: one sampled token decides
    options = [tokenizer.encode(w) + [eos] for w in words]
    assert len({o[0] for o in options}) == 3 and len(options[2]) > 3
    batch = prompts(tokenizer)
    calls = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    try:
        torch.manual_seed(5)
        settings = SamplingSettings(max_new_tokens=16, temperature=2.0, eos_ids=(eos,))
        replies, log_probs, allowed = sample_replies(
            model, batch, settings, pad_id=tokenizer.pad_token_id, choices=[options] * len(batch)
        )
    finally:
        hook.remove()
    # the prompts' forward passes only (a shared prefix, then the remainders): no decoding
    assert all(shape[1] > 1 for shape in calls) and len(calls) <= 2
    for reply, lp, ids in zip(replies, log_probs, allowed, strict=True):
        assert reply.tolist() in options
        assert float(lp[0]) < 0 and float(lp[1:].abs().sum()) == 0  # the rest was forced
        assert [row[row >= 0].tolist() for row in ids[1:]] == [[t] for t in reply[1:].tolist()]
    assert {r.tolist()[0] for r in replies} != {options[0][0]}  # a sample, not a constant


def test_draw_inverts_the_cumulative_weights_at_one_uniform_a_row(device):
    torch.manual_seed(1)
    weights = torch.rand(6, 7, dtype=torch.float64) * (torch.rand(6, 7) > 0.4)
    weights[:, 3] += 0.1  # every row has some weight
    torch.manual_seed(2)
    picked = draw(weights.to(device).float()).cpu()
    torch.manual_seed(2)
    uniforms = torch.rand(6, dtype=torch.float64, device=device).cpu().tolist()
    rows = weights.float().double().tolist()
    for row, u, index in zip(rows, uniforms, picked.tolist(), strict=True):
        # the first entry whose running sum passes u times the row's total
        target, total = u * sum(row), 0.0
        expected = next(i for i, w in enumerate(row) if (total := total + w) > target)
        assert index == expected and row[index] > 0


def test_draw_follows_the_weights_and_never_draws_a_zero_weight(device, monkeypatch):
    weights = torch.tensor([0.0, 5.0, 0.0, 2.0, 2.9, 0.1, 0.0], device=device)
    rows = 100_000
    # several parts on a CPU: each must draw with its own uniforms
    monkeypatch.setattr(sampling, "DRAW_PART", 7 * 4_096)
    torch.manual_seed(0)
    counts = torch.bincount(draw(weights.expand(rows, -1)).cpu(), minlength=7)
    p = (weights / weights.sum()).cpu().double()
    assert counts[p == 0].sum() == 0
    # within 5 binomial standard deviations of the expected counts
    spread = 5 * (rows * p * (1 - p)).sqrt() + 1
    assert ((counts - rows * p).abs() <= spread).all(), (counts, rows * p)


def test_nucleus_sampling_draws_only_inside_the_nucleus(device):
    logits = torch.tensor([0.4, 0.05, 0.3, 0.05, 0.2], device=device).log()
    settings = SamplingSettings(max_new_tokens=1, top_p=0.85)  # 0.4 + 0.3 + 0.2 = 0.9
    torch.manual_seed(0)
    rows = 60_000
    counts = torch.bincount(sampling._pick(logits.expand(rows, -1), settings).cpu(), minlength=5)
    assert counts[1] == counts[3] == 0
    # the nucleus renormalised; counts within 5 binomial standard deviations
    p = torch.tensor([0.4, 0, 0.3, 0, 0.2], dtype=torch.float64) / 0.9
    spread = 5 * (rows * p * (1 - p)).sqrt() + 1
    assert ((counts - rows * p).abs() <= spread).all(), (counts, rows * p)


def test_nan_logits_are_reported_not_sampled(device, static_cache):
    tokenizer = make_char_tokenizer()
    model = make_tiny_model(tokenizer, seed=3).to(device)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))  # a diverged model: every logit NaN
    prompts = [torch.tensor(tokenizer.encode(t)) for t in ("go", "stay")]
    for temperature in (1.0, 0.0):
        settings = SamplingSettings(
            max_new_tokens=3, temperature=temperature, static_cache=static_cache
        )
        with pytest.raises(ValueError, match="logits are NaN .* for 2 of 2 replies"):
            sample_replies(model, prompts, settings, pad_id=tokenizer.pad_token_id)


def test_draw_keeps_rows_without_weight_in_range():
    weights = torch.tensor([[0.0, 1.0, 0.0], [float("nan")] * 3, [0.0] * 3])
    picked = draw(weights)
    assert picked[0] == 1 and ((picked >= 0) & (picked < 3)).all()
