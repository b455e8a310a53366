"""``TrainConfig``: every training option, with ms-swift's names where ms-swift has one."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
from dataclasses import dataclass, field
from typing import Any

from gigpo_torchrl.objectives import LOSS_AGG_MODES

ESTIMATORS = ("grpo", "rloo", "gigpo")
NORMS = ("std", "none")
COMPATS = (None, "verl-agent")
LOGGERS = ("csv", "tensorboard", "wandb")
DTYPES = ("auto", "float32", "bfloat16")
BACKENDS = ("transformers", "vllm")


@dataclass
class TrainConfig:
    """Options of a training run.

    The defaults are the README's main job, sized for a 2-core CPU (about 15 minutes):
    SmolLM2-135M-Instruct on FrozenLake, 2 maps × 4 attempts per iteration, no prompt
    memory (the lake is fully visible), no reference model. For real runs raise
    ``num_groups``, ``num_generations`` (the paper uses 8), ``iterations`` and ``memory``.

    ms-swift names: ``advantage_estimator``, ``use_gym_env``, ``gigpo_step_advantage_weight``,
    ``num_generations``, ``beta`` (KL coefficient to the reference model; 0 skips the
    reference model), ``max_turns`` (episode step limit; None: the env's own).

    ``invalid_action_penalty`` is what the env subtracts from the reward of an invalid
    action. ``compat="verl-agent"`` computes advantages as the authors' reference does
    (``GIGPOAdvantage(compat="verl-agent")``), the penalty included: it is applied to each
    invalid row's own score and step return after the returns are computed from the game's
    reward (``("next", "env_reward")``), instead of being part of the reward.
    """

    # -- algorithm (ms-swift names) --
    advantage_estimator: str = "gigpo"
    use_gym_env: bool = True
    gigpo_step_advantage_weight: float = 1.0
    num_generations: int = 4
    beta: float = 0.0
    max_turns: int | None = 8
    gamma: float = 0.95
    norm_adv: str = "std"
    compat: str | None = None
    invalid_action_penalty: float = 0.1
    # -- environment and model --
    env: str = "frozenlake"
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    model: str = "smollm2-135m"
    backend: str = "transformers"
    memory: int = 0
    # -- rollouts --
    num_groups: int = 2
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 8
    # -- optimisation --
    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    iterations: int = 7
    ppo_epochs: int = 1
    mini_batch_size: int = 64
    loss_agg_mode: str = "token_mean"
    max_tokens_per_micro_batch: int | None = 4096
    micro_batch_size: int | None = None
    clip_epsilon: float = 0.2
    max_grad_norm: float = 1.0
    lora: bool = False
    lora_rank: int = 8
    train_layers: int | None = None
    # -- engine --
    device: str = "auto"
    dtype: str = "auto"
    gradient_checkpointing: bool = False
    num_threads: int | None = None
    # -- validation, logging, checkpoints --
    val_every: int = 4
    val_at_start: bool = True
    val_groups: int = 4
    val_temperature: float = 0.4
    save_every: int = 4
    logger: str = "csv"
    output_dir: str = "runs"
    run_name: str = "gigpo-smollm2-frozenlake"
    seed: int = 0
    resume: bool = False

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad option (checked before any model loads)."""
        from gigpo_torchrl.envs import list_envs

        def choice(name, options):
            if getattr(self, name) not in options:
                raise ValueError(f"--{name} {getattr(self, name)!r} is not one of {options}")

        def number(name, low=None, integer=False, allow_none=False, strict=False):
            value = getattr(self, name)
            if value is None and allow_none:
                return
            kind = int if integer else (int, float)
            if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
                what = "an integer" if integer else "a number"
                raise ValueError(f"--{name} {value!r} must be {what}")
            if low is not None and (value <= low if strict else value < low):
                raise ValueError(f"--{name} {value!r} must be {'>' if strict else '>='} {low}")

        choice("advantage_estimator", ESTIMATORS)
        choice("norm_adv", NORMS)
        choice("compat", COMPATS)
        number("invalid_action_penalty", 0)
        if self.compat == "verl-agent" and self.advantage_estimator == "rloo":
            raise ValueError(
                "--compat verl-agent reproduces the reference's gigpo and grpo estimators; "
                "--advantage_estimator rloo has no verl-agent counterpart"
            )
        choice("logger", LOGGERS)
        choice("backend", BACKENDS)
        number("gigpo_step_advantage_weight", 0)
        if self.advantage_estimator == "gigpo" and (not self.use_gym_env or not self.env):
            raise ValueError(
                "--advantage_estimator gigpo needs an environment (--use_gym_env true and "
                "--env NAME): its step-level advantage groups steps by environment state"
            )
        if not self.env.startswith("gym:") and self.env not in list_envs():
            raise ValueError(
                f"--env {self.env!r} is not a registered environment; known: "
                f"{', '.join(list_envs())} (or gym:<gymnasium id>)"
            )
        if not isinstance(self.env_kwargs, dict):
            raise ValueError(f"--env_kwargs {self.env_kwargs!r} must be a mapping")
        if "invalid_action_penalty" in self.env_kwargs:
            raise ValueError(
                "--env_kwargs: give the penalty as --invalid_action_penalty (the env and, with "
                "--compat verl-agent, the advantage both use it)"
            )
        if not 0 <= self.gamma <= 1:
            raise ValueError(f"--gamma {self.gamma!r} must be in [0, 1]")
        for name in (
            "num_generations",
            "num_groups",
            "iterations",
            "ppo_epochs",
            "mini_batch_size",
            "max_new_tokens",
            "val_every",
            "val_groups",
            "save_every",
            "lora_rank",
        ):
            number(name, 1, integer=True)
        number("max_turns", 1, integer=True, allow_none=True)
        number("micro_batch_size", 1, integer=True, allow_none=True)
        number("max_tokens_per_micro_batch", 1, integer=True, allow_none=True)
        number("num_threads", 1, integer=True, allow_none=True)
        number("train_layers", 1, integer=True, allow_none=True)
        if self.lora and self.train_layers is not None:
            raise ValueError("--lora and --train_layers are exclusive: choose one")
        choice("loss_agg_mode", LOSS_AGG_MODES)
        choice("dtype", DTYPES)
        if self.model.startswith("random:"):
            from gigpo_torchrl.policy.models import RANDOM_PRESETS

            if self.model.removeprefix("random:") not in RANDOM_PRESETS:
                raise ValueError(
                    f"--model {self.model!r}: unknown preset; known: "
                    + ", ".join(f"random:{name}" for name in RANDOM_PRESETS)
                )
        self.resolve_device()
        number("memory", 0, integer=True)
        number("seed", 0, integer=True)
        number("beta", 0)
        number("learning_rate", 0, strict=True)
        number("weight_decay", 0)
        number("clip_epsilon", 0, strict=True)
        number("max_grad_norm", 0, strict=True)
        number("temperature", 0)
        number("val_temperature", 0)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top_p {self.top_p!r} must be in (0, 1]")
        if self.lora and importlib.util.find_spec("peft") is None:
            raise ValueError("--lora needs peft: pip install 'gigpo-torchrl[lora]'")
        if self.backend == "vllm":
            if self.lora:
                raise ValueError(
                    "--lora with --backend vllm is not supported: vLLM needs full weights"
                )
            if importlib.util.find_spec("vllm") is None:
                raise ValueError("--backend vllm needs vLLM: pip install 'gigpo-torchrl[vllm]'")
        if not self.run_name or "/" in self.run_name:
            raise ValueError(f"--run_name {self.run_name!r} must be a plain folder name")

    def resolve_device(self) -> str:
        """The torch device ``--device`` names: ``auto`` is ``cuda`` when one is visible."""
        import torch

        device = self.device
        if device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", str(device)):
            raise ValueError(f"--device {device!r} must be auto, cpu, cuda or cuda:N")
        if device.startswith("cuda"):
            index = int(device.partition(":")[2] or 0)
            if not torch.cuda.is_available():
                raise ValueError(f"--device {device}: no CUDA device is visible here")
            if index >= torch.cuda.device_count():
                raise ValueError(
                    f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible"
                )
        return device

    def resolve_dtype(self) -> str:
        """``--dtype`` with ``auto`` resolved: bfloat16 autocast on CUDA, float32 on CPU."""
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if self.resolve_device().startswith("cuda") else "float32"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
