"""Does a policy read the way on ``lake-walk``? Its first move on fresh tasks, no sampling.

For each task (a start and a goal square, drawn by seed) the prompt is the main job's (the
task, the observation, the four moves, no memory); the model's distribution over the four
moves is read from one forward pass. Printed: the share of tasks whose most likely move
brings the agent closer to the goal, the mean probability of such moves, and how often each
move is the most likely one. A policy that ignores the observation picks the same move
everywhere; one that reads it spreads its picks over the moves and is mostly right.

    python benchmarks/probe_first_moves.py                                  # untrained
    python benchmarks/probe_first_moves.py runs/gigpo-smollm2-frozenlake/model
"""

from __future__ import annotations

import argparse

import torch
from tensordict import TensorDict

from gigpo_torchrl.envs import make_env
from gigpo_torchrl.policy import load_model
from gigpo_torchrl.policy.prompts import PromptBuilder

MOVES = {"left": (0, -1), "down": (1, 0), "right": (0, 1), "up": (-1, 0)}


def good_moves(game) -> set[str]:
    """The moves that bring the agent of a ``GymTextGame`` FrozenLake closer to the goal."""
    lake = game.env.unwrapped
    row, col = divmod(int(lake.s), lake.ncol)
    goal_row, goal_col = divmod(int((lake.desc.flatten() == b"G").argmax()), lake.ncol)
    before = abs(goal_row - row) + abs(goal_col - col)
    return {
        name
        for name, (dr, dc) in MOVES.items()
        if abs(goal_row - row - dr) + abs(goal_col - col - dc) < before
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="smollm2-135m", help="name or checkpoint")
    parser.add_argument("--tasks", type=int, default=64)
    parser.add_argument("--seed", type=int, default=10_000, help="first task seed")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model)
    env = make_env("lake-walk", batch_size=args.tasks)
    seeds = torch.arange(args.seed, args.seed + args.tasks)
    td = env.reset(TensorDict({"seed": seeds}, [args.tasks]))
    actions = list(MOVES)
    ids = [tokenizer.encode(a, add_special_tokens=False) for a in actions]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"the moves must be one token each for this probe, got {ids}")
    builder = PromptBuilder(memory=0)
    right, mass, picks = 0, 0.0, dict.fromkeys(actions, 0)
    for i, observation in enumerate(td["observation"]):
        messages = builder.messages(td["task"][i], observation, (), actions)
        prompt = tokenizer.encode(builder.render(tokenizer, messages), add_special_tokens=False)
        with torch.no_grad():
            logits = model(torch.tensor([prompt])).logits[0, -1, [t for (t,) in ids]]
        probs = logits.float().softmax(-1)
        good = good_moves(env.games[i])
        pick = actions[int(probs.argmax())]
        picks[pick] += 1
        right += pick in good
        mass += float(sum(p for a, p in zip(actions, probs, strict=True) if a in good))
    n = args.tasks
    print(f"model {args.model}, {n} tasks (seeds {args.seed}..{args.seed + n - 1})")
    print("most likely first move: " + ", ".join(f"{a} {c}" for a, c in picks.items()))
    print(f"probability on the moves that get closer: {mass / n:.2f}")
    print(f"first moves right: {right / n:.2f}")


if __name__ == "__main__":
    main()
