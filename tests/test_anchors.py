"""Anchor modes: exact state, state with history (history:k), near-duplicate text (similar)."""

import random

import pytest
import torch
from tensordict import TensorDict

from gigpo_torchrl import GIGPOAdvantage
from gigpo_torchrl.functional.anchors import (
    combine64,
    connected_components,
    history_anchor,
    minhash_signatures,
    mix64,
    parse_anchor,
    similar_text_anchor,
    split_lines,
    text_hashes,
)
from gigpo_torchrl.train.cli import parse_config
from gigpo_torchrl.train.config import TrainConfig

# -- parsing and hashing -------------------------------------------------------------------


def test_parse_anchor():
    assert parse_anchor("state") == ("state", 0)
    assert parse_anchor("similar") == ("similar", 0)
    assert parse_anchor("history:3") == ("history", 3)
    for bad in ("history", "history:0", "history:-1", "history:x", "exact", "", None):
        with pytest.raises(ValueError, match="must be 'state', 'history:k'"):
            parse_anchor(bad)


def test_mix_and_combine_are_stable_and_order_sensitive():
    x = torch.tensor([0, 1, -1, 2**62])
    assert len(set(mix64(x).tolist())) == 4
    a, b = torch.tensor([5]), torch.tensor([7])
    assert combine64(a, b).item() != combine64(b, a).item()
    # fixed values: the same in every process and on every machine
    assert (
        text_hashes(["go east", "go east", "take key"]).tolist()[0]
        == text_hashes(["go east"]).item()
    )
    assert mix64(torch.tensor([0])).item() == -2152535657050944081  # SplitMix64(0)


# -- history:k -----------------------------------------------------------------------------


def rows(trajectories):
    """Flat rows from {traj_id: [(state, action), ...]}."""
    traj, step, state, action = [], [], [], []
    for t, pairs in trajectories.items():
        for i, (s, a) in enumerate(pairs):
            traj.append(t)
            step.append(i)
            state.append(s)
            action.append(a)
    return (
        torch.tensor(state),
        text_hashes(action),
        torch.tensor(traj),
        torch.tensor(step),
    )


def test_history_k_by_hand():
    # three trajectories that all stand in state 9 at some step
    state, action, traj, step = rows(
        {
            0: [(1, "a"), (2, "b"), (9, "x")],  # 9 after (2, b), before that (1, a)
            1: [(1, "c"), (2, "b"), (9, "x")],  # 9 after (2, b), before that (1, c)
            2: [(1, "a"), (3, "b"), (9, "x")],  # 9 after (3, b)
        }
    )
    at9 = [2, 5, 8]
    plain = history_anchor(state, action, traj, step, 0)
    assert torch.equal(plain, state)  # k = 0 is the state itself
    one = history_anchor(state, action, traj, step, 1)[at9].tolist()
    assert one[0] == one[1] != one[2]  # same last pair (2, b) / another last state
    two = history_anchor(state, action, traj, step, 2)[at9].tolist()
    assert len(set(two)) == 3  # the pairs before differ too
    # the same state with the same past is the same anchor, different states never are
    h1 = history_anchor(state, action, traj, step, 1)
    assert h1[0] == h1[3] == h1[6]  # step 0 in state 1 everywhere: no past
    assert len(set(h1[[0, 1, 2]].tolist())) == 3


def test_history_reaching_past_the_start_differs_from_a_later_step():
    # trajectory 0 is in state 5 at step 1 after (4, go); trajectory 1 at step 3, after the
    # same pair (4, go): equal under history:1, different under history:2 (start vs (7, z))
    state, action, traj, step = rows(
        {0: [(4, "go"), (5, "x")], 1: [(6, "y"), (7, "z"), (4, "go"), (5, "x")]}
    )
    h1 = history_anchor(state, action, traj, step, 1)
    h2 = history_anchor(state, action, traj, step, 2)
    assert h1[1] == h1[5]
    assert h2[1] != h2[5]


