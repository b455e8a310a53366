"""Folded grouped-query attention: its numbers against attention written out head by head,
and what a traced decode step reads (the key-value heads as stored, not copies per query
head)."""

import math

import torch

from gigpo_torchrl.policy import decoding, make_char_tokenizer, make_tiny_model
from gigpo_torchrl.policy.decoding import StaticDecoder
from gigpo_torchrl.policy.folded_attention import FOLDED, folded_sdpa, folding_gqa
from gigpo_torchrl.policy.prefill import prefill_prompts
from gigpo_torchrl.policy.sampling import SamplingSettings, sample_replies


class Grouped(torch.nn.Module):
    num_key_value_groups = 3


def test_folded_attention_equals_attention_written_out_per_head():
    torch.manual_seed(0)
    batch, heads, kv_heads, length, dim = 2, 6, 2, 5, 4
    query = torch.randn(batch, heads, 1, dim)
    key, value = torch.randn(2, batch, kv_heads, length, dim)
    mask = torch.rand(batch, 1, 1, length) > 0.4
    mask[..., 0] = True
    out, _ = folded_sdpa(Grouped(), query, key, value, mask, scaling=0.3)
    assert out.shape == (batch, 1, heads, dim)
    for b in range(batch):
        for h in range(heads):
            kv = h // (heads // kv_heads)  # query heads 0-2 share key-value head 0
            scores = [0.3 * float(query[b, h, 0] @ key[b, kv, j]) for j in range(length)]
            kept = [j for j in range(length) if mask[b, 0, 0, j]]
            weights = [math.exp(scores[j]) for j in kept]
            expected = sum(w * value[b, kv, j] for w, j in zip(weights, kept, strict=True))
            torch.testing.assert_close(out[b, 0, h], expected / sum(weights), atol=1e-5, rtol=0)


def test_a_decode_step_under_folding_equals_eager_attention(device):
    tokenizer = make_char_tokenizer()
    model = make_tiny_model(tokenizer, seed=3).to(device)
    prompts = [torch.tensor(tokenizer.encode(t)) for t in ("go north", "a longer prompt")]
    with torch.no_grad():
        kv, mask, _ = prefill_prompts(
            model, prompts, pad_id=tokenizer.pad_token_id, cache_keyword="cache"
        )
        rows = torch.arange(2, device=device)
        decoder = StaticDecoder(model, kv, rows, mask, 2, "cache", capture=False)
        token = torch.tensor([5, 9], device=device)
        with folding_gqa(model):
            assert model.config._attn_implementation == FOLDED
            folded = decoder.step(token)
        assert model.config._attn_implementation == "sdpa"  # restored
        # the reference: eager attention (keys and values repeated per head), whole sequences
        model.set_attn_implementation("eager")
        for i, prompt in enumerate(prompts):
            ids = torch.cat([prompt.to(device), token[i : i + 1]])[None]
            expected = model(ids).logits[0, -1].float()
            torch.testing.assert_close(folded[i], expected, atol=2e-4, rtol=0)
        model.set_attn_implementation("sdpa")


def traced_attention_inputs(fold: bool) -> list[tuple]:
    """Shapes of the query and key of every attention call in a decode step of the tiny
    model (4 query heads on 2 key-value heads), as dynamo traces it."""
    tokenizer = make_char_tokenizer()
    model = make_tiny_model(tokenizer, seed=4)
    prompts = [torch.tensor(tokenizer.encode(t)) for t in ("north", "south")]
    shapes = []

    def record(graph, example_inputs):
        sdpa = torch._C._nn.scaled_dot_product_attention
        for node in graph.graph.nodes:
            if node.op == "call_function" and node.target is sdpa:
                query, key = (node.args[i].meta["example_value"] for i in (0, 1))
                shapes.append((tuple(query.shape), tuple(key.shape)))
        return graph.forward

    with torch.no_grad():
        kv, mask, _ = prefill_prompts(
            model, prompts, pad_id=tokenizer.pad_token_id, cache_keyword="cache"
        )
        decoder = StaticDecoder(model, kv, torch.arange(2), mask, 2, "cache", capture=False)
        b = decoder.bucket
        step = torch.compile(decoding._decode_forward, backend=record, fullgraph=True)
        inputs = (model, "cache", b.ids, b.attend, b.positions, b.kv, None)
        if fold:
            with folding_gqa(model):
                step(*inputs)
        else:
            step(*inputs)
    torch._dynamo.reset()
    return shapes


def test_a_traced_decode_step_reads_the_key_value_heads_as_stored():
    batch, length = decoding.MIN_BATCH_BUCKET, decoding.LENGTH_BUCKET  # the bucket
    folded = traced_attention_inputs(fold=True)
    assert folded == [((batch, 2, 2, 16), (batch, 2, length, 16))] * 2  # per layer
    # transformers' own SDPA path, traced, copies each key-value head out to its query heads
    expanded = traced_attention_inputs(fold=False)
    assert expanded == [((batch, 4, 1, 16), (batch, 4, length, 16))] * 2


def test_the_compiled_decode_step_samples_the_teacher_forced_log_probs(device):
    tokenizer = make_char_tokenizer()
    model = make_tiny_model(tokenizer, seed=5).to(device)
    prompts = [torch.tensor(tokenizer.encode(t)) for t in ("<|im_start|>user\nhi", "go west")]
    settings = SamplingSettings(
        max_new_tokens=5, temperature=1.0, static_cache=True, compile_decode=True
    )
    torch.manual_seed(0)
    replies, log_probs, _ = sample_replies(model, prompts, settings, pad_id=tokenizer.pad_token_id)
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        for prompt, reply, lp in zip(prompts, replies, log_probs, strict=True):
            ids = torch.cat([prompt, reply])[None].to(device)
            logits = model(ids).logits[0, len(prompt) - 1 : -1].float().cpu()
            expected = logits.log_softmax(-1).gather(-1, reply[:, None])[:, 0]
            atol = 1e-4 if device == "cpu" else 1e-3
            torch.testing.assert_close(lp, expected, atol=atol, rtol=0)
