"""``TrainConfig``: every training option, with ms-swift's names where ms-swift has one."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import tempfile
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gigpo_torchrl.functional.anchors import parse_anchor
from gigpo_torchrl.objectives import LOSS_AGG_MODES

ESTIMATORS = ("grpo", "rloo", "gigpo")
NORMS = ("std", "none")
COMPATS = (None, "verl-agent")
LOGGERS = ("csv", "tensorboard", "wandb")
DTYPES = ("auto", "float32", "bfloat16")
BACKENDS = ("transformers", "vllm")
#: the package each logger needs, and how to install it
LOGGER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
#: temperatures in (0, MIN_TEMPERATURE) are refused: they sample what greedy decoding (0)
#: picks, and the smallest divide the logits into inf/NaN probabilities (a crash mid-run)
MIN_TEMPERATURE = 0.01
#: environments stepped (and prompts generated) together: num_groups × num_generations
MAX_PARALLEL_ENVS = 65_536
#: replies longer than this many tokens are refused (no chat model's context holds them)
MAX_NEW_TOKENS = 65_536
#: options a ``--resume`` may change: how long the run goes on, how often it validates and
#: saves, and how (where, on what, with how many threads or tokens per forward) it computes.
#: Any other difference would continue the run under other rules, and is refused.
RESUMABLE = frozenset(
    {
        "iterations",
        "val_every",
        "save_every",
        "val_at_start",
        "device",
        "num_threads",
        "num_env_workers",  # the same rows, stepped elsewhere
        "num_policy_replicas",  # the same rules; sampled replies follow the replicas' RNGs
        "ray_address",
        "gradient_checkpointing",
        "frozen_layers_once",  # the same numbers up to float rounding
        "compile_decode",
        "release_decoder_memory",
        "max_tokens_per_micro_batch",
        "micro_batch_size",
        "output_dir",
        "run_name",  # the folder may be moved or renamed
        "resume",
        "overwrite",
    }
)


@dataclass
class TrainConfig:
    """Options of a training run.

    The defaults are the README's main job, sized for a 2-core CPU (about 6 minutes with 2
    threads under bfloat16 autocast, which ``dtype="auto"`` picks on a CPU with bfloat16
    instructions): SmolLM2-135M-Instruct on ``lake-walk`` (3×3 hole-free FrozenLake
    walks whose start and goal squares vary per task, each move rewarded by the distance it
    gains), 4 tasks × 4 attempts per iteration for 40 iterations, each reply one of the four
    moves (``constrain_actions``), a short discount (``gamma=0.5``: a step's return is
    mostly its own move's reward), mini-batches of 32 rows, only the top 4 decoder layers
    trained, no prompt memory (the lake is fully visible), no reference model. For real runs raise
    ``num_groups``, ``num_generations`` (the paper uses 8), ``iterations``, ``memory`` and,
    for long episodes with a reward at the end, ``gamma`` (the paper uses 0.95).

    ms-swift names: ``advantage_estimator``, ``use_gym_env``, ``gigpo_step_advantage_weight``,
    ``num_generations``, ``beta`` (KL coefficient to the reference model; 0 skips the
    reference model), ``max_turns`` (episode step limit; None: the env's own).

    ``invalid_action_penalty`` is what the env subtracts from the reward of an invalid
    action. ``compat="verl-agent"`` computes advantages as the authors' reference does
    (``GIGPOAdvantage(compat="verl-agent")``), the penalty included: it is applied to each
    invalid row's own score and step return after the returns are computed from the game's
    reward (``("next", "env_reward")``), instead of being part of the reward.

    ``anchor`` chooses GIGPO's step groups (``GIGPOAdvantage(anchor=...)``): ``state`` (equal
    state hash), ``history:k`` (equal state and last k (state, action) pairs) or ``similar``
    (near-duplicate observation texts, estimated Jaccard >= ``similarity_threshold``).
    """

    # -- algorithm (ms-swift names) --
    advantage_estimator: str = "gigpo"
    use_gym_env: bool = True
    gigpo_step_advantage_weight: float = 1.0
    num_generations: int = 4
    beta: float = 0.0
    entropy_coeff: float = 0.0
    max_turns: int | None = 6
    gamma: float = 0.5
    norm_adv: str = "std"
    compat: str | None = None
    invalid_action_penalty: float = 0.1
    anchor: str = "state"
    similarity_threshold: float = 0.8
    # -- environment and model --
    env: str = "lake-walk"
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    model: str = "smollm2-135m"
    backend: str = "transformers"
    memory: int = 0
    # -- rollouts --
    num_groups: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 4
    constrain_actions: bool = True
    # -- optimisation --
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    iterations: int = 40
    ppo_epochs: int = 1
    mini_batch_size: int = 32
    loss_agg_mode: str = "token_mean"
    max_tokens_per_micro_batch: int | None = 4096
    micro_batch_size: int | None = None
    clip_epsilon: float = 0.2
    max_grad_norm: float = 1.0
    lora: bool = False
    lora_rank: int = 8
    train_layers: int | None = 4
    frozen_layers_once: bool = True
    # -- engine --
    device: str = "auto"
    dtype: str = "auto"
    gradient_checkpointing: bool = False
    compile_decode: bool = False
    release_decoder_memory: bool = False
    num_threads: int | None = None
    num_env_workers: int = 0
    num_policy_replicas: int = 0
    ray_address: str | None = None
    # -- validation, logging, checkpoints --
    val_every: int = 8
    val_at_start: bool = True
    val_groups: int = 32
    val_temperature: float = 0.4
    save_every: int = 4
    logger: str = "csv"
    output_dir: str = "runs"
    run_name: str = "gigpo-smollm2-frozenlake"
    seed: int = 0
    resume: bool = False
    overwrite: bool = False

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad option (checked before any model loads)."""
        from gigpo_torchrl.envs import list_envs
        from gigpo_torchrl.envs.registry import env_spec, split_env_name

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

        self._check_types()
        choice("advantage_estimator", ESTIMATORS)
        choice("norm_adv", NORMS)
        choice("compat", COMPATS)
        number("invalid_action_penalty", 0)
        try:
            parse_anchor(self.anchor)
        except ValueError:
            raise ValueError(
                f"--anchor {self.anchor!r} must be state, history:k (k >= 1, e.g. history:2) "
                "or similar"
            ) from None
        number("similarity_threshold", 0, strict=True)
        if self.similarity_threshold > 1:
            raise ValueError(f"--similarity_threshold {self.similarity_threshold!r} must be <= 1")
        if self.compat == "verl-agent" and self.advantage_estimator == "rloo":
            raise ValueError(
                "--compat verl-agent reproduces the reference's gigpo and grpo estimators; "
                "--advantage_estimator rloo has no verl-agent counterpart"
            )
        choice("logger", LOGGERS)
        package = LOGGER_PACKAGES.get(self.logger)
        if package and importlib.util.find_spec(package) is None:
            raise ValueError(
                f"--logger {self.logger} needs the {package} package, which is not installed: "
                f"pip install {package} (or use --logger csv)"
            )
        choice("backend", BACKENDS)
        number("gigpo_step_advantage_weight", 0)
        if self.advantage_estimator == "gigpo" and (not self.use_gym_env or not self.env):
            raise ValueError(
                "--advantage_estimator gigpo needs an environment (--use_gym_env true and "
                "--env NAME): its step-level advantage groups steps by environment state"
            )
        if split_env_name(self.env)[0] is not None:
            try:
                env_spec(self.env)
            except ValueError as error:
                raise ValueError(f"--env {self.env}: {error}") from None
        elif not self.env.startswith("gym:") and self.env not in list_envs():
            raise ValueError(
                f"--env {self.env!r} is not a registered environment; known: "
                f"{', '.join(list_envs())} (or gym:<gymnasium id>, or module:name to import "
                "a module that registers it)"
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
        for name, value in (
            ("num_groups × num_generations", self.num_groups * self.num_generations),
            ("val_groups", self.val_groups),
        ):
            if value > MAX_PARALLEL_ENVS:
                raise ValueError(
                    f"--{name} = {value} environments stepped together: at most "
                    f"{MAX_PARALLEL_ENVS} (each step sends all of them to the model at once)"
                )
        if self.max_new_tokens > MAX_NEW_TOKENS:
            raise ValueError(f"--max_new_tokens {self.max_new_tokens} is above {MAX_NEW_TOKENS}")
        number("max_turns", 1, integer=True, allow_none=True)
        number("micro_batch_size", 1, integer=True, allow_none=True)
        number("max_tokens_per_micro_batch", 1, integer=True, allow_none=True)
        number("num_threads", 1, integer=True, allow_none=True)
        self._check_ray()
        number("train_layers", 1, integer=True, allow_none=True)
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
        if self.seed >= 2**63:
            raise ValueError(f"--seed {self.seed} must be below 2**63")
        number("beta", 0)
        number("entropy_coeff", 0)
        number("learning_rate", 0, strict=True)
        number("weight_decay", 0)
        number("clip_epsilon", 0, strict=True)
        number("max_grad_norm", 0, strict=True)
        for name in ("temperature", "val_temperature"):
            number(name, 0)
            if 0 < getattr(self, name) < MIN_TEMPERATURE:
                raise ValueError(
                    f"--{name} {getattr(self, name)!r} is below {MIN_TEMPERATURE}: that samples "
                    "as greedy decoding does, or overflows; use 0 for greedy decoding"
                )
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
        if (
            not self.run_name
            or self.run_name in (".", "..")
            or any(sep in self.run_name for sep in ("/", "\\", "\0", os.sep))
        ):
            raise ValueError(
                f"--run_name {self.run_name!r} must be a plain folder name (inside --output_dir)"
            )
        self._check_env()

    def _check_ray(self) -> None:
        """Env workers and generation replicas: Ray installed, shares that divide evenly."""
        for name in ("num_env_workers", "num_policy_replicas"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"--{name} {value!r} must be an integer >= 0")
        workers, replicas = self.num_env_workers, self.num_policy_replicas
        if not (workers or replicas or self.ray_address):
            return
        if importlib.util.find_spec("ray") is None:
            raise ValueError(
                "--num_env_workers, --num_policy_replicas and --ray_address need Ray: "
                "pip install 'gigpo-torchrl[ray]'"
            )
        envs = self.num_groups * self.num_generations
        if workers > envs:
            raise ValueError(
                f"--num_env_workers {workers}: more workers than the {envs} environments "
                "(num_groups × num_generations)"
            )
        if replicas:
            if self.backend == "vllm":
                raise ValueError(
                    "--num_policy_replicas copies the transformers model into Ray actors; "
                    "with --backend vllm generation already runs in vLLM's engine"
                )
            if replicas > self.num_groups:
                raise ValueError(
                    f"--num_policy_replicas {replicas}: each replica serves whole groups, "
                    f"and --num_groups is {self.num_groups}"
                )
            if workers % replicas:
                raise ValueError(
                    f"--num_env_workers {workers} must be a multiple of --num_policy_replicas "
                    f"{replicas} (each replica's lane has its own env workers)"
                )

    def _check_types(self) -> None:
        """Flags arrive typed; Python and YAML callers may pass strings for booleans etc."""
        hints = typing.get_type_hints(TrainConfig)
        for name, hint in hints.items():
            value = getattr(self, name)
            if hint is bool and not isinstance(value, bool):
                raise ValueError(f"--{name} {value!r} must be true or false")
            if hint is str and not isinstance(value, str):
                if name == "output_dir" and isinstance(value, os.PathLike):
                    continue
                raise ValueError(f"--{name} {value!r} must be a string")

    def _check_env(self) -> None:
        """Build one environment: a bad ``gym:`` id or an ``env_kwargs`` key the game does
        not take is named here, before any model loads."""
        from gigpo_torchrl.envs import make_env

        try:
            env = make_env(
                self.env,
                batch_size=1,
                max_steps=self.max_turns,
                invalid_action_penalty=self.invalid_action_penalty,
                **self.env_kwargs,
            )
        except TypeError as error:
            raise ValueError(
                f"--env {self.env} with --env_kwargs {json.dumps(self.env_kwargs)}: {error}"
            ) from None
        except ValueError as error:
            message = str(error)
            raise ValueError(
                message if message.startswith(self.env) else f"--env {self.env}: {message}"
            ) from None
        env.close(raise_if_closed=False)

    @property
    def run_dir(self) -> Path:
        """``output_dir/run_name``: where the run writes everything."""
        return Path(self.output_dir) / self.run_name

    def check_run_dir(self) -> dict | None:
        """Check the run folder before anything is written or loaded.

        - ``output_dir`` must be a folder this user can write (or be creatable);
        - without ``resume``, a folder that holds a run is refused unless ``overwrite``
          (which removes that run's files, and only those, when the trainer starts);
        - with ``resume``, the checkpoint must load safely and every option outside
          :data:`RESUMABLE` must equal the checkpoint's.

        Returns:
            The loaded (memory-mapped) checkpoint when resuming, else ``None``.

        Raises:
            ValueError: one line naming the problem.
        """
        from gigpo_torchrl.train.checkpoint import read_checkpoint, run_files

        output = Path(self.output_dir).expanduser()
        existing = output
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise ValueError(f"--output_dir {self.output_dir}: {existing} is not a folder")
        if not _writable(existing):
            what = "" if existing == output else f" (its nearest existing parent {existing})"
            raise ValueError(f"--output_dir {self.output_dir}{what} is not writable")
        run_dir = output / self.run_name
        if run_dir.exists() and not run_dir.is_dir():
            raise ValueError(f"{run_dir} exists and is not a folder")
        if run_dir.is_dir() and not _writable(run_dir):
            raise ValueError(f"{run_dir} is not writable")
        checkpoint = run_dir / "checkpoint.pt"
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other: choose one")
        if not self.resume:
            found = run_files(run_dir)
            if found and not self.overwrite:
                hint = "--resume to continue it, " if checkpoint.exists() else ""
                raise ValueError(
                    f"{run_dir} holds a run ({', '.join(found)}): pass {hint}--overwrite to "
                    "replace it, or choose another --run_name"
                )
            return None
        if not checkpoint.exists():
            raise ValueError(f"--resume: there is no checkpoint at {checkpoint}")
        state = read_checkpoint(checkpoint)
        differing = self.resume_differences(state.get("config"))
        if state.get("dtype") not in (None, self.resolve_dtype()):
            # --device may change, but not what precision --dtype auto resolves to
            differing.append(f"resolved dtype: {state['dtype']!r} -> {self.resolve_dtype()!r}")
        if differing:
            raise ValueError(
                f"--resume with options that differ from the checkpoint's: {'; '.join(differing)}"
                f" (only {', '.join(sorted(RESUMABLE - {'resume', 'overwrite'}))} may change)"
            )
        return state

    def resume_differences(self, saved: dict | None) -> list[str]:
        """``name: saved -> now`` for each option outside :data:`RESUMABLE` that differs
        from ``saved`` (a checkpoint's ``config``; options it lacks count as their default)."""
        if saved is None:
            return []
        now = self.to_dict()
        out = []
        for name, spec in FIELDS.items():
            if name in RESUMABLE:
                continue
            default = spec.default_factory() if callable(spec.default_factory) else spec.default
            before = saved.get(name, default)
            if before != now[name]:
                out.append(f"{name}: {before!r} -> {now[name]!r}")
        return out

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
        """``--dtype`` with ``auto`` resolved by :func:`auto_dtype` for the run's device."""
        if self.dtype != "auto":
            return self.dtype
        return auto_dtype(self.resolve_device())

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["output_dir"] = os.fspath(self.output_dir)
        return out


def auto_dtype(device: str) -> str:
    """What ``--dtype auto`` means on ``device`` (``cpu``, ``cuda``, ``cuda:N``): bfloat16
    autocast on CUDA and on a CPU with bfloat16 matrix instructions (AVX512-BF16 or AMX),
    where the sampler runs 2.0-2.4 times as fast as in float32 (``bench_rollout.py``); float32
    on other CPUs (where bfloat16 has no matrix instructions to run on)."""
    import torch

    if device.startswith("cuda"):
        return "bfloat16"
    native = (
        getattr(torch.cpu, name, lambda: False)()
        for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )
    return "bfloat16" if any(native) else "float32"


def _writable(folder: Path) -> bool:
    """Whether a file can be created in ``folder`` (tried: permission bits do not tell for
    root, read-only mounts or virtual file systems)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
