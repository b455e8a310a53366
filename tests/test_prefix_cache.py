"""Prompts kept between sampler calls: the tree by hand, the outputs against each prompt
encoded alone, and when the kept keys and values are dropped."""

import pytest
import torch

from gigpo_torchrl.collector import GroupCollector
from gigpo_torchrl.policy import LLMPolicy, make_char_tokenizer, make_tiny_model, prefill
from gigpo_torchrl.policy.actor import policy_inputs
from gigpo_torchrl.policy.prefill import (
    longest_openings,
    plan,
    prefill_prompts,
    prefix_tree,
    reuse,
    schedule,
)
from gigpo_torchrl.policy.prefix_cache import PrefixCache
from gigpo_torchrl.policy.sampling import SamplingSettings, sample_replies
from tests.prefill_checks import assert_rows_continue_their_prompts


def shape(nodes):
    return [(n.start, n.end, n.parent, n.terminal, n.level, n.cached) for n in nodes]


SYSTEM = list(range(100, 110))  # 10 tokens every prompt opens with
PROMPTS = [SYSTEM + [1, 2, 9], SYSTEM + [3, 4, 5], SYSTEM + [6]]
KEPT = [SYSTEM + [1, 2, 3], SYSTEM + [3, 4]]


def test_each_prompt_continues_the_longest_opening_it_shares_with_a_kept_prompt():
    # 12 tokens of the first kept prompt, 12 of the second (its last token left out: the
    # logits come from encoding it), 10 of either
    assert longest_openings(PROMPTS, KEPT, min_run=8) == [(12, 0), (12, 1), (10, 1)]
    nodes = reuse(prefix_tree(PROMPTS, min_run=8), PROMPTS, KEPT, min_run=8)
    assert shape(nodes) == [
        (0, 10, -1, -1, 0, 1),  # the system run, from a kept prompt
        (0, 12, -1, -1, 0, 0),  # the first prompt's first 12 tokens, kept
        (12, 13, 1, 0, 0, -1),
        (0, 12, -1, -1, 0, 1),
        (12, 13, 3, 1, 0, -1),
        (10, 11, 0, 2, 0, -1),  # continues the system run
    ]
    # everything left to encode is on level 0: one call, of 3 of the 17 tokens
    assert [sorted(call) for call in schedule(nodes, float("inf"))] == [[2, 4, 5]]
    for device_type in ("cpu", "cuda"):  # the tree has two levels: the same on a GPU
        nodes, calls, reused = plan(PROMPTS, device_type, KEPT)
        assert len(calls) == 1 and reused == 17 - 3


def test_a_kept_opening_that_a_shorter_prompt_ends_in_and_short_matches():
    nodes = prefix_tree(PROMPTS, min_run=8)
    assert shape(reuse(nodes, PROMPTS, [SYSTEM[:7]], min_run=8)) == shape(nodes)
    assert shape(reuse(nodes, PROMPTS, [], min_run=8)) == shape(nodes)
    # a prompt that ends in the kept opening keeps its last token encoded, for its logits, and
    # the prompt that goes on continues that token's row
    prompts = [SYSTEM, SYSTEM + [1]]
    nodes = reuse(prefix_tree(prompts, min_run=8), prompts, [SYSTEM + [1, 2]], min_run=8)
    assert shape(nodes) == [(0, 9, -1, -1, 0, 0), (9, 10, 0, 0, 0, -1), (10, 11, 1, 1, 1, -1)]


def encode(tokenizer, texts):
    return [torch.tensor(tokenizer.encode(t)) for t in texts]


SYSTEM_TEXT = "<|im_start|>system\nYou play a text game.<|im_end|>\n<|im_start|>user\n"
TURN_1 = [SYSTEM_TEXT + "Task: reach the goal.", SYSTEM_TEXT + "Task: push the box."]
TURN_2 = [SYSTEM_TEXT + "Task: reach the goal. You moved.", SYSTEM_TEXT + "Task: wait."]


def real_tokens(model, pad, call):
    """``call()``'s result and the prompt tokens its forwards encoded (padding left out)."""
    seen = []
    hook = model.model.embed_tokens.register_forward_hook(
        lambda m, i, o: seen.append(int((i[0] != pad).sum()))
    )
    try:
        return call(), sum(seen)
    finally:
        hook.remove()


