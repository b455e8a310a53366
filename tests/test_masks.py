"""Own 4-D attention masks reach every attention implementation in the form it takes: the
decoders and packed scoring give the teacher-forced log-probs with eager attention too
(which adds its mask to the scores: a boolean mask there would mask nothing). Sequences
that would reach past a sliding attention window (which such masks do not apply) are
refused."""

import pytest
import torch
from transformers import AutoConfig, Qwen2Config, Qwen2ForCausalLM

from gigpo_torchrl.policy import make_char_tokenizer, make_tiny_model
from gigpo_torchrl.policy.masks import for_attention, sliding_window
from gigpo_torchrl.policy.packing import pack_rows, reply_log_probs
from gigpo_torchrl.policy.sampling import SamplingSettings, sample_replies


def config_with(attention: str):
    config = AutoConfig.for_model("llama")
    config._attn_implementation = attention
    return config


def test_sdpa_takes_the_boolean_mask_and_eager_an_additive_one():
    mask = torch.tensor([[True, False, True]]).view(1, 1, 1, 3)
    assert for_attention(config_with("sdpa"), mask) is mask
    additive = for_attention(config_with("eager"), mask)
    assert additive.dtype == torch.float32
    lowest = torch.finfo(torch.float32).min
    assert additive.flatten().tolist() == [0.0, lowest, 0.0]


def test_other_implementations_are_refused_by_name():
    with pytest.raises(ValueError, match="'flash_attention_2'"):
        for_attention(config_with("flash_attention_2"), torch.ones(1, 1, 1, 2, dtype=torch.bool))


def eager_tiny(seed: int):
    tokenizer = make_char_tokenizer()
    model = make_tiny_model(tokenizer, seed=seed)
    model.set_attn_implementation("eager")
    return tokenizer, model


def teacher_forced(model, prompt, reply):
    with torch.no_grad():
        logits = model(torch.cat([prompt, reply])[None]).logits[0, len(prompt) - 1 : -1]
    return logits.float().log_softmax(-1).gather(-1, reply[:, None])[:, 0]


def check_sampled_log_probs(model, tokenizer, prompts, settings):
    """Sampled replies' log-probs equal a teacher-forced forward of each prompt + reply."""
    torch.manual_seed(0)
    replies, log_probs, _ = sample_replies(model, prompts, settings, pad_id=tokenizer.pad_token_id)
    for prompt, reply, lp in zip(prompts, replies, log_probs, strict=True):
        torch.testing.assert_close(lp, teacher_forced(model, prompt, reply), atol=1e-4, rtol=0)


@pytest.mark.parametrize("static_cache", [False, True], ids=["growing", "static"])
def test_decoders_sample_teacher_forced_log_probs_with_eager_attention(static_cache):
    tokenizer, model = eager_tiny(seed=6)
    # prompts of different lengths: left padding that the mask must hide
    texts = ("<|im_start|>user\nnorth", "go", "<|im_start|>user\nnorth", "a longer prompt here")
    prompts = [torch.tensor(tokenizer.encode(t)) for t in texts]
    settings = SamplingSettings(max_new_tokens=6, temperature=1.3, static_cache=static_cache)
    check_sampled_log_probs(model, tokenizer, prompts, settings)


def test_packed_scoring_equals_separate_forwards_with_eager_attention():
    tokenizer, model = eager_tiny(seed=7)
    prompt_a = torch.tensor(tokenizer.encode("<|im_start|>user\nwhere now?"))
    prompt_b = torch.tensor(tokenizer.encode("look"))
    rows = [(prompt_a, "left"), (prompt_b, "up"), (prompt_a, "le")]
    replies = [torch.tensor(tokenizer.encode(r, add_special_tokens=False)) for _, r in rows]
    packed = pack_rows([p for p, _ in rows], replies, max_sequence=512)
    with torch.no_grad():
        log_probs, _ = reply_log_probs(model, packed)
    expected = torch.cat(
        [teacher_forced(model, p, r) for (p, _), r in zip(rows, replies, strict=True)]
    )
    torch.testing.assert_close(log_probs, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("model_type", "options", "window"),
    [
        ("llama", {}, None),
        ("qwen2", {}, None),  # use_sliding_window is off by default
        ("qwen2", {"use_sliding_window": True, "sliding_window": 64, "max_window_layers": 0}, 64),
        ("mistral", {}, 4096),  # every layer, no layer_types
        ("mistral", {"sliding_window": None}, None),
        ("gemma3_text", {"sliding_window": 512}, 512),  # local layers among global ones
    ],
)
def test_sliding_window_is_read_from_the_config(model_type, options, window):
    assert sliding_window(AutoConfig.for_model(model_type, **options)) == window


def windowed_tiny(window: int):
    """The tiny model's shape with every layer attending through a sliding window."""
    tokenizer = make_char_tokenizer()
    shape = make_tiny_model(tokenizer).config.to_dict()
    shape.update(use_sliding_window=True, sliding_window=window, max_window_layers=0)
    shape.update(layer_types=None)  # recomputed from the three above
    config = Qwen2Config(**shape)
    assert set(config.layer_types) == {"sliding_attention"}
    torch.manual_seed(8)
    return tokenizer, Qwen2ForCausalLM(config).eval()


def test_sampling_past_a_sliding_window_is_refused_and_within_it_is_exact():
    tokenizer, model = windowed_tiny(window=24)
    prompts = [torch.tensor(tokenizer.encode(t)) for t in ("sixteen chars!!!", "short")]
    settings = SamplingSettings(max_new_tokens=9, temperature=1.0)
    with pytest.raises(ValueError, match="window of 24 tokens"):
        sample_replies(model, prompts, settings, pad_id=tokenizer.pad_token_id)
    settings = SamplingSettings(max_new_tokens=8, temperature=1.0)  # 16 + 8 = 24: within
    check_sampled_log_probs(model, tokenizer, prompts, settings)


def test_packed_scoring_past_a_sliding_window_is_refused():
    tokenizer, model = windowed_tiny(window=12)
    prompt = torch.tensor(tokenizer.encode("ten chars!"))
    packed = pack_rows([prompt], [torch.tensor(tokenizer.encode("abc"))], max_sequence=512)
    with pytest.raises(ValueError, match="up to 13 tokens"):
        reply_log_probs(model, packed)
