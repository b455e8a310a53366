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
    "entropy_coeff": "entropy bonus: minus this times the replies' token entropy joins the loss",
    "max_turns": "episode step limit; omit for the env's own (ms-swift name)",
    "gamma": "discount of the step return (0.5, the main job's; the paper uses 0.95)",
    "norm_adv": "std or none: divide advantages by the group std or not",
    "compat": "none or verl-agent: compute advantages exactly as the authors' reference",
    "invalid_action_penalty": "subtracted from an invalid action's reward (with --compat "
    "verl-agent: from that row's own score and step return, the reference's way)",
    "anchor": "GIGPO's step groups: state (equal state hash), history:k (equal state and "
    "last k (state, action) pairs) or similar (near-duplicate observation texts)",
    "similarity_threshold": "--anchor similar: estimated Jaccard similarity of two "
    "observations' word shingles at or above which they share an anchor",
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
    "auto: bfloat16 on CUDA and on CPUs with bfloat16 instructions (AVX512-BF16, AMX), "
    "else float32",
    "gradient_checkpointing": "recompute activations in backward: less memory, ~30%% slower",
    "compile_decode": "on CUDA, decode steps through torch.compile inside their CUDA graph "
    "(small kernels fused; compiling takes about a minute at start-up)",
    "release_decoder_memory": "free what the sampler keeps between rollouts (under bfloat16 "
    "its weight copies, on CUDA also its static cache) before each update: a lower peak, for "
    "copies made and graphs captured again at every rollout",
    "num_threads": "torch intra-op threads on CPU (default: the cores not busy at start-up)",
    "num_env_workers": "Ray actors stepping the games in parallel, each a share of the "
    "batch (0: in this process; needs gigpo-torchrl[ray]); the rows are the same",
    "num_policy_replicas": "Ray actors generating replies with copies of the model, each "
    "for a lane of whole groups, weights pushed after every update (0: in this process)",
    "ray_address": "Ray cluster to join (auto, ray://host:10001, ...); default: start a "
    "local one when workers or replicas are asked for",
    "constrain_actions": "every reply is one of the admissible actions (decoding restricted "
    "to them): a choice among actions, never an invalid one",
    "train_layers": "train only the top K decoder layers (and the final norm): backward stops "
    "there; embeddings and LM head frozen",
    "frozen_layers_once": "with --train_layers, encode the frozen layers below once per update "
    "over the whole batch's token trie, each mini-batch's forward starting above them (off: "
    "every mini-batch encodes them again)",
    "val_at_start": "validate once before the first update (the baseline of the curves)",
    "val_every": "validate every K iterations (and at the end)",
    "save_every": "checkpoint every K iterations (and at the end)",
    "logger": "csv, tensorboard or wandb",
    "resume": "continue the run in output_dir/run_name from its last checkpoint (only "
    "iterations, val_every, save_every, val_at_start, device, num_threads, "
    "gradient_checkpointing, the micro-batch sizes, output_dir and run_name may differ)",
    "overwrite": "replace the run already in output_dir/run_name (its checkpoint, metrics, "
    "curves, logger files and model); without it such a folder is refused",
    "env": "registered env name, gym:<id>, or module:name (import module, e.g. my_games or "
    "path/to/games.py, then use the env it registers as name)",
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


def optional_int(text: str) -> int | None:
    """An int flag that ``none`` (or nothing) unsets; the benchmarks' ``--train-layers``
    reads it too, spelled as gigpo-train's ``--train_layers``."""
    return None if text.lower() in ("none", "") else int(text)


def _optional_str(text: str) -> str | None:
    return None if text.lower() in ("none", "") else text


def _arg_type(name: str):
    """The argparse type of a config field, from its annotation."""
    hint = typing.get_type_hints(TrainConfig)[name]
    if hint is bool:
        return _bool
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return _optional_str if str in typing.get_args(hint) else optional_int
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


NONE_WORDS = ("none", "null", "")


def _from_yaml(name: str, value, source) -> object:
    """A YAML value as the option's type, converted as the flag's text would be.

    YAML 1.1 reads ``1e-4`` as a string (it wants ``1.0e-4``) and a quoted ``"false"`` is a
    string, which Python would take as true: both are converted here; a value that does not
    convert is named.
    """
    hint = typing.get_type_hints(TrainConfig)[name]
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType)
    kind = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
    kind = dict if typing.get_origin(kind) is dict else kind
    if value is None or (optional and isinstance(value, str) and value.lower() in NONE_WORDS):
        if optional:
            return None
        raise ValueError(f"{source}: {name} needs a value")
    converters = {
        bool: (bool, _bool),
        int: (int, int),
        float: ((int, float), float),
        dict: (dict, _json_object),
        str: (str, str),
    }
    accepted, convert = converters[kind]
    if isinstance(value, accepted) and (kind is bool or not isinstance(value, bool)):
        return value
    if isinstance(value, str) or (kind is str and isinstance(value, int | float)):
        try:
            return convert(value if kind is not str else str(value))
        except (ValueError, argparse.ArgumentTypeError):
            pass
    what = {bool: "true or false", int: "an integer", float: "a number", dict: "a mapping"}
    raise ValueError(f"{source}: {name}: {value!r} is not {what.get(kind, 'a string')}")


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """The validated :class:`TrainConfig` of a command line.

    Raises:
        ValueError: naming an unknown YAML key or an invalid value.
    """
    args = vars(build_parser().parse_args(argv))
    values: dict = {}
    config_file = args.pop("config", None)
    if config_file is not None:
        try:
            loaded = yaml.safe_load(Path(config_file).read_text()) or {}
        except OSError as error:
            raise ValueError(f"--config {config_file}: {error.strerror or error}") from None
        except yaml.YAMLError as error:
            where = getattr(error, "problem_mark", None)
            line = f" (line {where.line + 1})" if where is not None else ""
            raise ValueError(f"--config {config_file}: not valid YAML{line}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{config_file}: expected a mapping of option names to values")
        unknown = sorted(set(loaded) - set(FIELDS))
        if unknown:
            raise ValueError(f"{config_file}: unknown options {unknown}")
        values.update({name: _from_yaml(name, v, config_file) for name, v in loaded.items()})
    values.update(args)
    config = TrainConfig(**values)
    config.validate()
    return config


def main(argv: list[str] | None = None) -> int:
    """Parse, check and train. A user error (a bad option, a folder that cannot be used, a
    checkpoint that cannot be read, a model that cannot be loaded) ends in one
    ``gigpo-train: error: ...`` line and exit status 2, before any model loads where the
    error can be known then."""
    try:
        config = parse_config(argv)
        config.check_run_dir()
        from gigpo_torchrl.train.trainer import Trainer

        trainer = Trainer(config)
    except ValueError as error:
        return _error(str(error))
    except OSError as error:
        return _error(f"{type(error).__name__}: {error}")
    except MemoryError:
        return _error(
            "out of memory while setting up the run: lower --num_groups, --num_generations, "
            "--val_groups or --max_new_tokens, or use a smaller --model"
        )
    trainer.train()
    return 0


def _error(message: str) -> int:
    print(f"gigpo-train: error: {message}", file=sys.stderr)
    return 2
