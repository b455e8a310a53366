"""The prefill's cache rows kept for every layer at once, and its calls that continue cached
rows in place: the same numbers as transformers' own cache and mask."""

import pytest
import torch
from transformers import DynamicCache

from gigpo_torchrl.policy import prefill, stacked_kv
from gigpo_torchrl.policy.decoding import GrowingKV
from gigpo_torchrl.policy.masks import for_attention
from gigpo_torchrl.policy.prefix_cache import KeptPrompts, PrefixCache


def test_causal_mask_by_hand():
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 1]])  # two cached columns, then two new
    got = prefill.causal_mask(mask, 2)
    assert got.shape == (2, 1, 2, 4) and got.dtype == torch.bool
    assert got[0, 0].int().tolist() == [[0, 1, 1, 0], [0, 1, 1, 1]]
    # the first new column is a hole: its query attends only to the real tokens before it
    assert got[1, 0].int().tolist() == [[1, 1, 0, 0], [1, 1, 0, 1]]


def _encode(model, texts, tokenizer, past=None):
    """One prefill call of ``texts`` left-padded: transformers' ``DynamicCache`` and 2-D
    mask (``past=None`` or ``("dynamic", kv, mask)``), or the prefill's in-place rows
    (``("in place", kv, mask)``); returns the logits, the call's rows and the mask."""
    ids, mask = prefill._left_padded([tokenizer.encode(t) for t in texts], tokenizer.pad_token_id)
    new = ids.shape[1]
    if past is None:
        cache, attention_mask = DynamicCache(config=model.config), mask
    else:
        way, (keys, values), past_mask = past
        mask = torch.cat([past_mask, mask], 1)
        if way == "dynamic":
            cache = DynamicCache(ddp_cache_data=list(zip(keys, values, strict=True)))
            attention_mask = mask
        else:
            keys, values = (
                torch.cat([t, t.new_zeros(*t.shape[:3], new, t.shape[4])], 3)
                for t in (keys, values)
            )
            cache = GrowingKV(list(keys.unbind()), list(values.unbind()), past_mask.shape[1])
            attention_mask = for_attention(model.config, prefill.causal_mask(mask, new))
    with torch.no_grad():
        logits = model(
            input_ids=ids,
            attention_mask=attention_mask,
            position_ids=(mask.cumsum(-1) - 1).clamp_min(0)[:, -new:],
            cache=cache,
            use_cache=True,
        ).logits
    kv = stacked_kv.stacked(cache) if isinstance(cache, DynamicCache) else (keys, values)
    return logits, kv, mask


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bfloat16-autocast"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_call_continuing_cached_rows_in_place_equals_transformers_own_cache(
    tiny, autocast, attention
):
    """Bit for bit: the parents' rows have holes of different widths, the new runs too."""
    tokenizer, model = tiny
    model.set_attn_implementation(attention)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            _, parents, past_mask = _encode(model, ["You are an agent. ", "Go "], tokenizer)
            texts = ["north then east", "a b"]
            expected, expected_kv, _ = _encode(
                model, texts, tokenizer, ("dynamic", parents, past_mask)
            )
            got, got_kv, _ = _encode(model, texts, tokenizer, ("in place", parents, past_mask))
    finally:
        model.set_attn_implementation("sdpa")
    assert torch.equal(got, expected)
    for mine, theirs in zip(got_kv, expected_kv, strict=True):
        # kept in the autocast dtype, which attention casts the keys to anyway
        assert torch.equal(mine, theirs.to(mine.dtype))