def test_history_is_independent_of_row_order():
    gen = torch.Generator().manual_seed(0)
    state = torch.randint(0, 4, (60,), generator=gen)
    actions = text_hashes([random.Random(i).choice("abc") for i in range(60)])
    traj = torch.arange(60) // 10
    step = torch.arange(60) % 10
    expected = history_anchor(state, actions, traj, step, 3)
    perm = torch.randperm(60, generator=gen)
    got = history_anchor(state[perm], actions[perm], traj[perm], step[perm], 3)
    assert torch.equal(got, expected[perm])


# -- similar --------------------------------------------------------------------------------

# A labelled set: each state has paraphrase-level variants (reordered sentences, case,
# punctuation, spacing, a changed filler phrase); different states differ in what they say.
STATES = {
    "kitchen-apple": [
        "You are in the kitchen. You see a red apple on the wooden table. A fridge stands "
        "in the corner, and its door is closed. There is an exit to the north.",
        "you are in the kitchen.  a fridge stands in the corner, and its door is closed.\n"
        "You see a red apple on the wooden table. There is an exit to the north!",
        "You are in the kitchen. You can see a red apple on the wooden table. A fridge stands "
        "in the corner, and its door is closed. There is an exit to the north.",
    ],
    "kitchen-open-fridge": [
        "You are in the kitchen. The fridge in the corner is open, revealing a carton of milk "
        "and three eggs. The table is empty. There is an exit to the north.",
        "You are in the kitchen.\nThe fridge in the corner is open, revealing a carton of milk "
        "and three eggs.\nThe table is empty.\nThere is an exit to the north.",
    ],
    "bedroom": [
        "You are in a small bedroom with a narrow bed and a wardrobe. A lamp glows on the "
        "nightstand. A door leads south to the hallway.",
        "You are in a small bedroom with a narrow bed and a wardrobe; a lamp glows on the "
        "nightstand. A door leads south to the hallway.",
        "A lamp glows on the nightstand. You are in a small bedroom with a narrow bed and a "
        "wardrobe. A door leads south to the hallway.",
    ],
    "cellar-dark": [
        "It is pitch dark in the cellar and cold. Stone steps lead up; somewhere water drips "
        "onto a rusty barrel.",
        "It is pitch dark in the cellar, and cold. Stone steps lead up. Somewhere water drips "
        "onto a rusty barrel.",
    ],
    "garden": [
        "Sunlight falls on a garden of roses. A shovel leans against the fence and a hose is "
        "coiled by the gate.",
        "sunlight falls on a garden of roses; a shovel leans against the fence, and a hose is "
        "coiled by the gate",
    ],
}


def labelled_rows():
    texts, labels = [], []
    for label, variants in STATES.items():
        for text in variants:
            texts.append(text)
            labels.append(label)
    return texts, labels


def test_similar_groups_paraphrases_and_keeps_states_apart():
    texts, labels = labelled_rows()
    anchor = similar_text_anchor(texts, threshold=0.6)  # midway between 0.35 and 0.85
    by_label = {}
    for a, label in zip(anchor.tolist(), labels, strict=True):
        by_label.setdefault(label, set()).add(a)
    assert all(len(anchors) == 1 for anchors in by_label.values()), by_label  # grouped
    assert len({next(iter(a)) for a in by_label.values()}) == len(STATES)  # kept apart
    # within a state the Jaccard similarity is >= 0.85, across states <= 0.35: the default
    # threshold (0.8) separates them too
    assert torch.equal(similar_text_anchor(texts), anchor)


def test_similar_is_permutation_invariant():
    texts, labels = labelled_rows()
    texts = texts * 3
    group = torch.tensor([0] * 12 + [1] * 12 + [2] * 12)
    expected = similar_text_anchor(texts, group, threshold=0.6)
    rng = random.Random(0)
    for _ in range(5):
        perm = list(range(len(texts)))
        rng.shuffle(perm)
        got = similar_text_anchor([texts[i] for i in perm], group[perm], threshold=0.6)
        assert torch.equal(got, expected[perm])


def test_similar_exact_and_layout_duplicates_always_share_an_anchor():
    texts = ["Taken.", "taken.", "  Taken.\n\n", "Dropped.", "", "", "...", "!!!"]
    anchor = similar_text_anchor(texts, threshold=1.0).tolist()
    assert anchor[0] == anchor[1] == anchor[2] != anchor[3]
    assert anchor[4] == anchor[5]  # equal empty texts
    assert anchor[6] != anchor[7]  # texts without words are linked only when equal


