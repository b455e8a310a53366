"""GIGPO for any TorchRL actor: a small MLP policy on FrozenLake, critic-free ClipPPOLoss.

Nothing here is LLM-specific. The policy is a torchrl ``ProbabilisticActor`` (a Categorical
over an MLP) that sees an egocentric one-hot encoding of the lake; each iteration plays
``num_groups`` random maps ``num_generations`` times each (an episode group shares its map
and start), computes GIGPO advantages with ``GIGPOAdvantage`` attached to torchrl's
``ClipPPOLoss`` through ``make_value_estimator`` (no critic), and takes a few PPO epochs.
At the end the greedy policy plays maps it has never seen.

    python examples/train_small_policy.py                       # FrozenLake 4x4, ~40 s on CPU
    python examples/train_small_policy.py --env sokoban --env-steps 300000
    python examples/train_small_policy.py --estimator grpo      # the same without step credit
"""

import argparse
import json
import time

import torch
from torchrl.objectives import ClipPPOLoss

from gigpo_torchrl import GIGPOAdvantage
from gigpo_torchrl.small_policy import GroupRollout, make_actor, singleton_fraction

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--env", default="frozenlake", choices=["frozenlake", "sokoban"])
parser.add_argument("--env-kwargs", type=json.loads, default=None, help="e.g. '{\"size\": 6}'")
parser.add_argument("--estimator", default="gigpo", choices=["gigpo", "grpo", "rloo"])
parser.add_argument("--gamma", type=float, default=0.95)
parser.add_argument("--step-advantage-weight", type=float, default=1.0)
parser.add_argument("--num-groups", type=int, default=8, help="tasks (maps) per iteration")
parser.add_argument("--num-generations", type=int, default=8, help="N: attempts per task")
parser.add_argument("--env-steps", type=int, default=100_000, help="training budget")
parser.add_argument("--learning-rate", type=float, default=1e-3)
parser.add_argument("--epochs", type=int, default=4)
parser.add_argument("--minibatch-size", type=int, default=256)
parser.add_argument("--eval-maps", type=int, default=200)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
env_kwargs = args.env_kwargs if args.env_kwargs is not None else {}
if args.env == "frozenlake" and args.env_kwargs is None:
    env_kwargs = {"size": 4}

torch.set_num_threads(1)
torch.manual_seed(args.seed)

# 1. Episode groups: num_groups tasks x num_generations attempts, the games stepped directly.
rollout = GroupRollout(args.env, args.num_generations, env_kwargs=env_kwargs)

# 2. The policy: observation [B, D] -> logits -> action [B] (and its log-probability).
actor = make_actor(rollout.observation_dim, len(rollout.action_names), hidden=(128, 128))

# 3. The loss: PPO's clipped ratio without a critic; GIGPO supplies the advantages.
loss = ClipPPOLoss(actor, critic_network=None, clip_epsilon=0.2, entropy_coeff=0.01)
loss.make_value_estimator(
    GIGPOAdvantage(
        args.estimator, gamma=args.gamma, step_advantage_weight=args.step_advantage_weight
    )
)
optimizer = torch.optim.Adam(loss.parameters(), lr=args.learning_rate)

# 4. Train: collect a batch of groups, compute the advantages once, a few PPO epochs.
env_steps, iteration, trajectories, start = 0, 0, 0, time.time()
while env_steps < args.env_steps:
    seeds = [args.seed * 10**6 + iteration * args.num_groups + g for g in range(args.num_groups)]
    batch = rollout.collect(
        actor, seeds, group_offset=iteration * args.num_groups, traj_offset=trajectories
    )
    trajectories += args.num_groups * args.num_generations
    env_steps += batch.shape[0]
    batch = loss.value_estimator(batch)  # writes "advantage" [R, 1] (and diagnostics)

    for _ in range(args.epochs):
        for rows in torch.randperm(batch.shape[0]).split(args.minibatch_size):
            out = loss(batch[rows])
            (out["loss_objective"] + out["loss_entropy"]).backward()
            torch.nn.utils.clip_grad_norm_(loss.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()

    if iteration % 10 == 0:
        success = batch["success"].sum().item() / (args.num_groups * args.num_generations)
        print(
            f"iteration {iteration}: env steps {env_steps}, success {success:.2f}, "
            f"singleton fraction {singleton_fraction(batch):.2f}, "
            f"entropy {out['entropy'].item():.2f}, {time.time() - start:.0f} s",
            flush=True,
        )
    iteration += 1

# 5. Evaluate the greedy policy (most likely action) on maps it never trained on.
eval_rollout = GroupRollout(args.env, 1, env_kwargs=env_kwargs)
held_out = [10**9 + k for k in range(args.eval_maps)]
batch = eval_rollout.collect(actor, held_out, greedy=True)
success = batch["success"].sum().item() / args.eval_maps
print(f"greedy success on {args.eval_maps} held-out tasks: {success:.2f}")