def test_stacked_keeps_the_autocast_dtype_and_refuses_layers_that_differ():
    keys = [torch.randn(2, 3, 5, 4) for _ in range(2)]
    values = [torch.randn(2, 3, 5, 4).bfloat16() for _ in range(2)]
    cache = DynamicCache(ddp_cache_data=list(zip(keys, values, strict=True)))
    k, v = stacked_kv.stacked(cache, 1)
    assert torch.equal(k, torch.stack(keys)[:, :1]) and torch.equal(v, torch.stack(values)[:, :1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        k, v = stacked_kv.stacked(cache)
    assert k.dtype == v.dtype == torch.bfloat16
    assert torch.equal(k, torch.stack(keys).bfloat16())
    uneven = DynamicCache(ddp_cache_data=[(keys[0], values[0]), (keys[1][:, :2], values[1])])
    with pytest.raises(ValueError, match=r"different shapes or dtypes.*\(2, 2, 5, 4\)"):
        stacked_kv.stacked(uneven)


def test_rows_taken_and_put_layer_by_layer_equal_indexing_all_layers_at_once():
    kv = torch.randn(3, 5, 2, 4, 2)
    rows = torch.tensor([4, 0, 2, 0])
    assert torch.equal(stacked_kv.take_rows(kv, rows), kv[:, rows])
    # a view (as the kept openings are) gives the same
    view = kv.transpose(2, 3)[:, :, 1:]
    assert torch.equal(stacked_kv.take_rows(view, rows), view[:, rows])
    out, expected = torch.zeros(3, 6, 2, 7, 2), torch.zeros(3, 6, 2, 7, 2)
    into = torch.tensor([5, 1, 3, 0])
    stacked_kv.put_rows(out, into, slice(2, 6), kv[:, rows])
    expected[:, into, :, 2:6] = kv[:, rows]
    assert torch.equal(out, expected)


def test_kept_openings_squeeze_out_each_rows_holes_by_hand():
    # two kept rows of 4 layers; row 0 holds its tokens in columns 1, 2, 4, row 1 in 0-4
    kv = torch.arange(4 * 2 * 1 * 5 * 1, dtype=torch.float32).reshape(4, 2, 1, 5, 1)
    mask = torch.tensor([[0, 1, 1, 0, 1], [1, 1, 1, 1, 1]])
    kept = KeptPrompts([[7, 8, 9], [1, 2, 3, 4, 5]], (kv, -kv), mask)
    assert kept.columns == [[1, 2, 4], [0, 1, 2, 3, 4]]
    (keys, values), got_mask = kept.openings([(0, 3), (1, 2)])
    assert got_mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    assert keys.shape == (4, 2, 1, 3, 1)
    for layer in range(4):
        assert keys[layer, 0, 0, :, 0].tolist() == kv[layer, 0, 0, [1, 2, 4], 0].tolist()
        assert keys[layer, 1, 0, 1:, 0].tolist() == kv[layer, 1, 0, [0, 1], 0].tolist()
    assert torch.equal(values, -keys)
    # the one indexing a GPU runs gives the same as the CPU's layer-by-layer gather
    rows, index = torch.tensor([[0], [1]]), torch.tensor([[1, 2, 4], [0, 0, 1]])
    one = kv[:, rows, :, index].permute(2, 0, 3, 1, 4)
    assert torch.equal(stacked_kv.take_columns(kv, rows, index), one)


@pytest.mark.parametrize("levels", [None, 2], ids=["tree", "two-levels"])
def test_prefill_in_place_equals_prefill_through_transformers_cache(tiny, monkeypatch, levels):
    """The whole prefill both ways (``prefill.IN_PLACE``, the benchmarks' switch), two turns
    with kept prompts: the same logits and rows, bit for bit. Among the calls, one of a
    single new token a row on rows without holes (``x`` and ``y`` after a shared run), for
    which transformers gives attention no mask at all."""
    tokenizer, model = tiny
    monkeypatch.setitem(prefill.MAX_LEVELS, "cpu", levels)
    system = "You are an agent in a grid. "
    turns = [
        [system + "Task: reach the flag. x", system + "Task: reach the flag. y", "alone"],
        [system + "Task: reach the flag. x up z", system + "Task: find a key.", "alone again"],
    ]

    def both_turns():
        kept, out = PrefixCache(), []
        for texts in turns:
            prompts = [torch.tensor(tokenizer.encode(t)) for t in texts]
            out.append(
                prefill.prefill_prompts(
                    model,
                    prompts,
                    pad_id=tokenizer.pad_token_id,
                    cache_keyword="cache",
                    prefix_cache=kept,
                )
            )
        assert kept.reused_tokens > 0
        return out

    in_place = both_turns()
    monkeypatch.setattr(prefill, "IN_PLACE", False)
    copied = both_turns()
    for ((k, v), mask, logits), ((k2, v2), mask2, logits2) in zip(in_place, copied, strict=True):
        assert torch.equal(mask, mask2) and torch.equal(logits, logits2)
        assert torch.equal(k, k2) and torch.equal(v, v2)