def test_similar_never_links_across_episode_groups():
    # x and y share no word; z (in another group) is x and y (Jaccard ~0.48 with each): a
    # link through z would merge them
    x = "alpha beta gamma delta epsilon zeta eta theta"
    y = "iota kappa lambda mu nu xi omicron pi"
    z = x + " " + y
    anchor = similar_text_anchor([x, y, z], torch.tensor([0, 0, 1]), threshold=0.3)
    assert anchor[0] != anchor[1]
    joined = similar_text_anchor([x, y, z], torch.tensor([0, 0, 0]), threshold=0.3)
    assert joined[0] == joined[1] == joined[2]  # within one group the chain links them


def test_boilerplate_lines_are_left_out():
    header = (
        "Welcome to the house game. Your goal is to find the treasure and bring it to the "
        "living room. Use short commands such as go north, take key, open box. Good luck!"
    )
    rooms = ["You are in the hall.", "You are in the study.", "You are in the bathroom."]
    texts = [f"{header}\n{room}" for room in rooms] * 2
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    kept = similar_text_anchor(texts, group, threshold=0.8, boilerplate=None)
    assert len(set(kept[:3].tolist())) == 1  # the header makes all rooms look alike
    dropped = similar_text_anchor(texts, group, threshold=0.8)
    assert len(set(dropped[:3].tolist())) == 3  # without it the rooms differ
    one_group = similar_text_anchor(texts[:3], threshold=0.8)
    assert len(set(one_group.tolist())) == 1  # one group: nothing is boilerplate


def test_minhash_estimates_jaccard():
    rng = random.Random(1)
    vocab = [f"w{i}" for i in range(300)]
    for _ in range(20):
        a = rng.sample(vocab, 60)
        b = a[: rng.randint(10, 60)] + rng.sample(vocab, rng.randint(0, 40))
        texts = ["\n".join(a), "\n".join(b)]  # one word per line: shingles are the words
        signatures, has = minhash_signatures(split_lines(texts), 256)
        estimate = float((signatures[0] == signatures[1]).mean())
        exact = len(set(a) & set(b)) / len(set(a) | set(b))
        assert has.all() and abs(estimate - exact) < 0.12, (estimate, exact)


def test_connected_components():
    src = torch.tensor([0, 2, 5, 6])
    dst = torch.tensor([1, 3, 4, 5])
    assert connected_components(8, src, dst).tolist() == [0, 0, 2, 2, 4, 4, 4, 7]
    chain = torch.arange(999)
    labels = connected_components(1000, chain + 1, chain)  # one long path, reversed edges
    assert labels.eq(0).all()


