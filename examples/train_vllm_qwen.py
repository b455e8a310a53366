"""GIGPO with vLLM rollouts on a GPU, with the paper's settings (γ=0.95, ω=1, N=8).

Qwen2.5-1.5B-Instruct as in the GiGPO paper, or any local transformers checkpoint. Weights
must already be on disk (nothing is downloaded at run time): pass the checkpoint directory.
vLLM generates; the transformers copy of the model trains, scores behaviour log-probs, and
pushes its weights back to vLLM after every update. Needs `pip install -e ".[vllm]"` and a
CUDA GPU.

    python examples/train_vllm_qwen.py /path/to/Qwen2.5-1.5B-Instruct
"""

import sys

from gigpo_torchrl.train import TrainConfig, Trainer

if len(sys.argv) < 2:
    sys.exit(__doc__)

config = TrainConfig(
    model=sys.argv[1],
    backend="vllm",
    env="sokoban",
    advantage_estimator="gigpo",
    gigpo_step_advantage_weight=1.0,  # ω
    gamma=0.95,
    num_generations=8,  # N
    num_groups=16,
    max_turns=15,
    memory=2,  # the last 2 (observation, action) pairs in every prompt
    temperature=1.0,
    val_temperature=0.4,
    max_new_tokens=256,
    beta=0.01,
    learning_rate=1e-6,
    mini_batch_size=256,
    micro_batch_size=16,
    iterations=150,
    val_every=10,
    save_every=10,
    run_name="qwen2.5-1.5b-sokoban",
)
Trainer(config).train()
