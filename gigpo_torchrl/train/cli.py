"""``gigpo-train``: the command line, with ms-swift's flag names.

Precedence: built-in defaults < ``--config FILE`` (YAML, the same keys) < flags.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from pathlib import Path

import yaml

from gigpo_torchrl.train.config import FIELDS, TrainConfig

HELP = {
    "advantage_estimator": "grpo, rloo or gigpo (ms-swift name)",
    "use_gym_env": "roll out in an environment (ms-swift name; gigpo needs it)",
    "gigpo_step_advantage_weight": "ω in A = A_E + ω·A_S (ms-swift name)",
    "num_generations": "trajectories per task, the group size N (ms-swift name)",
    "beta": "KL coefficient to the frozen reference model; 0 loads no reference (ms-swift)",
    "max_turns": "episode step limit; omit for the env's own (ms-swift name)",
    "gamma": "discount of the step return",
    "norm_adv": "std or none: divide advantages by the group std or not",
    "compat": "none or verl-agent: compute advantages exactly as the authors' reference",
    "invalid_action_penalty": "subtracted from an invalid action's reward (with --compat "
    "verl-agent: from that row's own score and step return, the reference's way)",
    "env": "registered env name or gym:<id>",
    "env_kwargs": "JSON object passed to the env factory",
    "model": "tiny, smollm2-135m, random:<preset> (smollm2-135m, qwen2.5-0.5b, qwen2.5-1.5b "
    "shapes, random weights) or a local checkpoint directory",
    "backend": "transformers or vllm (GPU)",
    "memory": "past (observation, action) pairs shown in each prompt",
    "num_groups": "tasks per iteration (B)",
    "mini_batch_size": "step rows per optimizer step",
    "micro_batch_size": "step rows per forward/backward instead of a token budget",
    "max_tokens_per_micro_batch": "padded tokens per forward/backward; rows sorted by length "
    "and each distinct prompt encoded once (gradient accumulation never changes the loss)",
    "loss_agg_mode": "token_mean, seq_mean_token_mean or seq_mean_token_sum (verl's names)",
    "device": "auto, cpu, cuda or cuda:N (auto: cuda when visible)",
    "dtype": "auto, float32 or bfloat16 (autocast, fp32 weights and optimizer state); "
    "auto: bfloat16 on CUDA, float32 on CPU",
    "gradient_checkpointing": "recompute activations in backward: less memory, ~30%% slower",
    "num_threads": "torch intra-op threads on CPU (default: the cores not busy at start-up)",
    "train_layers": "train only the top K decoder layers (and the final norm): backward stops "
    "there; embeddings and LM head frozen",
    "val_at_start": "validate once before the first update (the baseline of the curves)",
    "val_every": "validate every K iterations (and at the end)",
    "save_every": "checkpoint every K iterations (and at the end)",
    "logger": "csv, tensorboard or wandb",
    "resume": "continue the run in output_dir/run_name from its last checkpoint",
}


def _bool(text: str) -> bool:
    lowered = str(text).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON: {text!r} ({error})") from error
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("none", "") else int(text)


def _optional_str(text: str) -> str | None:
    return None if text.lower() in ("none", "") else text


def _arg_type(name: str):
    """The argparse type of a config field, from its annotation."""
    hint = typing.get_type_hints(TrainConfig)[name]
    if hint is bool:
        return _bool
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return _optional_str if str in typing.get_args(hint) else _optional_int
    if typing.get_origin(hint) is dict:
        return _json_object
    return hint


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gigpo-train",
        description="Train an LLM agent in a text environment with GIGPO on TorchRL.",
    )
    parser.add_argument("--config", type=Path, help="YAML file with the same keys as the flags")
    for name, spec in FIELDS.items():
        default = spec.default_factory() if callable(spec.default_factory) else spec.default
        # SUPPRESS keeps unset flags out of the namespace, so a YAML value is not overridden
        # by a default nobody asked for.
        parser.add_argument(
            f"--{name}",
            type=_arg_type(name),
            default=argparse.SUPPRESS,
            nargs="?" if FIELDS[name].type in ("bool", bool) else None,
            const=True if FIELDS[name].type in ("bool", bool) else None,
            help=f"{HELP.get(name, '')} (default: {default})".strip(),
        )
    return parser


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """The validated :class:`TrainConfig` of a command line.

    Raises:
        ValueError: naming an unknown YAML key or an invalid value.
    """
    args = vars(build_parser().parse_args(argv))
    values: dict = {}
    config_file = args.pop("config", None)
    if config_file is not None:
        loaded = yaml.safe_load(Path(config_file).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{config_file}: expected a mapping of option names to values")
        unknown = sorted(set(loaded) - set(FIELDS))
        if unknown:
            raise ValueError(f"{config_file}: unknown options {unknown}")
        values.update(loaded)
    values.update(args)
    config = TrainConfig(**values)
    config.validate()
    return config


def main(argv: list[str] | None = None) -> int:
    try:
        config = parse_config(argv)
    except ValueError as error:
        print(f"gigpo-train: error: {error}", file=sys.stderr)
        return 2
    from gigpo_torchrl.train.trainer import Trainer

    Trainer(config).train()
    return 0
