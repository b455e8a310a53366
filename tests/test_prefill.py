"""The prefix-tree prefill: its tree by hand, its outputs against each prompt encoded alone."""

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gigpo_torchrl.policy import attention_kernels, prefill
from gigpo_torchrl.policy.prefill import (
    PrefixNode,
    flatten,
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
    return [(n.start, n.end, n.parent, n.terminal, n.level) for n in nodes]


def test_tree_of_nested_prompts_by_hand():
    system = list(range(100, 110))  # 10 tokens every prompt opens with
    group_a = system + list(range(200, 209))  # 9 more shared by the first two
    prompts = [
        group_a + [1, 2],
        group_a + [3],
        system + [4, 5, 6],
        system,  # ends where the others go on
    ]
    assert shape(prefix_tree(prompts, min_run=8)) == [
        (0, 10, -1, 3, 0),  # the system run, where prompt 3 ends
        (10, 19, 0, -1, 1),  # group a's run (9 tokens)
        (19, 21, 1, 0, 2),
        (19, 20, 1, 1, 2),
        (10, 13, 0, 2, 1),
    ]
    # tuples as well as lists
    assert shape(prefix_tree([tuple(p) for p in prompts], min_run=8)) == shape(
        prefix_tree(prompts, min_run=8)
    )
    # group a's 9 tokens are shorter than 10: folded into its two branches
    assert shape(prefix_tree(prompts, min_run=10)) == [
        (0, 10, -1, 3, 0),
        (10, 21, 0, 0, 1),
        (10, 20, 0, 1, 1),
        (10, 13, 0, 2, 1),
    ]


def test_flatten_keeps_the_top_levels_and_gives_every_deeper_prompt_one_run():
    system = list(range(100, 110))
    group_a = system + list(range(200, 209))
    prompts = [group_a + [1, 2], group_a + [3], system + [4, 5, 6], system]
    nodes = prefix_tree(prompts, min_run=8)
    # two levels: the system run, then each prompt's rest (group a's run in both of its)
    assert shape(flatten(nodes, 2)) == [
        (0, 10, -1, 3, 0),
        (10, 21, 0, 0, 1),
        (10, 20, 0, 1, 1),
        (10, 13, 0, 2, 1),
    ]
    assert shape(flatten(nodes, 1)) == [(0, 10, -1, 3, 0), (0, 21, -1, 0, 0), (0, 20, -1, 1, 0)] + [
        (0, 13, -1, 2, 0)
    ]
    assert shape(flatten(nodes, 3)) == shape(nodes)
    with pytest.raises(ValueError, match="levels=0"):
        flatten(nodes, 0)


def test_plan_by_device_type():
    system = list(range(100, 110))
    prompts = [system + list(range(200, 209)) + [1], system + list(range(200, 209)) + [2]]
    prompts.append(system + [3])
    cpu_nodes, cpu_calls, _ = plan(prompts, "cpu")  # the whole tree
    assert max(n.level for n in cpu_nodes) == 2
    cuda_nodes, cuda_calls, _ = plan(prompts, "cuda")  # the shared prefix, then the rest
    assert max(n.level for n in cuda_nodes) == 1
    assert [len(c) for c in cuda_calls] == [1, 3]


def test_prompts_that_differ_from_the_first_token_are_roots():
    assert shape(prefix_tree([[1, 2, 3], [4, 5]])) == [(0, 3, -1, 0, 0), (0, 2, -1, 1, 0)]
    assert shape(prefix_tree([[7]])) == [(0, 1, -1, 0, 0)]


@pytest.mark.parametrize("bad", [[[1, 2], [1, 2]], [[1], []]])
def test_duplicate_or_empty_prompts_are_refused(bad):
    with pytest.raises(ValueError, match="distinct, non-empty"):
        prefix_tree(bad)


prompt_sets = st.lists(
    st.lists(st.integers(0, 3), min_size=1, max_size=12), min_size=1, max_size=10, unique_by=tuple
)


@settings(max_examples=300, deadline=None)
@given(
    prompts=prompt_sets,
    kept=st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=12), max_size=3),
    min_run=st.integers(1, 4),
    levels=st.sampled_from([None, 1, 2, 3]),
)
# a prompt kept whole, one token longer than min_run: without its last token too short
@example(prompts=[[0, 3, 0]], kept=[[0, 3, 0]], min_run=3, levels=None)
def test_each_prompt_is_the_runs_of_its_chain(prompts, kept, min_run, levels):
    # the tree as plan() builds it: cut to some levels, with the runs that prompts kept from
    # an earlier call hold taken from them (cached roots, never encoded)
    nodes = prefix_tree(prompts, min_run=min_run)
    if levels is not None:
        nodes = flatten(nodes, levels)
        assert all(n.level < levels for n in nodes)
    nodes = reuse(nodes, prompts, kept, min_run=min_run)
    assert sorted(n.terminal for n in nodes if n.terminal != -1) == list(range(len(prompts)))
    encoded = {i for call in schedule(nodes, 0.0) for i in call}
    for i, node in enumerate(nodes):
        assert node.start < node.end
        assert node.parent < i  # parents first
        after_kept = node.parent != -1 and nodes[node.parent].cached != -1
        if node.terminal == -1 and not after_kept and node.cached == -1:
            assert node.end - node.start >= min_run  # short shared runs are folded away
        if node.parent != -1:
            assert node.start == nodes[node.parent].end
            assert node.level == (0 if after_kept else nodes[node.parent].level + 1)
        else:
            assert node.start == 0 and node.level == 0
        # a kept opening: a root that something continues, never encoded, no prompt ends there
        assert (node.cached != -1) == (i not in encoded)
        if node.cached != -1:
            assert node.parent == -1 and node.terminal == -1
            assert any(n.parent == i for n in nodes)
            assert list(kept[node.cached][: node.end]) == prompts[node.member][: node.end]
    for node in nodes:
        if node.terminal == -1:
            continue
        chain, at = [], nodes.index(node)
        while at != -1:
            chain.append(nodes[at])
            at = nodes[at].parent
        prompt = prompts[node.terminal]
        tokens = [t for n in reversed(chain) for t in prompts[n.member][n.start : n.end]]
        assert tokens == prompt
        # every prompt below a run shares it
        for n in chain:
            assert prompt[n.start : n.end] == prompts[n.member][n.start : n.end]
        # the longest kept opening (written out here), less the last token, is not encoded,
        # but for the last token of a shorter prompt that ends in it (for its logits)
        longest = min(max((common(prompt, k) for k in kept), default=0), len(prompt) - 1)
        longest = longest if longest >= min_run else 0
        encoded_before = sum(max(0, min(n.end, longest) - n.start) for n in chain if n.cached == -1)
        assert encoded_before <= sum(n.terminal != -1 for n in chain[1:])
        assert chain[0].cached == -1  # its last token is encoded, for its logits


