"""Shared prompt prefixes kept between sampler calls: the tree by hand, its invariants, the
outputs against each prompt encoded alone, and when the kept keys and values are dropped."""

import pytest
import torch

from gigpo_torchrl.collector import GroupCollector
from gigpo_torchrl.policy import LLMPolicy, make_char_tokenizer, make_tiny_model, prefill
from gigpo_torchrl.policy.prefill import (
    plan,
    prefill_prompts,
    prefix_tree,
    reuse,
    schedule,
    shared_roots,
)
from gigpo_torchrl.policy.prefix_cache import PrefixCache
from gigpo_torchrl.policy.sampling import SamplingSettings, sample_replies
from tests.prefill_checks import assert_rows_continue_their_prompts


@pytest.fixture(scope="module")
def tiny():
    tokenizer = make_char_tokenizer()
    return tokenizer, make_tiny_model(tokenizer, seed=0)


def shape(nodes):
    return [(n.start, n.end, n.parent, n.terminal, n.level, n.cached) for n in nodes]


SYSTEM = list(range(100, 110))  # 10 tokens every prompt opens with
PROMPTS = [SYSTEM + [1, 2], SYSTEM + [3, 4, 5], SYSTEM + [6]]


def test_a_root_that_is_a_kept_run_is_not_encoded():
    nodes = reuse(prefix_tree(PROMPTS, min_run=8), PROMPTS, [SYSTEM + [7, 7]], min_run=8)
    assert shape(nodes) == [
        (0, 10, -1, -1, 0, 0),  # the system run, from kept run 0
        (10, 12, 0, 0, 1, -1),
        (10, 13, 0, 1, 1, -1),
        (10, 11, 0, 2, 1, -1),
    ]
    assert [sorted(call) for call in schedule(nodes, float("inf"))] == [[1, 2, 3]]
    assert shared_roots(nodes) == []  # nothing new to keep


def test_a_root_longer_than_its_kept_run_is_split_after_it():
    kept = [(5,) * 9, tuple(SYSTEM[:9]) + (0,)]  # the longest match wins: 9 of the second
    nodes = reuse(prefix_tree(PROMPTS, min_run=8), PROMPTS, kept, min_run=8)
    assert shape(nodes) == [
        (0, 9, -1, -1, 0, 1),
        (9, 10, 0, -1, 1, -1),  # the rest of the system run, a level deeper
        (10, 12, 1, 0, 2, -1),
        (10, 13, 1, 1, 2, -1),
        (10, 11, 1, 2, 2, -1),
    ]
    assert shared_roots(nodes) == [1]  # kept next: the whole system run, from token 0
    # on a GPU (the tree cut to two levels) the same: the rest of the system run, then
    # every prompt's rest; once the whole system run is kept, one call
    assert shape(plan(PROMPTS, "cuda", kept)[0]) == shape(nodes)
    nodes, calls = plan(PROMPTS, "cuda", [SYSTEM])
    assert [n.cached for n in nodes] == [0, -1, -1, -1] and len(calls) == 1


def test_short_matches_and_a_prompt_ending_in_the_root():
    nodes = prefix_tree(PROMPTS, min_run=8)
    assert shape(reuse(nodes, PROMPTS, [SYSTEM[:7]], min_run=8)) == shape(nodes)
    # a prompt that is the shared run itself keeps its last token encoded, for its logits
    prompts = [SYSTEM, SYSTEM + [1]]
    nodes = reuse(prefix_tree(prompts, min_run=8), prompts, [SYSTEM + [1, 2]], min_run=8)
    assert shape(nodes) == [(0, 9, -1, -1, 0, 0), (9, 10, 0, 0, 1, -1), (10, 11, 1, 1, 2, -1)]


def encode(tokenizer, texts):
    return [torch.tensor(tokenizer.encode(t)) for t in texts]


SYSTEM_TEXT = "<|im_start|>system\nYou play a text game.<|im_end|>\n<|im_start|>user\n"
TURN_1 = [SYSTEM_TEXT + "Task: reach the goal.", SYSTEM_TEXT + "Task: push the box."]
TURN_2 = [SYSTEM_TEXT + "Task: reach the goal. You moved.", SYSTEM_TEXT + "Task: wait."]


