"""Packed teacher forcing against plain per-row forwards of the same model."""

import pytest
import torch

from gigpo_torchrl.policy.packing import pack_rows, plan_micro_batches, reply_log_probs


def ids(tokenizer, text):
    return torch.tensor(tokenizer.encode(text, add_special_tokens=False))


def separate_log_probs(model, prompt, reply):
    """The obvious way: one unpadded forward of prompt + reply, full logits."""
    full = torch.cat([prompt, reply])[None].to(model.device)
    log_softmax = model(full).logits[0].float().log_softmax(-1)
    return log_softmax[len(prompt) - 1 : -1].gather(-1, reply.to(model.device)[:, None])[:, 0]


def rows(tokenizer):
    """Shared prompts, a reply that is a prefix of another, identical replies, and a reply
    holding the pad and eos ids mid-sequence."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    a = ids(tokenizer, "<|im_start|>user\nwhere now?<|im_end|>\n<|im_start|>assistant\n")
    b = ids(tokenizer, "<|im_start|>user\nlook<|im_end|>\n<|im_start|>assistant\n")
    return [
        (a, ids(tokenizer, "left")),
        (b, ids(tokenizer, "up")),
        (a, ids(tokenizer, "le")),
        (a, torch.tensor([*ids(tokenizer, "x").tolist(), pad, eos, pad])),
        (a, ids(tokenizer, "left")),
        (b, torch.tensor([eos])),
    ]


@pytest.mark.parametrize("max_sequence", [512, 20])
def test_packed_log_probs_and_gradients_equal_separate_forwards(tiny, device, max_sequence):
    tokenizer, model = tiny
    model = model.to(device)
    data = rows(tokenizer)
    packed = pack_rows([p for p, _ in data], [r for _, r in data], max_sequence=max_sequence)
    # the two prompts share one sequence unless it may not hold both
    assert packed.input_ids.shape[0] == (1 if max_sequence == 512 else 2)
    assert packed.lengths.tolist() == [len(r) for _, r in data]

    model.zero_grad()
    log_probs, entropy = reply_log_probs(model, packed.to(device), entropy=True)
    log_probs.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    expected = torch.cat([separate_log_probs(model, p, r) for p, r in data])
    expected.square().sum().backward()
    torch.testing.assert_close(log_probs, expected, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert entropy.shape == log_probs.shape and bool((entropy > 0).all())
    # the pad and eos tokens inside the fourth reply are scored like any other token
    fourth = log_probs[sum(len(r) for _, r in data[:3]) :][:4]
    assert fourth.numel() == 4 and bool(torch.isfinite(fourth).all())
    model.cpu()


def test_shared_prefixes_are_encoded_once(tiny):
    tokenizer, _ = tiny
    data = rows(tokenizer)
    prompts, replies = [p for p, _ in data], [r for _, r in data]
    a, b = len(data[0][0]), len(data[1][0])
    # a: prompt + trie {left, x<pad><eos><pad>} ("le" and the second "left" add nothing);
    # b: prompt + {up, <eos>}
    alone = pack_rows(prompts, replies, max_sequence=20)
    assert alone.real_tokens == (a + 4 + 4) + (b + 2 + 1)
    assert alone.padded_tokens == 2 * (a + 8)
    # together, b also shares "<|im_start|>user\n" (6 tokens) with a
    together = pack_rows(prompts, replies)
    assert together.real_tokens == alone.real_tokens - 6 == together.padded_tokens


def test_plan_micro_batches_covers_rows_keeps_prompts_together_and_fits_the_budget():
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.arange(int(n)) for n in torch.randint(5, 60, (12,), generator=generator)]
    prompts = prompts + prompts[:5]  # five prompts shared by two rows each
    replies = [torch.arange(int(n)) for n in torch.randint(1, 6, (17,), generator=generator)]
    plan = plan_micro_batches(prompts, replies, max_tokens=150)
    assert sorted(i for batch in plan for i in batch) == list(range(17))
    for batch in plan:
        packed = pack_rows([prompts[i] for i in batch], [replies[i] for i in batch])
        # over budget only when a single sequence is longer than the budget
        assert packed.padded_tokens <= 150 or packed.input_ids.shape[0] == 1
    for shared in range(5):
        assert any(shared in batch and shared + 12 in batch for batch in plan)
    assert [len(b) for b in plan_micro_batches(prompts, replies, max_rows=4)] == [4] * 4 + [1]
    assert plan_micro_batches(prompts, replies) == [sorted(range(17), key=lambda i: i)] or (
        len(plan_micro_batches(prompts, replies)) == 1
    )
    with pytest.raises(ValueError, match="max_tokens=0"):
        plan_micro_batches(prompts, replies, max_tokens=0)


def test_sorting_by_length_keeps_padding_small():
    # 64 rows, 8 prompts per length class, lengths 100-180: random micro-batches of 8 pad a
    # lot, sorted ones hardly
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(100, 180, (64,), generator=generator)
    prompts = [torch.randint(0, 50, (int(n),), generator=generator) for n in lengths]
    replies = [torch.tensor([1, 2, 3])] * 64
    padded = real = 0
    for batch in plan_micro_batches(prompts, replies, max_tokens=1024):
        packed = pack_rows([prompts[i] for i in batch], [replies[i] for i in batch])
        padded += packed.padded_tokens
        real += packed.real_tokens
    assert 1 - real / padded < 0.10


def test_empty_prompt_is_refused():
    with pytest.raises(ValueError, match="row 1 has an empty prompt"):
        pack_rows([torch.tensor([1]), torch.tensor([], dtype=torch.long)], [[2], [3]])
