"""The frozen bottom layers encoded once per batch against the whole forward of each
mini-batch: the same log-probs and gradients, each trie node encoded once."""

import pytest
import torch
from tensordict import TensorDict, lazy_stack
from transformers import GPT2Config, GPT2LMHeadModel

from gigpo_torchrl.objectives import GIGPOLoss
from gigpo_torchrl.policy import (
    attention_kernels,
    make_char_tokenizer,
    make_tiny_model,
    weight_copies,
)
from gigpo_torchrl.policy.frozen_layers import frozen_depth, layer_range
from gigpo_torchrl.policy.packing import encode_frozen, pack_rows, reply_log_probs
from gigpo_torchrl.train.trainer import train_top_layers


@pytest.fixture(scope="module")
def three_layers():
    """A tiny random model of three layers, the top one trained, and its tokenizer."""
    tokenizer = make_char_tokenizer()
    model = make_tiny_model(tokenizer, seed=1, num_layers=3)
    train_top_layers(model, 1)
    return tokenizer, model


def encode(tokenizer, text):
    return torch.tensor(tokenizer.encode(text, add_special_tokens=False))


def rows(tokenizer):
    """Prompts sharing openings at several depths, a prompt repeated with other replies, a
    prompt that opens with another whole prompt and its reply."""
    a = encode(tokenizer, "<|im_start|>user\nyou see a door<|im_end|>\n")
    b = encode(tokenizer, "<|im_start|>user\nyou see a key<|im_end|>\n")
    c = torch.cat([a, encode(tokenizer, "open"), encode(tokenizer, "\nit opens")])
    return [
        (a, encode(tokenizer, "open")),
        (b, encode(tokenizer, "take")),
        (a, encode(tokenizer, "look")),
        (c, encode(tokenizer, "go")),
        (b, encode(tokenizer, "take it")),
        (a, encode(tokenizer, "open")),
    ]


def log_probs_and_grads(model, packed, **kwargs):
    model.zero_grad()
    log_probs, _ = reply_log_probs(model, packed, **kwargs)
    log_probs.square().sum().backward()
    return log_probs.detach(), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


def test_frozen_depth_counts_the_frozen_layers_below_a_trained_one():
    tokenizer = make_char_tokenizer()
    model = make_tiny_model(tokenizer, num_layers=3)
    assert frozen_depth(model) == 0  # everything trained
    assert frozen_depth(model) == 0 and train_top_layers(model, 1) == [2]
    assert frozen_depth(model) == 2
    train_top_layers(model, 3)
    assert frozen_depth(model) == 0  # no frozen layer
    train_top_layers(model, 2)
    assert frozen_depth(model) == 1
    model.get_input_embeddings().requires_grad_(True)
    assert frozen_depth(model) == 0  # gradients reach the embedding through every layer
    model.requires_grad_(False)
    assert frozen_depth(model) == 0  # nothing trained
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    gpt2.requires_grad_(False)
    gpt2.transformer.h[1].requires_grad_(True)
    assert frozen_depth(gpt2) == 0  # not a supported decoder


@pytest.mark.parametrize("max_sequence", [512, 24])
def test_log_probs_and_gradients_from_frozen_states_equal_the_whole_forward(
    three_layers, device, max_sequence
):
    tokenizer, model = three_layers
    model.to(device)
    data = rows(tokenizer)
    prompts, replies = [p for p, _ in data], [r for _, r in data]
    frozen = encode_frozen(
        model, prompts, replies, depth=2, max_tokens=64, max_sequence=max_sequence
    )
    # one state per distinct opening of the rows' full sequences: each trie node once
    openings = {
        tuple(torch.cat([p, r])[:k].tolist())
        for p, r in data
        for k in range(1, len(p) + len(r) + 1)
    }
    assert frozen.hidden.shape == (len(openings), model.config.hidden_size)
    assert len(frozen.index) == len(openings)
    for mini in ([0, 1, 2, 3, 4, 5], [3, 1], [5, 2, 0]):
        args = ([prompts[i] for i in mini], [replies[i] for i in mini])
        plain = pack_rows(*args, max_sequence=max_sequence)
        indexed = pack_rows(*args, max_sequence=max_sequence, index=frozen.index)
        assert torch.equal(plain.input_ids, indexed.input_ids)
        want, want_grads = log_probs_and_grads(model, plain.to(device))
        got, got_grads = log_probs_and_grads(model, indexed.to(device), frozen=frozen)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert got_grads.keys() == want_grads.keys()
        assert all(name.startswith(("model.layers.2.", "model.norm.")) for name in got_grads)
        for name, grad in want_grads.items():
            torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-4)
    model.cpu()


def test_under_autocast_the_frozen_layers_read_the_weight_copies(three_layers):
    """Each layer's copies go to that layer in both passes (a copy given to another layer
    would move the log-probs far past bfloat16's rounding)."""
    tokenizer, model = three_layers
    data = rows(tokenizer)
    prompts, replies = [p for p, _ in data], [r for _, r in data]
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        assert weight_copies.copies(model) is not None  # the sampler's, which the update reads
        frozen = encode_frozen(model, prompts, replies, depth=2)
        packed = pack_rows(prompts, replies, index=frozen.index)
        got = reply_log_probs(model, packed, frozen=frozen)[0]
        want = reply_log_probs(model, pack_rows(prompts, replies))[0]
        weight_copies.ENABLED = False
        try:
            without = reply_log_probs(
                model, packed, frozen=encode_frozen(model, prompts, replies, depth=2)
            )[0]
        finally:
            weight_copies.ENABLED = True
    weight_copies.release(model)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=0)
    # the copies are autocast's own casts: with or without them, the same numbers
    torch.testing.assert_close(got, without, atol=0, rtol=0)