def forward_tokens(model, call):
    seen = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, i, o: seen.append(i[0].numel()))
    try:
        return call(), sum(seen)
    finally:
        hook.remove()


@pytest.mark.parametrize("device_type", ["cpu", "cuda"], ids=["tree", "two-levels"])
def test_the_next_turn_continues_the_kept_run_and_equals_prompts_encoded_alone(
    tiny, monkeypatch, device_type
):
    tokenizer, model = tiny
    # the plan a GPU would make, on the CPU
    monkeypatch.setitem(prefill.MAX_LEVELS, "cpu", prefill.MAX_LEVELS.get(device_type, 2))
    inf = float("inf")
    monkeypatch.setitem(prefill.CALL_TOKENS, "cpu", prefill.CALL_TOKENS.get(device_type, inf))
    cache = PrefixCache()
    pad = tokenizer.pad_token_id
    prefill_prompts(
        model, encode(tokenizer, TURN_1), pad_id=pad, cache_keyword="cache", prefix_cache=cache
    )
    shared = len(tokenizer.encode(SYSTEM_TEXT + "Task: "))
    assert [len(e.tokens) for e in cache.entries] == [shared]
    assert cache.reused_tokens == 0
    prompts = encode(tokenizer, TURN_2)
    (kv, mask, logits), tokens = forward_tokens(
        model,
        lambda: prefill_prompts(
            model, prompts, pad_id=pad, cache_keyword="cache", prefix_cache=cache
        ),
    )
    _, fresh = forward_tokens(
        model, lambda: prefill_prompts(model, prompts, pad_id=pad, cache_keyword="cache")
    )
    assert cache.reused_tokens == shared
    assert fresh - tokens == shared  # the kept run was not encoded again
    assert_rows_continue_their_prompts(model, tokenizer, prompts, kv, mask, logits)


def test_kept_runs_are_dropped_when_the_weights_or_autocast_change():
    tokenizer = make_char_tokenizer()
    model = make_tiny_model(tokenizer, seed=1)
    cache, pad = PrefixCache(), tokenizer.pad_token_id

    def turn(texts):
        return prefill_prompts(
            model, encode(tokenizer, texts), pad_id=pad, cache_keyword="cache", prefix_cache=cache
        )[2]

    turn(TURN_1)
    assert len(cache.valid_for(model)) == 1
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model(encode(tokenizer, ["ab"])[0][None]).logits.sum().backward()
    optimizer.step()  # in place: the parameters' version counters move
    assert cache.valid_for(model) == []
    turn(TURN_1)
    reused = cache.reused_tokens
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cache.valid_for(model) == []  # kept in float32, asked for under autocast
    turn(TURN_1)
    logits = turn(TURN_2)
    assert cache.reused_tokens > reused
    fresh = prefill_prompts(model, encode(tokenizer, TURN_2), pad_id=pad, cache_keyword="cache")[2]
    torch.testing.assert_close(logits, fresh, atol=1e-4, rtol=0)
    # a write through .data is invisible to the counters: the kept run is stale until cleared
    with torch.no_grad():
        for p in model.parameters():
            p.data.mul_(1.5)
    fresh = prefill_prompts(model, encode(tokenizer, TURN_2), pad_id=pad, cache_keyword="cache")[2]
    assert (turn(TURN_2) - fresh).abs().max() > 1e-3
    cache.clear()
    turn(TURN_1)
    torch.testing.assert_close(turn(TURN_2), fresh, atol=1e-4, rtol=0)


def test_bad_sizes_are_refused_and_the_least_recently_used_run_goes():
    with pytest.raises(ValueError, match="max_entries=0"):
        PrefixCache(0)
    cache = PrefixCache(2)
    for tokens in ([1], [2], [1], [3]):
        cache.keep(tokens, [])
    assert [e.tokens for e in cache.entries] == [(1,), (3,)]
    cache.used(cache.entries[0], 1)
    assert [e.tokens for e in cache.entries] == [(3,), (1,)]
    assert cache.reused_tokens == 1


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
