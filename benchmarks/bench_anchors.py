"""Speed of the anchor modes at 6.4k and 100k step rows (``similar`` is the costly one).

Rows are synthetic household-game observations: episode groups of 8 trajectories x 50
steps; each group is one game of 6 rooms whose states (room, what is carried, which
containers are open) recur, and each observation is the game's answer to the last action
(one of several phrasings) followed by the room's description and the inventory, so texts
of one state differ by their first sentence (paraphrase-level duplicates) and texts of
different states by a few words. Rows are shuffled. ``--difflib`` also times the authors'
reference method (greedy clustering, ``difflib`` ratio >= 0.95 against each cluster's first
member, per group) on the first groups of the 6.4k batch, and the agreement of the two.

    python benchmarks/bench_anchors.py             # 6,400 and 100,000 rows
    python benchmarks/bench_anchors.py --difflib   # and the reference's clustering
"""

from __future__ import annotations

import argparse
import difflib
import random
import time

import torch

from gigpo_torchrl.functional.anchors import history_anchor, similar_text_anchor, text_hashes
from gigpo_torchrl.functional.segments import segment_ids

ROOMS = ["kitchen", "pantry", "bedroom", "attic", "bathroom", "cellar", "studio", "garage"]
OBJECTS = ["apple", "kettle", "key", "mug", "towel", "lamp", "book", "knife", "plate", "coin"]
ADJECTIVES = ["red", "old", "wooden", "rusty", "small", "shiny", "teal", "heavy"]
CONTAINERS = ["fridge", "chest", "cabinet", "drawer", "locker", "box"]
ANSWERS = [
    "You move there.",
    "You arrive.",
    "Done.",
    "Okay, you do that.",
    "You look around.",
    "Nothing happens for a moment.",
]
FILLER = [
    "A crooked sign tells you where you are.",
    "Okay, just remember what you are here to do.",
    "It is a normal one.",
    "You smell something odd here.",
]


def make_game(rng: random.Random) -> dict:
    rooms = rng.sample(ROOMS, 6)
    return {
        "rooms": rooms,
        "filler": {r: rng.choice(FILLER) for r in rooms},
        "objects": {
            r: [f"{rng.choice(ADJECTIVES)} {o}" for o in rng.sample(OBJECTS, 2)] for r in rooms
        },
        "container": {r: rng.choice(CONTAINERS) for r in rooms},
    }


def describe(game: dict, state: tuple, answer: str) -> str:
    room, carried, opened = state
    things = [o for o in game["objects"][room] if o not in carried]
    box = game["container"][room]
    lines = [
        answer,
        "",
        f"-= {room.title()} =-",
        f"You are in the {room}. {game['filler'][room]}",
        f"You can see a {box}, which is {'open' if opened else 'closed'}.",
        f"On the floor: {', '.join(things) if things else 'nothing'}.",
        "",
        f"You are carrying: {', '.join(sorted(carried)) if carried else 'nothing'}.",
    ]
    return "\n".join(lines)


