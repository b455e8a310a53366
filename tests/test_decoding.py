"""The decoders: the static cache (a CUDA graph on a GPU) across calls, buckets and weight
updates; the growing cache against transformers' own ``DynamicCache``."""

import pytest
import torch
from transformers import DynamicCache

from gigpo_torchrl.policy import decoding, make_char_tokenizer, make_tiny_model, weight_copies
from gigpo_torchrl.policy.decoding import LENGTH_BUCKET, DynamicDecoder
from gigpo_torchrl.policy.prefill import prefill_prompts
from gigpo_torchrl.policy.sampling import SamplingSettings, sample_replies


def teacher_forced(model, prompt, reply):
    with torch.no_grad():
        logits = model(torch.cat([prompt, reply])[None].to(model.device)).logits
    return (
        logits[0, len(prompt) - 1 : -1]
        .float()
        .log_softmax(-1)
        .gather(-1, reply[:, None].to(logits.device))[:, 0]
        .cpu()
    )


def check(model, tokenizer, texts, max_new_tokens=6, atol=1e-4):
    batch = [torch.tensor(tokenizer.encode(t)) for t in texts]
    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=1.2, static_cache=True)
    replies, log_probs, _ = sample_replies(model, batch, settings, pad_id=tokenizer.pad_token_id)
    assert [len(r) for r in replies] == [max_new_tokens] * len(batch)  # no eos given
    for prompt, reply, lp in zip(batch, replies, log_probs, strict=True):
        torch.testing.assert_close(lp, teacher_forced(model, prompt, reply), atol=atol, rtol=0)
    return replies


def test_calls_share_buckets_grow_and_follow_weight_updates(device):
    torch.manual_seed(0)
    tokenizer = make_char_tokenizer()
    model = make_tiny_model(tokenizer, seed=1).to(device)
    atol = 1e-4 if device == "cpu" else 1e-3
    check(model, tokenizer, ["<|im_start|>user\nhello"] * 3 + ["a different one"], atol=atol)
    # fewer rows, same bucket: the spare rows and stale cache entries must not leak in
    check(model, tokenizer, ["x", "yz"], atol=atol)
    # a prompt longer than the bucket: the storage grows
    check(model, tokenizer, ["long " * LENGTH_BUCKET, "short"], atol=atol)
    # an optimizer step changes the weights in place: the next decode sees them
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    check(model, tokenizer, ["<|im_start|>user\nhello", "again"], atol=atol)
    # a replaced parameter (new memory) starts afresh
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() * 1.5)
    check(model, tokenizer, ["<|im_start|>user\nhello", "again"], atol=atol)


def test_static_and_dynamic_decoders_agree_under_bfloat16_autocast(device):
    tokenizer = make_char_tokenizer()
    model = make_tiny_model(tokenizer, seed=2).to(device)
    batch = [torch.tensor(tokenizer.encode(t)) for t in ("<|im_start|>user\nhi", "go west")]
    out = {}
    for static in (False, True):
        torch.manual_seed(3)
        settings = SamplingSettings(max_new_tokens=8, temperature=0, static_cache=static)
        with torch.autocast(device, dtype=torch.bfloat16):
            out[static] = sample_replies(model, batch, settings, pad_id=tokenizer.pad_token_id)
    for a, b in zip(out[False].log_probs, out[True].log_probs, strict=True):
        # greedy, so the same tokens unless two logits tie within bfloat16's precision
        torch.testing.assert_close(a, b, atol=0.05, rtol=0)
    assert [r.tolist() for r in out[False].tokens] == [r.tolist() for r in out[True].tokens]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_step_replays_a_graph_on_cuda():
    tokenizer = make_char_tokenizer()
    model = make_tiny_model(tokenizer, seed=4).to("cuda")
    batch = [torch.tensor(tokenizer.encode(t)) for t in ("one prompt", "another prompt")]
    settings = SamplingSettings(max_new_tokens=10, temperature=1.0, static_cache=True)
    calls = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        sample_replies(model, batch, settings, pad_id=tokenizer.pad_token_id)
        first = len(calls)  # the prefill, then a warm-up step and the capture
        replies, log_probs, _ = sample_replies(
            model, batch, settings, pad_id=tokenizer.pad_token_id
        )
    finally:
        hook.remove()
    # the second call finds its bucket's graph: only the prefill runs the Python modules
    assert (first, len(calls) - first) == (3, 1)
    for prompt, reply, lp in zip(batch, replies, log_probs, strict=True):
        torch.testing.assert_close(lp, teacher_forced(model, prompt, reply), atol=1e-3, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_graph_is_captured_again_when_the_decoding_way_changes(monkeypatch):
    tokenizer = make_char_tokenizer()
    model = make_tiny_model(tokenizer, seed=5).to("cuda")
    texts = ["one prompt", "another prompt"]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        check(model, tokenizer, texts, atol=0.05)  # captured reading the bfloat16 copies
        monkeypatch.setattr(weight_copies, "ENABLED", False)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.2)
        # a graph still reading the (now stale) copies would miss the new weights
        check(model, tokenizer, texts, atol=0.05)