def test_similar_handles_many_rows_quickly():
    import time

    base = [
        f"room {r} holds " + " ".join(f"thing{(r * 7 + i) % 50}" for i in range(12))
        for r in range(200)
    ]
    texts = [f"{base[i % 200]}\nstep answer {i % 5}" for i in range(20_000)]
    start = time.perf_counter()
    anchor = similar_text_anchor(texts, torch.arange(20_000) // 400)
    assert anchor.shape == (20_000,)
    assert time.perf_counter() - start < 20  # ~0.5 s here; generous for shared CI machines


# -- the estimator -------------------------------------------------------------------------


def two_trajectories():
    td = TensorDict(
        {
            "group_id": torch.tensor([0, 0, 0, 0]),
            "traj_id": torch.tensor([0, 0, 1, 1]),
            "step": torch.tensor([0, 1, 0, 1]),
            "state_hash": torch.tensor([10, 11, 10, 11]),
            ("next", "reward"): torch.tensor([[0.0], [1.0], [0.0], [0.0]]),
            ("next", "done"): torch.tensor([[False], [True], [False], [True]]),
        },
        [4],
    )
    td["observation"] = ["start", "You see a key.", "start", "you see a key"]
    td["action_text"] = ["take key", "go", "look", "go"]
    return td


def test_estimator_anchor_modes():
    sizes = {}
    for anchor in ("state", "history:1", "similar"):
        out = GIGPOAdvantage(anchor=anchor)(two_trajectories())
        sizes[anchor] = out["step_group_size"].reshape(-1).tolist()
    assert sizes["state"] == [2, 2, 2, 2]
    assert sizes["history:1"] == [2, 1, 2, 1]  # state 11 reached by different actions
    assert sizes["similar"] == [2, 2, 2, 2]  # the texts differ only in case and punctuation


def test_estimator_similar_needs_no_state_hash_but_the_observation():
    td = two_trajectories().exclude("state_hash")
    out = GIGPOAdvantage(anchor="similar")(td)
    assert out["step_group_size"].reshape(-1).tolist() == [2, 2, 2, 2]
    assert "observation" in GIGPOAdvantage(anchor="similar").in_keys
    assert "state_hash" not in GIGPOAdvantage(anchor="similar").in_keys
    with pytest.raises(ValueError, match="needs the key 'observation'"):
        GIGPOAdvantage(anchor="similar")(td.exclude("observation"))
    with pytest.raises(ValueError, match="needs the key 'action_text'"):
        GIGPOAdvantage(anchor="history:2")(two_trajectories().exclude("action_text"))
    renamed = two_trajectories().rename_key_("observation", "text")
    estimator = GIGPOAdvantage(anchor="similar")
    estimator.set_keys(observation="text")
    assert estimator(renamed)["step_group_size"].reshape(-1).tolist() == [2, 2, 2, 2]


def test_estimator_refuses_bad_anchor_options():
    with pytest.raises(ValueError, match="anchor='nearby'"):
        GIGPOAdvantage(anchor="nearby")
    for bad in (0, 1.5, "0.5", True):
        with pytest.raises(ValueError, match="similarity_threshold"):
            GIGPOAdvantage(anchor="similar", similarity_threshold=bad)


def test_grpo_reports_anchor_groups_when_the_keys_are_there():
    out = GIGPOAdvantage("grpo", anchor="history:1")(two_trajectories())
    assert out["step_group_size"].reshape(-1).tolist() == [2, 1, 2, 1]
    out = GIGPOAdvantage("grpo", anchor="similar")(two_trajectories().exclude("observation"))
    assert out["step_group_size"].reshape(-1).tolist() == [2, 2, 2, 2]  # falls back to state


# -- training options ----------------------------------------------------------------------


def test_anchor_flags_reach_the_config():
    config = parse_config(["--anchor", "similar", "--similarity_threshold", "0.7"])
    assert (config.anchor, config.similarity_threshold) == ("similar", 0.7)
    assert parse_config(["--anchor", "history:3"]).anchor == "history:3"
    assert TrainConfig().anchor == "state"


@pytest.mark.parametrize(
    "options, message",
    [
        ({"anchor": "history"}, "--anchor 'history' must be state, history:k"),
        ({"anchor": "similar", "similarity_threshold": 0}, "--similarity_threshold 0"),
        ({"anchor": "similar", "similarity_threshold": 1.5}, "must be <= 1"),
    ],
)
def test_bad_anchor_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**options).validate()


def test_training_logs_the_anchor_mode_and_its_groups(tmp_path):
    from gigpo_torchrl.train import Trainer
    from tests.test_train import tiny_config

    trainer = Trainer(tiny_config(tmp_path, anchor="history:2", iterations=1, val_every=5))
    record = trainer.train_iteration()
    sizes = trainer.last_batch["step_group_size"].reshape(-1)
    assert record["anchor"] == "history:2"
    assert record["singleton_fraction"] == pytest.approx(float((sizes == 1).float().mean()))
    assert record["step_group_size_histogram"] == torch.bincount(sizes).tolist()
    # the collector's exact-state statistics are coarser: history only splits groups
    exact = trainer.collector.stats["singleton_fraction"]
    assert record["singleton_fraction"] >= exact


def test_anchor_modes_on_every_device(device):
    td = two_trajectories()
    on_device = td.clone().to(device)  # the texts stay text
    for anchor in ("state", "history:1", "similar"):
        expected = GIGPOAdvantage(anchor=anchor)(td.clone())
        got = GIGPOAdvantage(anchor=anchor)(on_device.clone())
        assert got["advantage"].device.type == torch.device(device).type
        assert torch.equal(got["step_group_size"].cpu(), expected["step_group_size"])
        assert torch.allclose(got["advantage"].cpu(), expected["advantage"])