def test_rows_outside_the_encoded_batch_are_refused(three_layers):
    tokenizer, model = three_layers
    data = rows(tokenizer)
    frozen = encode_frozen(model, [p for p, _ in data[:2]], [r for _, r in data[:2]], depth=2)
    with pytest.raises(ValueError, match="not one of the batch"):
        pack_rows([data[3][0]], [data[3][1]], index=frozen.index)
    packed = pack_rows([data[0][0]], [data[0][1]])
    with pytest.raises(ValueError, match="packed with its index"):
        reply_log_probs(model, packed, frozen=frozen)
    with pytest.raises(ValueError, match="depth=0"):
        encode_frozen(model, [data[0][0]], [data[0][1]], depth=0)


def test_update_forwards_run_only_their_device_types_attention_kernels(three_layers, monkeypatch):
    """CUDA's setting (every SDPA kernel but cuDNN's, as the prefill's), tried on the CPU: the
    frozen encoding and the scoring forwards, from frozen states or from the tokens, call
    every layer's attention with only those kernels enabled, restore the flags after, and
    give the log-probs of SDPA's own choice; a kernel list the CPU cannot run is an error."""
    tokenizer, model = three_layers
    data = rows(tokenizer)
    prompts, replies = [p for p, _ in data], [r for _, r in data]
    want = reply_log_probs(model, pack_rows(prompts, replies))[0]
    cuda = attention_kernels.ATTENTION_BACKENDS["cuda"]
    assert torch.nn.attention.SDPBackend.CUDNN_ATTENTION not in cuda
    monkeypatch.setitem(attention_kernels.ATTENTION_BACKENDS, "cpu", cuda)
    calls = []

    def record(module, args, kwargs):
        calls.append(
            (
                module.layer_idx,
                torch.backends.cuda.cudnn_sdp_enabled(),
                torch.backends.cuda.flash_sdp_enabled(),
            )
        )

    hooks = [
        layer.self_attn.register_forward_pre_hook(record, with_kwargs=True)
        for layer in model.get_decoder().layers
    ]
    try:
        frozen = encode_frozen(model, prompts, replies, depth=2)
        encoded, calls[:] = list(calls), []
        from_states = reply_log_probs(
            model, pack_rows(prompts, replies, index=frozen.index), frozen=frozen
        )[0]
        scored, calls[:] = list(calls), []
        from_tokens = reply_log_probs(model, pack_rows(prompts, replies))[0]
    finally:
        for hook in hooks:
            hook.remove()
    assert {i for i, *_ in encoded} == {0, 1} and {i for i, *_ in scored} == {2}
    assert {i for i, *_ in calls} == {0, 1, 2}
    assert {tuple(flags) for _, *flags in encoded + scored + calls} == {(False, True)}
    assert torch.backends.cuda.cudnn_sdp_enabled()
    torch.testing.assert_close(from_states, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(from_tokens, want, atol=1e-5, rtol=1e-5)
    cudnn_only = [torch.nn.attention.SDPBackend.CUDNN_ATTENTION]
    monkeypatch.setitem(attention_kernels.ATTENTION_BACKENDS, "cpu", cudnn_only)
    with pytest.raises(RuntimeError, match="kernel"):
        reply_log_probs(model, pack_rows(prompts, replies))
    with pytest.raises(RuntimeError, match="kernel"):
        encode_frozen(model, prompts, replies, depth=2)


def test_layer_range_restores_the_decoder_after_an_error(three_layers):
    _, model = three_layers
    decoder = model.get_decoder()
    layers, norm = decoder.layers, decoder.norm
    with (
        pytest.raises(RuntimeError, match="inside"),
        layer_range(decoder, 1, None, final_norm=False),
    ):
        assert len(decoder.layers) == 2 and decoder.layers[0] is layers[1]
        assert isinstance(decoder.norm, torch.nn.Identity)
        raise RuntimeError("inside")
    assert decoder.layers is layers and decoder.norm is norm


def step_rows(tokenizer, model):
    """Step rows of :func:`rows` with behaviour log-probs a little off the model's own and
    advantages of both signs."""
    data = rows(tokenizer)
    with torch.no_grad():
        packed = pack_rows([p for p, _ in data], [r for _, r in data])
        own = reply_log_probs(model, packed)[0].split(packed.lengths.tolist())
    return lazy_stack(
        [
            TensorDict(
                {
                    ("tokens", "prompt"): p,
                    ("tokens", "response"): r,
                    ("log_probs", "response"): lp - 0.05 * (i % 3),
                    "advantage": torch.tensor([[(-1.0) ** i * (1 + i / 4)]]),
                }
            )
            for i, ((p, r), lp) in enumerate(zip(data, own, strict=True))
        ]
    )


def test_the_loss_over_mini_batches_is_the_same_with_the_frozen_states(three_layers):
    tokenizer, model = three_layers
    batch = step_rows(tokenizer, model)
    loss = GIGPOLoss(
        model, max_tokens_per_micro_batch=64, max_sequence_tokens=24, entropy_coeff=0.01
    )
    frozen = loss.frozen_states(batch)
    assert frozen is not None and frozen.depth == 2
    for mini in ([4, 0, 2], [1, 5, 3]):
        outputs = []
        for states in (None, frozen):
            model.zero_grad()
            out = loss.backward(batch[mini], frozen=states)
            grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
            outputs.append((out, grads))
        (want, want_grads), (got, got_grads) = outputs
        for key in ("loss_objective", "loss_entropy", "kl_to_behaviour", "clip_fraction", "ratio"):
            torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=1e-5)
        for g, w in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
    model.requires_grad_(True)
    assert GIGPOLoss(model).frozen_states(batch) is None  # every layer trained
    train_top_layers(model, 1)