def test_the_cache_grows_by_half_again_so_growing_prompts_rarely_reallocate():
    tokenizer = make_char_tokenizer()
    model = make_tiny_model(tokenizer, seed=6)
    check(model, tokenizer, ["a" * 1010])  # 1,016 positions: one 1,024 bucket
    first = decoding._STORES[model]
    check(model, tokenizer, ["b" * 1100])  # needs 1,152: the storage grows to 1,536
    grown = decoding._STORES[model]
    assert grown is not first and (first.length, grown.length) == (1024, 1536)
    check(model, tokenizer, ["c" * 1400, "d"])  # fits: same storage, nothing reallocated
    assert decoding._STORES[model] is grown


def test_held_bytes_counts_the_kept_cache_and_weight_copies():
    tokenizer = make_char_tokenizer()
    model = make_tiny_model(tokenizer, seed=7)
    assert decoding.held_bytes(model) == 0
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    # two short prompts and 6 new tokens: one bucket of 8 rows and 128 positions per layer
    cache_values = config.num_hidden_layers * 2 * 8 * config.num_key_value_heads * 128 * head_dim
    check(model, tokenizer, ["hi", "go"])  # float32, no weight copies
    assert decoding.held_bytes(model) == cache_values * 4
    linear = sum(
        p.numel()
        for m in model.modules()
        if isinstance(m, torch.nn.Linear)
        for p in m.parameters(recurse=False)
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a new layout: a bfloat16 store
        check(model, tokenizer, ["hi", "go"], atol=0.05)
    assert decoding.held_bytes(model) == (cache_values + linear) * 2
    decoding.release(model)
    assert decoding.held_bytes(model) == 0
    check(model, tokenizer, ["hi", "go"])  # allocated again
    assert decoding.held_bytes(model) == cache_values * 4


@pytest.mark.parametrize(
    "texts",
    [("short", "a longer prompt", "mid one"), ("same", "size", "four")],
    ids=["padded", "unpadded"],
)
def test_growing_cache_steps_as_a_concatenating_dynamic_cache(monkeypatch, texts):
    """Room for 2 steps at first, so 9 steps must grow the storage; a duplicated prompt row,
    a row dropped before the first step and one after the fourth. The reference steps
    transformers' ``DynamicCache`` (which concatenates) with a 2-D mask, as the decoder did
    before it kept room."""
    monkeypatch.setattr(decoding, "INITIAL_ROOM", 2)
    tokenizer = make_char_tokenizer()
    model = make_tiny_model(tokenizer, seed=5)
    prompts = [torch.tensor(tokenizer.encode(t)) for t in texts]
    pad_id = tokenizer.pad_token_id
    kv, mask, _ = prefill_prompts(model, prompts, pad_id=pad_id, cache_keyword="cache")
    rows = torch.tensor([0, 1, 1, 2, 0])
    decoder = DynamicDecoder(model, kv, rows, mask[rows], 9, "cache")
    ref_cache = DynamicCache(
        ddp_cache_data=[(k[rows], v[rows]) for k, v in zip(*kv, strict=True)],
        config=model.config,
    )
    ref_mask = mask[rows]
    # with left padding, the same numbers (seeded runs unchanged); without it transformers
    # drops the mask and attention takes another kernel path: float rounding apart
    atol = 0.0 if (mask == 0).any() else 1e-5
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for drop in [4, None, None, None, 1, None, None, None, None]:
            if drop is not None:  # that reply ended: its row leaves
                keep = torch.tensor([i for i in range(len(ref_mask)) if i != drop])
                decoder.keep(keep)
                ref_cache.reorder_cache(keep)
                ref_mask = ref_mask[keep]
            token = torch.randint(4, len(tokenizer), (len(ref_mask),), generator=generator)
            logits = decoder.step(token)
            ref_mask = torch.cat([ref_mask, torch.ones_like(ref_mask[:, :1])], 1)
            expected = model(
                input_ids=token[:, None],
                attention_mask=ref_mask,
                position_ids=ref_mask.sum(-1, keepdim=True) - 1,
                cache=ref_cache,
            ).logits[:, -1]
            torch.testing.assert_close(logits, expected, atol=atol, rtol=0)
    assert decoder.kv.keys[0].shape[2] == mask.shape[1] + 9  # grown to the limit, no further