def common(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


SYSTEM = "<|im_start|>system\nYou play a text game.<|im_end|>\n<|im_start|>user\nTask: "
GROUP = "reach the goal on map 7.\n"
OTHER = "another map entirely."
SEEN = ("A wall is near.", "The goal is near!")
ALONE = "no shared text at all"


def nested_prompts(tokenizer):
    texts = [
        SYSTEM + GROUP + SEEN[0],
        SYSTEM + GROUP + SEEN[1],
        SYSTEM + GROUP,  # a prompt that others extend
        SYSTEM + OTHER,
        ALONE,
    ]
    return [torch.tensor(tokenizer.encode(t)) for t in texts]


@pytest.mark.parametrize("levels", [None, 2, 1], ids=["tree", "two-levels", "flat"])
def test_prefill_equals_each_prompt_encoded_alone(tiny, monkeypatch, levels):
    tokenizer, model = tiny
    monkeypatch.setitem(prefill.MAX_LEVELS, "cpu", levels)
    prompts = nested_prompts(tokenizer)
    kv, mask, logits = prefill_prompts(
        model, prompts, pad_id=tokenizer.pad_token_id, cache_keyword="cache"
    )
    assert_rows_continue_their_prompts(model, tokenizer, prompts, kv, mask, logits)


@pytest.mark.parametrize("levels", [None, 2], ids=["tree", "two-levels"])
def test_padded_call_shapes_leave_every_prompt_as_encoded_alone(tiny, monkeypatch, levels):
    tokenizer, model = tiny
    monkeypatch.setitem(prefill.MAX_LEVELS, "cpu", levels)
    first = nested_prompts(tokenizer)
    # the next turn: two prompts go on from kept ones, one is new
    second = [torch.cat([first[0], first[4][:3]]), first[3], first[2][:-2]]

    def turns(pad_shape):
        """Both turns' forward calls, as (rows, new columns, all columns)."""
        if pad_shape:
            monkeypatch.setitem(prefill.PAD_SHAPES, "cpu", pad_shape)
        shapes, cache = [], PrefixCache()

        def record(module, args, kwargs):
            # the mask is 2-D for a call of roots, 4-D [rows, 1, new, all] for one that
            # continues cached rows
            shapes.append((*kwargs["input_ids"].shape, kwargs["attention_mask"].shape[-1]))

        for prompts in (first, second):
            hook = model.register_forward_pre_hook(record, with_kwargs=True)
            try:
                kv, mask, logits = prefill_prompts(
                    model,
                    prompts,
                    pad_id=tokenizer.pad_token_id,
                    cache_keyword="cache",
                    prefix_cache=cache,
                )
            finally:
                hook.remove()
            # the rows and columns of padding are gone from what comes out
            assert len(mask) == len(logits) == len(prompts)
            assert_rows_continue_their_prompts(model, tokenizer, prompts, kv, mask, logits)
        assert cache.reused_tokens > 0
        return shapes

    plain, padded = turns(None), turns((4, 16))
    up = lambda n, m: -(-n // m) * m  # noqa: E731
    assert [(n, new) for n, new, _ in padded] == [(up(n, 4), up(new, 16)) for n, new, _ in plain]
    widths = zip([w for *_, w in padded], [w for *_, w in plain], strict=True)
    assert all(width % 16 == 0 and width >= w for width, w in widths)
    assert any(n % 4 for n, _, _ in plain)  # padding rows were added somewhere


def test_prefill_calls_run_only_their_device_types_attention_kernels(tiny, monkeypatch):
    """CUDA's setting (every SDPA kernel but cuDNN's), tried on the CPU: every forward call
    runs with only those kernels enabled, the flags are restored after, and the prompts are
    still as encoded alone."""
    tokenizer, model = tiny
    assert (
        torch.nn.attention.SDPBackend.CUDNN_ATTENTION
        not in attention_kernels.ATTENTION_BACKENDS["cuda"]
    )
    monkeypatch.setitem(
        attention_kernels.ATTENTION_BACKENDS, "cpu", attention_kernels.ATTENTION_BACKENDS["cuda"]
    )
    flags = []

    def record(module, args, kwargs):
        flags.append(
            (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled())
        )

    prompts = nested_prompts(tokenizer)
    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        kv, mask, logits = prefill_prompts(
            model, prompts, pad_id=tokenizer.pad_token_id, cache_keyword="cache"
        )
    finally:
        hook.remove()
    assert flags and set(flags) == {(False, True)}
    assert torch.backends.cuda.cudnn_sdp_enabled()
    assert_rows_continue_their_prompts(model, tokenizer, prompts, kv, mask, logits)


def test_attention_kernels_unavailable_on_the_device_fail_loudly(tiny, monkeypatch):
    """The setting is applied, not advisory: a kernel list the CPU cannot run is an error."""
    tokenizer, model = tiny
    cudnn_only = [torch.nn.attention.SDPBackend.CUDNN_ATTENTION]
    monkeypatch.setitem(attention_kernels.ATTENTION_BACKENDS, "cpu", cudnn_only)
    with pytest.raises(RuntimeError, match="kernel"):
        prefill_prompts(
            model, nested_prompts(tokenizer), pad_id=tokenizer.pad_token_id, cache_keyword="cache"
        )


@pytest.mark.parametrize("call_tokens", [float("inf"), 0.0])
def test_shared_runs_are_encoded_once(tiny, monkeypatch, call_tokens):
    tokenizer, model = tiny
    monkeypatch.setitem(prefill.CALL_TOKENS, "cpu", call_tokens)
    prompts = nested_prompts(tokenizer)
    seen = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    try:
        prefill_prompts(model, prompts, pad_id=tokenizer.pad_token_id, cache_keyword="cache")
    finally:
        hook.remove()
    n = lambda text: len(tokenizer.encode(text))  # noqa: E731
    # by hand: the system run and the unrelated prompt, then the two tasks, then the two
    # observations of the first task (the character tokenizer does not merge across them)
    levels = [(SYSTEM, ALONE), (GROUP, OTHER), SEEN]
    if call_tokens == float("inf"):  # one call per level, its runs padded to the longest
        expected = [(2, max(n(a), n(b))) for a, b in levels]
    else:  # calls cost nothing: one per run length, shortest first
        expected = [(1, w) for a, b in levels for w in sorted({n(a), n(b)})]
    assert [tuple(x) for x in seen] == expected


def test_schedule_splits_a_level_where_padding_costs_more_than_a_call():
    nodes = [PrefixNode(0, length, i, -1, i) for i, length in enumerate([10, 100, 12, 95])]
    # together: 4 x 100 = 400 tokens + 1 call; split {10, 12} {95, 100}: 24 + 200 + 2 calls
    assert schedule(nodes, 100.0) == [[0, 2], [3, 1]]
    assert schedule(nodes, 200.0) == [[0, 2, 3, 1]]
    assert schedule(nodes, float("inf")) == [[0, 2, 3, 1]]
    assert schedule(nodes, 0.0) == [[0], [2], [3], [1]]
    # children come in calls after their parents' level
    nodes.append(PrefixNode(10, 20, 0, 0, -1, level=1))
    assert schedule(nodes, 100.0)[-1] == [4]


@pytest.mark.parametrize(
    "static, pad_shape", [(None, None), (True, (8, 64))], ids=["default", "padded-static"]
)
def test_sampled_log_probs_match_teacher_forcing_with_nested_prompts(
    tiny, monkeypatch, static, pad_shape
):
    tokenizer, model = tiny
    if pad_shape:  # a GPU's decoder after padded prefill calls, here on the CPU
        monkeypatch.setitem(prefill.PAD_SHAPES, "cpu", pad_shape)
    prompts = nested_prompts(tokenizer) * 2
    torch.manual_seed(5)
    settings = SamplingSettings(max_new_tokens=6, temperature=1.0, static_cache=static)
    replies, log_probs, _ = sample_replies(model, prompts, settings, pad_id=tokenizer.pad_token_id)
    for prompt, reply, lp in zip(prompts, replies, log_probs, strict=True):
        with torch.no_grad():
            logits = model(torch.cat([prompt, reply])[None]).logits[0, len(prompt) - 1 : -1]
        expected = logits.log_softmax(-1).gather(-1, reply[:, None])[:, 0]
        torch.testing.assert_close(lp, expected, atol=1e-4, rtol=0)