def make_batch(rows: int, seed: int = 0, steps: int = 50, n: int = 8) -> dict:
    """Shuffled step rows: group_id, traj_id, step, state_hash, action_hash, observation."""
    rng = random.Random(seed)
    groups = max(1, rows // (steps * n))
    columns: dict[str, list] = {k: [] for k in ("group", "traj", "step", "state", "action", "text")}
    traj = 0
    for g in range(groups):
        game = make_game(rng)
        for _ in range(n):
            state = (game["rooms"][0], frozenset(), False)
            for t in range(steps):
                room, carried, opened = state
                action = rng.choice(["go", "take", "drop", "open", "close", "look"])
                columns["group"].append(g)
                columns["traj"].append(traj)
                columns["step"].append(t)
                columns["state"].append(f"{g}|{room}|{sorted(carried)}|{opened}")
                columns["action"].append(action)
                columns["text"].append(describe(game, state, rng.choice(ANSWERS)))
                if action == "go":
                    state = (rng.choice(game["rooms"]), carried, False)
                elif action == "take" and len(carried) < 2:
                    state = (room, carried | {rng.choice(game["objects"][room])}, opened)
                elif action == "drop" and carried:
                    state = (room, carried - {rng.choice(sorted(carried))}, opened)
                elif action in ("open", "close"):
                    state = (room, carried, action == "open")
            traj += 1
    perm = list(range(len(columns["group"])))
    rng.shuffle(perm)
    out = {k: [v[i] for i in perm] for k, v in columns.items()}
    for k in ("group", "traj", "step"):
        out[k] = torch.tensor(out[k], dtype=torch.int64)
    out["state"] = text_hashes(out["state"])
    return out


def singleton_fraction(group: torch.Tensor, anchor: torch.Tensor) -> tuple[float, int]:
    ids, num, counts = segment_ids(group, anchor)
    return float((counts[ids] == 1).double().mean()), num


def greedy_difflib(texts: list[str], threshold: float = 0.95) -> list[int]:
    """The reference's clustering of one group: each text joins the first cluster whose first
    member has a difflib ratio >= threshold with it, else starts a cluster."""
    firsts: list[str] = []
    out = []
    for text in texts:
        for c, first in enumerate(firsts):
            if difflib.SequenceMatcher(None, first, text).ratio() >= threshold:
                out.append(c)
                break
        else:
            firsts.append(text)
            out.append(len(firsts) - 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="*", default=[6_400, 100_000])
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--difflib", action="store_true", help="time the reference's method")
    parser.add_argument("--difflib-groups", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch threads 1; similar threshold {args.threshold}")
    print("| rows | distinct texts | mode | time | anchor groups | singleton fraction |")
    print("|---:|---:|---|---:|---:|---:|")
    for rows in args.rows:
        batch = make_batch(rows)
        n = len(batch["text"])
        distinct = len(set(batch["text"]))
        start = time.perf_counter()
        state = batch["state"]
        t_state = time.perf_counter() - start
        start = time.perf_counter()
        actions = text_hashes(batch["action"])
        history = history_anchor(state, actions, batch["traj"], batch["step"], 2)
        t_history = time.perf_counter() - start
        start = time.perf_counter()
        similar = similar_text_anchor(batch["text"], batch["group"], threshold=args.threshold)
        t_similar = time.perf_counter() - start
        for mode, anchor, seconds in (
            ("state", state, t_state),
            ("history:2", history, t_history),
            ("similar", similar, t_similar),
        ):
            fraction, groups = singleton_fraction(batch["group"], anchor)
            print(
                f"| {n:,} | {distinct:,} | {mode} | {seconds:.3f} s | {groups:,} | {fraction:.3f} |"
            )
        if args.difflib and rows == args.rows[0]:
            compare_difflib(batch, similar, args.difflib_groups)


def compare_difflib(batch: dict, similar: torch.Tensor, groups: int) -> None:
    """Time the reference's greedy clustering on the first groups; report how its clusters
    and ours split the rows of equal state."""
    chosen = [i for i in range(len(batch["text"])) if int(batch["group"][i]) < groups]
    start = time.perf_counter()
    labels = {}
    for g in range(groups):
        rows = [i for i in chosen if int(batch["group"][i]) == g]
        for i, c in zip(rows, greedy_difflib([batch["text"][i] for i in rows]), strict=True):
            labels[i] = (g, c)
    seconds = time.perf_counter() - start
    ref = torch.tensor([labels[i][0] * 1_000_000 + labels[i][1] for i in chosen])
    group = batch["group"][chosen]
    state = batch["state"][chosen]
    ours = similar[chosen]

    def purity(anchor):  # share of rows whose anchor group holds one state only
        ids, num, _ = segment_ids(group, anchor)
        pairs = torch.unique(torch.stack([ids, state]), dim=1)
        states_per_group = torch.bincount(pairs[0], minlength=num)
        return float((states_per_group[ids] == 1).double().mean())

    print(
        f"\nreference greedy difflib (ratio >= 0.95), {len(chosen)} rows of {groups} groups: "
        f"{seconds:.1f} s ({seconds / len(chosen) * 6400:.0f} s per 6,400 rows at this rate)"
    )
    for name, anchor in (("difflib", ref), ("similar", ours), ("state", state)):
        fraction, num = singleton_fraction(group, anchor)
        print(
            f"  {name:>8}: {num} groups, singleton fraction {fraction:.3f}, rows in a "
            f"single-state group {purity(anchor):.3f}"
        )


if __name__ == "__main__":
    main()
