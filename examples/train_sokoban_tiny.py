"""GIGPO on Sokoban with the tiny random model, written out top to bottom (CPU, ~1 minute).

Every piece of a training iteration is visible here: group rollouts, GIGPO advantages,
torchrl's GRPOLoss and an AdamW step. The tiny model knows nothing, so do not expect it to
solve rooms; swap in model="smollm2-135m" (or use gigpo-train) for a real run.

    python examples/train_sokoban_tiny.py
"""

import torch
from torchrl.modules.llm import TransformersWrapper
from torchrl.objectives.llm import GRPOLoss

from gigpo_torchrl import GIGPOAdvantage
from gigpo_torchrl.collector import GroupCollector
from gigpo_torchrl.policy import make_policy

ITERATIONS = 5
NUM_GROUPS, NUM_GENERATIONS = 2, 4  # 2 rooms, 4 attempts each: the GIGPO groups
torch.manual_seed(0)

# The policy samples replies and records their behaviour log-probs.
policy = make_policy("tiny", temperature=1.0, max_new_tokens=8)
collector = GroupCollector(
    "sokoban",
    policy,
    num_groups=NUM_GROUPS,
    num_generations=NUM_GENERATIONS,
    max_steps=5,
    seed=0,
)

# The training actor scores the same tokens with gradients; "sft" masking restricts the loss
# to each step's own reply tokens.
actor = TransformersWrapper(
    policy.model,
    tokenizer=policy.tokenizer,
    input_mode="tokens",
    generate=False,
    return_log_probs=True,
    pad_output=False,
)
loss_fn = GRPOLoss(actor, clip_epsilon=0.2, masking_strategy="sft", entropy_bonus=False)
loss_fn.make_value_estimator(GIGPOAdvantage(gamma=0.95, step_advantage_weight=1.0))
optimizer = torch.optim.AdamW(policy.model.parameters(), lr=1e-4)

for iteration in range(ITERATIONS):
    batch = collector.collect()  # flat step rows of 8 trajectories
    batch = loss_fn.value_estimator(batch)  # writes "advantage" (A_E + ω·A_S)

    policy.model.train()
    optimizer.zero_grad()
    loss = loss_fn(batch).loss_objective
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.model.parameters(), 1.0)
    optimizer.step()
    policy.model.eval()

    stats = collector.stats
    print(
        f"iteration {iteration}: {stats['steps']} steps, success {stats['success_rate']:.2f}, "
        f"return {stats['mean_return']:.2f}, invalid {stats['invalid_action_rate']:.2f}, "
        f"singleton anchors {stats['singleton_fraction']:.2f}, loss {loss.item():.4f}"
    )
