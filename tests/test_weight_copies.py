"""Weight copies in autocast's dtype: the numbers autocast computes, no cast of a frozen
weight at any call, copies that follow in-place updates and replaced parameters."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gigpo_torchrl.policy import decoding, make_char_tokenizer, make_tiny_model, weight_copies
from gigpo_torchrl.policy.packing import pack_rows, reply_log_probs
from gigpo_torchrl.policy.sampling import SamplingSettings, sample_replies
from gigpo_torchrl.train.trainer import train_top_layers

TEXTS = ("<|im_start|>user\ngo north", "<|im_start|>user\ngo south, then east", "look")


class WeightCasts(TorchDispatchMode):
    """Counts the casts of the given tensors (by storage)."""

    def __init__(self, tensors):
        super().__init__()
        self.addresses, self.count = {t.data_ptr() for t in tensors}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and args[0].data_ptr() in self.addresses:
            self.count += 1
        return func(*args, **(kwargs or {}))


def frozen_tiny(seed):
    """A tiny model trained as ``--train_layers 1`` trains it: its lower layer and LM head
    frozen."""
    tokenizer = make_char_tokenizer()
    model = make_tiny_model(tokenizer, seed=seed)
    train_top_layers(model, 1)
    return tokenizer, model


def frozen_weights(model):
    return [
        m.weight
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad
    ]


def sample(model, tokenizer, static_cache):
    batch = [torch.tensor(tokenizer.encode(t)) for t in TEXTS]
    settings = SamplingSettings(max_new_tokens=5, temperature=1.0, static_cache=static_cache)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return sample_replies(model, batch, settings, pad_id=tokenizer.pad_token_id)


@pytest.mark.parametrize("static_cache", [False, True], ids=["growing", "static"])
def test_sampling_with_the_copies_draws_what_autocast_draws(monkeypatch, static_cache):
    tokenizer, model = frozen_tiny(seed=21)
    monkeypatch.setattr(weight_copies, "ENABLED", False)
    plain = sample(model, tokenizer, static_cache)
    monkeypatch.setattr(weight_copies, "ENABLED", True)
    casts = WeightCasts(frozen_weights(model))
    sample(model, tokenizer, static_cache)  # the copies are made here, once
    with casts:
        copied = sample(model, tokenizer, static_cache)
    assert casts.count == 0  # no frozen weight cast by the prefill or any decode step
    assert [r.tolist() for r in copied.tokens] == [r.tolist() for r in plain.tokens]
    for a, b in zip(copied.log_probs, plain.log_probs, strict=True):
        assert torch.equal(a, b)  # the same conversion: bit for bit
    # without the copies autocast casts every frozen weight again at every forward call
    monkeypatch.setattr(weight_copies, "ENABLED", False)
    with casts:
        sample(model, tokenizer, static_cache)
    assert casts.count >= 2 * len(frozen_weights(model))  # the prefill and a decode step at least


def test_copies_follow_in_place_updates_and_replaced_parameters(monkeypatch):
    tokenizer, model = frozen_tiny(seed=22)
    sample(model, tokenizer, static_cache=False)
    first = weight_copies._COPIES[model]
    version = dict(first.copied)
    sample(model, tokenizer, static_cache=False)
    assert weight_copies._COPIES[model] is first and first.copied == version  # nothing copied
    with torch.no_grad():  # an optimizer's step, on a frozen and a trained weight
        model.model.layers[0].mlp.up_proj.weight.mul_(-1.5)
        model.model.layers[1].self_attn.q_proj.weight.add_(0.3)
    updated = sample(model, tokenizer, static_cache=False)
    changed = {n for n in version if first.copied[n] != version[n]}
    assert changed == {
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.1.self_attn.q_proj.weight",
    }
    monkeypatch.setattr(weight_copies, "ENABLED", False)
    assert [r.tolist() for r in updated.tokens] == [
        r.tolist() for r in sample(model, tokenizer, static_cache=False).tokens
    ]
    monkeypatch.setattr(weight_copies, "ENABLED", True)
    # a parameter replaced (not updated in place): new copies of every weight
    layer = model.model.layers[0].mlp.down_proj
    layer.weight = torch.nn.Parameter(torch.randn_like(layer.weight), requires_grad=False)
    replaced = sample(model, tokenizer, static_cache=False)
    assert weight_copies._COPIES[model] is not first
    monkeypatch.setattr(weight_copies, "ENABLED", False)
    assert [r.tolist() for r in replaced.tokens] == [
        r.tolist() for r in sample(model, tokenizer, static_cache=False).tokens
    ]


def test_copies_follow_a_parameter_whose_data_is_swapped():
    # what ``module.to(device)`` does: the same parameter object, new data
    model = torch.nn.Sequential(torch.nn.Linear(4, 3)).requires_grad_(False)
    layer = model[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = weight_copies.copies(model)
        layer.weight.data = torch.randn(3, 4)  # new storage, same shape: copied again
        assert weight_copies.copies(model) is first
        assert torch.equal(first.tensors["0.weight"], layer.weight.to(torch.bfloat16))
        layer.weight.data, layer.out_features = torch.randn(5, 4), 5  # a new shape: new copies
        layer.bias.data = torch.randn(5)
        again = weight_copies.copies(model)
        assert again is not first and again.generation != first.generation
        x = torch.randn(2, 4)
        assert torch.equal(weight_copies.call(model, again.tensors, input=x), model(x))


def test_the_update_reads_the_copies_of_frozen_weights_only(monkeypatch):
    tokenizer, model = frozen_tiny(seed=23)
    prompts = [torch.tensor(tokenizer.encode(t)) for t in TEXTS]
    replies = [torch.tensor(tokenizer.encode(t)) for t in ("north", "east", "up")]
    packed = pack_rows(prompts, replies)
    trained = [p for p in model.parameters() if p.requires_grad]

    def scored():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            log_probs, _ = reply_log_probs(model, packed)
        log_probs.sum().backward()
        return log_probs.detach(), [p.grad.clone() for p in trained]

    monkeypatch.setattr(weight_copies, "ENABLED", False)
    casts = WeightCasts(frozen_weights(model))
    with casts:
        plain, plain_grads = scored()
    assert casts.count == len(frozen_weights(model))  # autocast: each frozen weight once
    monkeypatch.setattr(weight_copies, "ENABLED", True)
    assert weight_copies.held_bytes(model) == 0  # the update makes none of its own
    sample(model, tokenizer, static_cache=False)  # the sampler's
    casts = WeightCasts(frozen_weights(model))
    with casts:
        copied, copied_grads = scored()
    assert casts.count == 0
    assert torch.equal(copied, plain)
    assert all(map(torch.equal, copied_grads, plain_grads))  # the trained weights still learn


def test_held_bytes_counts_the_copies_and_release_drops_them():
    tokenizer, model = frozen_tiny(seed=24)
    sample(model, tokenizer, static_cache=False)  # no static cache: the copies alone
    linear = sum(
        p.numel()
        for m in model.modules()
        if isinstance(m, torch.nn.Linear)
        for p in m.parameters(recurse=False)
    )
    assert weight_copies.held_bytes(model) == decoding.held_bytes(model) == linear * 2
    decoding.release(model)
    assert decoding.held_bytes(model) == 0
    with torch.no_grad():  # float32: autocast off, nothing to copy
        batch = [torch.tensor(tokenizer.encode(t)) for t in TEXTS]
        sample_replies(model, batch, SamplingSettings(max_new_tokens=2), pad_id=0)
    assert decoding.held_bytes(model) == 0