@pytest.mark.parametrize("device_type", ["cpu", "cuda"], ids=["tree", "two-levels"])
def test_the_next_turn_continues_the_kept_prompts_and_equals_prompts_encoded_alone(
    tiny, monkeypatch, device_type
):
    tokenizer, model = tiny
    # the plan a GPU would make, on the CPU
    monkeypatch.setitem(prefill.MAX_LEVELS, "cpu", prefill.MAX_LEVELS.get(device_type, 2))
    inf = float("inf")
    monkeypatch.setitem(prefill.CALL_TOKENS, "cpu", prefill.CALL_TOKENS.get(device_type, inf))
    cache = PrefixCache()
    pad = tokenizer.pad_token_id
    first = encode(tokenizer, TURN_1)
    prefill_prompts(model, first, pad_id=pad, cache_keyword="cache", prefix_cache=cache)
    assert cache.kept.tokens == [tuple(p.tolist()) for p in first]
    assert cache.reused_tokens == 0
    prompts = encode(tokenizer, TURN_2)
    (kv, mask, logits), tokens = real_tokens(
        model,
        pad,
        lambda: prefill_prompts(
            model, prompts, pad_id=pad, cache_keyword="cache", prefix_cache=cache
        ),
    )
    _, fresh = real_tokens(
        model, pad, lambda: prefill_prompts(model, prompts, pad_id=pad, cache_keyword="cache")
    )
    # the first prompt goes on from the whole of the last turn's first prompt; the second
    # shares the system run and "Task: " with it, which the tree encodes once
    assert cache.reused_tokens == fresh - tokens == len(first[0])
    assert_rows_continue_their_prompts(model, tokenizer, prompts, kv, mask, logits)
    assert cache.kept.tokens == [tuple(p.tolist()) for p in prompts]  # the last call's only


def test_kept_runs_are_dropped_when_the_weights_or_autocast_change():
    tokenizer = make_char_tokenizer()
    model = make_tiny_model(tokenizer, seed=1)
    cache, pad = PrefixCache(), tokenizer.pad_token_id

    def turn(texts):
        return prefill_prompts(
            model, encode(tokenizer, texts), pad_id=pad, cache_keyword="cache", prefix_cache=cache
        )[2]

    turn(TURN_1)
    assert cache.valid_for(model) is not None
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model(encode(tokenizer, ["ab"])[0][None]).logits.sum().backward()
    optimizer.step()  # in place: the parameters' version counters move
    assert cache.valid_for(model) is None
    turn(TURN_1)
    reused = cache.reused_tokens
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cache.valid_for(model) is None  # kept in float32, asked for under autocast
    turn(TURN_1)
    logits = turn(TURN_2)
    assert cache.reused_tokens > reused
    fresh = prefill_prompts(model, encode(tokenizer, TURN_2), pad_id=pad, cache_keyword="cache")[2]
    torch.testing.assert_close(logits, fresh, atol=1e-4, rtol=0)
    # a write through .data is invisible to the counters: the kept prompts are stale until cleared
    with torch.no_grad():
        for p in model.parameters():
            p.data.mul_(1.5)
    fresh = prefill_prompts(model, encode(tokenizer, TURN_2), pad_id=pad, cache_keyword="cache")[2]
    assert (turn(TURN_2) - fresh).abs().max() > 1e-3
    cache.clear()
    turn(TURN_1)
    torch.testing.assert_close(turn(TURN_2), fresh, atol=1e-4, rtol=0)


@pytest.mark.parametrize("static_cache", [False, True], ids=["dynamic-cache", "static-cache"])
def test_sampled_log_probs_with_kept_runs_are_the_teacher_forced_ones(device, static_cache):
    tokenizer = make_char_tokenizer()
    model = make_tiny_model(tokenizer, seed=0).to(device)
    settings = SamplingSettings(
        max_new_tokens=6, eos_ids=(tokenizer.eos_token_id,), static_cache=static_cache
    )
    cache = PrefixCache()
    torch.manual_seed(0)
    for texts in (TURN_1, TURN_2, TURN_2[::-1]):
        prompts = encode(tokenizer, texts)
        replies = sample_replies(
            model, prompts, settings, pad_id=tokenizer.pad_token_id, prefix_cache=cache
        )
        for prompt, reply, log_probs in zip(
            prompts, replies.tokens, replies.log_probs, strict=True
        ):
            with torch.no_grad():
                full = model(torch.cat([prompt, reply])[None].to(device)).logits[0]
            expected = full.log_softmax(-1)[len(prompt) - 1 : -1].gather(
                -1, reply[:, None].to(device)
            )
            torch.testing.assert_close(log_probs, expected.squeeze(-1).cpu(), atol=1e-4, rtol=0)
    assert cache.reused_tokens > 0


def test_the_collector_clears_the_kept_runs_at_every_batch(tiny):
    tokenizer, model = tiny
    model = make_tiny_model(tokenizer, seed=2)
    policy = LLMPolicy(model, tokenizer, max_new_tokens=4, forbid_special=True)
    collector = GroupCollector("lake-walk", policy, num_groups=2, num_generations=2, max_steps=3)
    collector.collect()
    assert policy.prefix_cache.reused_tokens > 0  # the turns after the first continued it
    assert policy.prefix_cache.kept is None  # released for the update
    policy(policy_inputs(["a prompt kept outside a batch"]))
    assert policy.prefix_cache.kept is not None
    with torch.no_grad():  # unseen by the version counters
        for p in model.parameters():
            p.data.mul_(1.5)
    batch = collector.collect()
    full = batch.get(("tokens", "full"), as_list=True)
    behaviour = batch.get(("log_probs", "full"), as_list=True)
    for tokens, log_probs in zip(full, behaviour, strict=True):
        scored = policy.score([tokens])[0]
        reply = ~log_probs.isnan()
        torch.testing.assert_close(log_probs[reply], scored[reply], atol=1e-4, rtol=0)
