"""``Trainer``: collect → GIGPO advantage → GIGPOLoss (+ KL to a reference) → AdamW, repeated."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import resource
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import yaml
from tensordict import TensorDictBase
from torchrl.record.loggers import get_logger
from tqdm.auto import tqdm

from gigpo_torchrl.advantage import GIGPOAdvantage
from gigpo_torchrl.collector import GroupCollector
from gigpo_torchrl.objectives import GIGPOLoss
from gigpo_torchrl.policy import LLMPolicy, PromptBuilder, decoding, load_model
from gigpo_torchrl.policy.factory import vllm_engine, vllm_sampler
from gigpo_torchrl.train.checkpoint import (
    clear_run,
    read_checkpoint,
    rng_state,
    save_atomically,
    set_rng_state,
)
from gigpo_torchrl.train.config import TrainConfig
from gigpo_torchrl.train.curves import plot_curves

#: seconds between two progress updates inside an iteration
PROGRESS_INTERVAL = 1.0

# Scalars logged per iteration, in this order (validation adds val_success_rate/val_mean_return).
METRICS = (
    "env_steps",
    "success_rate",
    "mean_return",
    "mean_episode_length",
    "invalid_action_rate",
    "env_errors",
    "singleton_fraction",
    "step_group_size_mean",
    "loss",
    "kl_to_ref",
    "kl_to_behaviour",
    "clip_fraction",
    "entropy",
    "grad_norm",
    "optimizer_steps_skipped",
    "tokens_generated",
    "padding_fraction",
    "train_tokens_per_s",
    "peak_memory_mb",
    "peak_memory_rollout_mb",
    "decode_held_mb",
    "time_rollout",
    "time_advantage",
    "time_update",
)


def default_num_threads() -> int:
    """Torch threads for a CPU run: the cores not already busy (1-minute load average) at
    start-up, at least 1. Measured on 2 cores: with one core busy elsewhere an iteration
    took 564 s with 2 threads and 204 s with 1; on a quiet machine 2 threads were fastest."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cores, round(cores - os.getloadavg()[0])))


def train_top_layers(model: torch.nn.Module, count: int) -> list[int]:
    """Freeze everything but the top ``count`` decoder layers (all of them when the model
    has fewer) and the final norm; return the indices of the trained layers.

    Backward then stops at the lowest trained layer: on a CPU most of an update's time.
    """
    decoder = model.get_decoder()
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no decoder layers to choose from")
    top = list(range(max(0, len(layers) - count), len(layers)))
    model.requires_grad_(False)
    for layer in layers[top[0] :]:
        layer.requires_grad_(True)
    norm = getattr(decoder, "norm", None)
    if norm is not None:
        norm.requires_grad_(True)
    return top


def top_linear_modules(model: torch.nn.Module, layers: list[int]) -> list[str]:
    """Names of the linear modules inside the given decoder layers: with ``--lora
    --train_layers K`` the adapters go there only, so that backward stops at layer K."""
    decoder = model.get_decoder()
    inside = tuple(decoder.layers[i] for i in layers)
    names = {id(m): n for n, m in model.named_modules()}
    return [
        names[id(m)] for layer in inside for m in layer.modules() if isinstance(m, torch.nn.Linear)
    ]


class Trainer:
    """Trains ``config.model`` on ``config.env`` with GIGPO (or GRPO/RLOO).

    One iteration: the collector plays ``num_groups`` tasks × ``num_generations``
    trajectories; ``GIGPOAdvantage`` scores every step; :class:`GIGPOLoss` (clipped ratio
    over each step's own reply tokens, aggregated with ``loss_agg_mode``, plus ``beta`` × KL
    to a frozen copy of the initial model when ``beta > 0``, minus ``entropy_coeff`` × the
    replies' entropy) is minimised with AdamW over ``ppo_epochs`` passes of
    ``mini_batch_size`` rows, accumulating gradients over micro-batches of
    ``max_tokens_per_micro_batch`` padded tokens (or ``micro_batch_size`` rows) without
    changing the mini-batch's loss. Everything runs on ``device``; with
    ``dtype="bfloat16"`` generation, scoring and the update run under bfloat16 autocast
    while weights and optimizer state stay float32.

    Everything goes to ``output_dir/run_name/``: ``config.yaml``, ``metrics.jsonl`` (one
    record per iteration and validation), torchrl logger scalars (CSV by default),
    ``curves.png`` (rewritten at each validation), ``checkpoint.pt`` (model, optimizer, RNG
    and task-sampler state: ``resume=True`` continues exactly where it stopped) and, at the
    end, ``model/`` (``save_pretrained``: the trained model and tokenizer, or LoRA adapter).

    A folder that already holds a run is refused unless ``overwrite=True`` (which removes
    that run's files once the model and environments are ready, so a failing start leaves
    the old run intact) or ``resume=True`` (refused when options outside
    :data:`~gigpo_torchrl.train.config.RESUMABLE` differ from the checkpoint's). Checkpoints
    are loaded with ``weights_only=True``: they cannot run code.
    """

    def __init__(self, config: TrainConfig):
        config.validate()
        config.check_run_dir()  # nothing is written or deleted before this passes
        self.config = config
        self.run_dir = Path(config.output_dir).expanduser() / config.run_name
        self.checkpoint_path = self.run_dir / "checkpoint.pt"
        self._bar = None  # the progress bar while train() runs
        self._last_progress = 0.0
        self._phase = "rollout"
        self._seed_everything(config.seed)
        torch.set_num_threads(config.num_threads or default_num_threads())
        self.device = torch.device(config.resolve_device())
        self.dtype = config.resolve_dtype()

        model, tokenizer = load_model(config.model, seed=config.seed)
        model.to(self.device)
        self.reference = None
        if config.beta > 0:
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        top = None if config.train_layers is None else train_top_layers(model, config.train_layers)
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        if config.lora:
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(
                r=config.lora_rank,
                lora_alpha=2 * config.lora_rank,
                target_modules="all-linear" if top is None else top_linear_modules(model, top),
                task_type="CAUSAL_LM",
            )
            model = get_peft_model(model, lora)
        self.model, self.tokenizer = model, tokenizer
        sampling = dict(
            max_new_tokens=config.max_new_tokens,
            forbid_special=config.model == "tiny",
            constrain_actions=config.constrain_actions,
            compile_decode=config.compile_decode,
        )
        self.policy = LLMPolicy(
            model, tokenizer, temperature=config.temperature, top_p=config.top_p, **sampling
        )
        self.val_policy = LLMPolicy(
            model, tokenizer, temperature=config.val_temperature, **sampling
        )
        if config.backend == "vllm":
            # one vLLM engine generates for both; the transformers model trains and scores
            llm = vllm_engine(config.model)
            for policy in (self.policy, self.val_policy):
                policy.sampler = vllm_sampler(llm, tokenizer, policy.generate_kwargs)
        prompts = PromptBuilder(memory=config.memory)
        env_kwargs = {**config.env_kwargs, "invalid_action_penalty": config.invalid_action_penalty}
        workers = self._ray_workers(config)
        self.collector = GroupCollector(
            config.env,
            self.policy,
            num_groups=config.num_groups,
            num_generations=config.num_generations,
            max_steps=config.max_turns,
            seed=config.seed,
            prompt_builder=prompts,
            env_kwargs=env_kwargs,
            **workers,
        )
        # A fixed held-out task set (tasks = initial states), the same at every validation;
        # training never draws one (unless the env has too few tasks: val_tasks_held_out).
        self.val_collector = GroupCollector(
            config.env,
            self.val_policy,
            num_groups=config.val_groups,
            num_generations=1,
            max_steps=config.max_turns,
            seed=config.seed,
            prompt_builder=prompts,
            env_kwargs=env_kwargs,
            held_out=True,
            # validation generates here; its games step in env workers too
            num_env_workers=min(config.num_env_workers, config.val_groups),
        )
        self.collector.exclude_tasks(self.val_collector.held_out_tasks)
        self._val_sampler = self.val_collector.state_dict()
        self.loss = GIGPOLoss(
            model,
            clip_epsilon=config.clip_epsilon,
            beta=config.beta,
            entropy_coeff=config.entropy_coeff,
            loss_agg_mode=config.loss_agg_mode,
            max_tokens_per_micro_batch=config.max_tokens_per_micro_batch,
            micro_batch_size=config.micro_batch_size,
        )
        estimator = GIGPOAdvantage(
            config.advantage_estimator,
            gamma=config.gamma,
            step_advantage_weight=config.gigpo_step_advantage_weight,
            norm=config.norm_adv,
            compat=config.compat,
            invalid_action_penalty=config.invalid_action_penalty if config.compat else 0.0,
            anchor=config.anchor,
            similarity_threshold=config.similarity_threshold,
        )
        if config.compat == "verl-agent":
            # the reference applies the penalty itself, to the game's reward without it
            estimator.set_keys(reward="env_reward")
        self.loss.make_value_estimator(estimator)
        self.optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=config.learning_rate,
            weight_decay=config.weight_decay,
        )
        self._resume_state = (
            read_checkpoint(self.checkpoint_path, mmap=False) if config.resume else None
        )
        # Everything that can fail on the user's options has run: now the folder is written.
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if config.overwrite:
            clear_run(self.run_dir)
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))
        self.logger = get_logger(
            config.logger,
            logger_name=str(self.run_dir.parent),
            experiment_name=config.run_name,
            # the CSV files are rewritten from the checkpoint's history instead (load_checkpoint)
            state_dict=(
                self._resume_state["logger"]
                if self._resume_state and config.logger != "csv"
                else None
            ),
        )
        for unused in ("texts", "videos"):  # torchrl's CSV logger makes them; we log neither
            with contextlib.suppress(OSError):
                (self.run_dir / unused).rmdir()  # only when empty
        self.iteration = 0
        self.env_steps = 0
        self.history: list[dict] = []
        self.last_batch: TensorDictBase | None = None
        self.last_val_batch: TensorDictBase | None = None  # the last validation's step rows

    def _ray_workers(self, config: TrainConfig) -> dict:
        """The training collector's Ray options: env workers, generation replicas (each
        given an equal share of the cluster's GPUs, at most one, when training on CUDA)."""
        if not (config.num_env_workers or config.num_policy_replicas):
            return {}
        from gigpo_torchrl.collector.ray_workers import init_ray

        ray = init_ray(config.ray_address)
        options = {}
        gpus = ray.cluster_resources().get("GPU", 0) if self.device.type == "cuda" else 0
        if config.num_policy_replicas and gpus:
            options = {"num_gpus": min(1.0, gpus / config.num_policy_replicas)}
        return dict(
            num_env_workers=config.num_env_workers,
            num_policy_replicas=config.num_policy_replicas,
            ray_address=config.ray_address,
            replica_options=options,
            replica_dtype=self.dtype,
        )

    # -- the loop ------------------------------------------------------------------------

    def train(self) -> list[dict]:
        """Run the remaining iterations; returns the metric records."""
        config = self.config
        if config.resume:
            self.load_checkpoint()
        bar = tqdm(
            range(self.iteration, config.iterations),
            desc="gigpo-train",
            initial=self.iteration,
            total=config.iterations,
        )
        self._bar = bar
        self.collector.on_step = self.val_collector.on_step = self._show_rollout
        if self.iteration == 0 and config.val_at_start:
            self._validate_and_plot(bar)
        for _ in bar:
            record = self.train_iteration()
            last = self.iteration == config.iterations
            if self.iteration % config.val_every == 0 or last:
                self._validate_and_plot(bar)
            if self.iteration % config.save_every == 0 or last:
                self._progress("saving checkpoint", force=True)
                self.save_checkpoint()
            bar.set_postfix(
                success=f"{record['success_rate']:.2f}",
                ret=f"{record['mean_return']:.2f}",
                loss=f"{record['loss']:.3f}",
            )
        self._warn_if_no_anchor_repeated()
        self.model.save_pretrained(self.run_dir / "model")
        self.tokenizer.save_pretrained(self.run_dir / "model")
        self.collector.shutdown()
        self.val_collector.shutdown()
        self._bar = None
        return self.history

    # -- progress inside an iteration ----------------------------------------------------

    def _progress(self, text: str, force: bool = False) -> None:
        """Show ``text`` after the bar (at most once per :data:`PROGRESS_INTERVAL`)."""
        now = time.monotonic()
        if self._bar is None or (not force and now - self._last_progress < PROGRESS_INTERVAL):
            return
        self._last_progress = now
        self._bar.set_postfix_str(text, refresh=True)

    def _show_rollout(self, rows: int, active: int) -> None:
        self._progress(f"{self._phase}: {rows} env steps, {active} playing")

    def train_iteration(self) -> dict:
        """Collect one batch, compute advantages, update the model; returns the record."""
        config = self.config
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        self._phase = "rollout"
        self._progress("rollout", force=True)
        with self._autocast():
            batch = self.collector.collect()
        stats = dict(self.collector.stats)
        rollout_done = time.perf_counter()
        rollout_peak = self._peak_memory_mb()
        if config.release_decoder_memory:
            decoding.release(self.policy.model)
        if self.reference is not None:
            self._progress("reference log-probs", force=True)
            with self._autocast():
                self.loss.reference_log_probs(self.reference, batch)
        with warnings.catch_warnings():
            # the trainer reports inactive step credit itself, with the singleton fraction
            warnings.filterwarnings("ignore", message=".*no anchor state repeats")
            batch = self.loss.value_estimator(batch)
        advantage_done = time.perf_counter()
        group_sizes = batch.get("step_group_size", None)
        if group_sizes is not None:  # the step groups of --anchor, not the exact state hashes
            row_sizes = group_sizes.reshape(-1).long()
            stats["step_group_size_histogram"] = torch.bincount(row_sizes).tolist()
            stats["singleton_fraction"] = float((row_sizes == 1).float().mean())
        update = self._update(batch)
        self.iteration += 1
        self.env_steps += stats["steps"]
        self.last_batch = batch
        if (
            self.iteration == 1
            and config.advantage_estimator == "gigpo"
            and stats["singleton_fraction"] == 1.0
        ):
            tqdm.write(
                "warning: no environment state repeated within any group in the first batch "
                "(singleton fraction 1.00): GIGPO's step-level credit is inactive and it "
                "equals GRPO until states recur"
            )
        sizes = torch.tensor(stats["step_group_size_histogram"], dtype=torch.float)
        record = {
            "iteration": self.iteration,
            "env_steps": self.env_steps,
            "anchor": config.anchor,
            **{
                k: stats[k]
                for k in (
                    "success_rate",
                    "mean_return",
                    "mean_episode_length",
                    "invalid_action_rate",
                    "env_errors",
                    "singleton_fraction",
                    "tokens_generated",
                )
            },
            "step_group_size_mean": float((sizes * torch.arange(len(sizes))).sum() / sizes.sum()),
            "step_group_size_histogram": stats["step_group_size_histogram"],
            **update,
            "peak_memory_mb": self._peak_memory_mb(),
            "peak_memory_rollout_mb": rollout_peak,
            # what the sampler keeps through the update (weight copies, a GPU's static cache)
            "decode_held_mb": decoding.held_bytes(self.policy.model) / 2**20,
            "time_rollout": rollout_done - start,
            "time_advantage": advantage_done - rollout_done,
            "time_update": time.perf_counter() - advantage_done,
        }
        self._log(record)
        return record

    def _update(self, batch: TensorDictBase) -> dict:
        """PPO epochs of clipped-ratio steps; returns the loss, KLs, clip fraction, entropy,
        grad norm, padding fraction and training throughput, averaged over the update."""
        config, model = self.config, self.model
        model.train()
        start = time.perf_counter()
        sums: dict[str, float] = {}
        optimizer_steps = skipped = 0
        rows = batch.shape[0]
        # progress: each micro-batch's forward calls the LM head once (packed scoring)
        shown = {"done": 0, "total": 0, "epoch": ""}

        def count_micro_batch(*_):
            shown["done"] += 1
            self._progress(f"update: micro-batch {shown['done']}/{shown['total']}{shown['epoch']}")

        head = model.get_output_embeddings() if self._bar is not None else None
        hook = head.register_forward_hook(count_micro_batch) if head is not None else None
        frozen = None
        if config.frozen_layers_once:
            self._progress("update: encoding the frozen layers once", force=True)
            with self._autocast():
                frozen = self.loss.frozen_states(batch)
        for epoch in range(config.ppo_epochs):
            order = torch.randperm(rows)
            minis = [batch[mini] for mini in order.split(config.mini_batch_size)]
            plans = [self.loss.micro_batches(mini) for mini in minis]
            shown.update(done=0, total=sum(map(len, plans)))
            if config.ppo_epochs > 1:
                shown["epoch"] = f", epoch {epoch + 1}/{config.ppo_epochs}"
            self._progress(f"update: {shown['total']} micro-batches{shown['epoch']}", force=True)
            for mini, plan in zip(minis, plans, strict=True):
                self.optimizer.zero_grad()
                with self._autocast():
                    out = self.loss.backward(mini, micro_batches=plan, frozen=frozen)
                norm = torch.nn.utils.clip_grad_norm_(
                    [p for p in model.parameters() if p.requires_grad], config.max_grad_norm
                )
                if float(norm) == 0:
                    # all advantages 0, no KL or entropy term: no signal. AdamW would still move the
                    # weights along its momentum (and decay them): skip the step instead.
                    skipped += 1
                else:
                    self.optimizer.step()
                optimizer_steps += 1
                out["loss"] = out["loss_objective"] + out["loss_kl_to_ref"] + out["loss_entropy"]
                out["grad_norm"] = norm
                for key, value in out.items():
                    sums[key] = sums.get(key, 0.0) + float(value)
        if hook is not None:
            hook.remove()
        model.eval()
        self.policy.sync_sampler_weights()
        self.collector.update_policy_weights_()  # to the generation replicas, if any
        seconds = time.perf_counter() - start
        row_tokens = sum(t.numel() for t in batch.get(("tokens", "full"), as_list=True))
        means = {
            key: sums[key] / optimizer_steps
            for key in ("loss", "kl_to_ref", "kl_to_behaviour", "clip_fraction", "entropy")
        }
        means["grad_norm"] = sums["grad_norm"] / optimizer_steps
        means["optimizer_steps_skipped"] = skipped
        means["padding_fraction"] = 1 - sums["real_tokens"] / sums["tokens"]
        # the rows' own tokens per second, however they were packed
        means["train_tokens_per_s"] = row_tokens * config.ppo_epochs / seconds
        return means

    def _autocast(self):
        """bfloat16 autocast on ``device`` when ``dtype="bfloat16"``, else nothing."""
        return torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.dtype == "bfloat16"
        )

    def _peak_memory_mb(self) -> float:
        """Peak memory of this iteration on CUDA; on CPU the process's peak RSS so far."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10

    def _validate_and_plot(self, bar) -> None:
        val = self.validate()
        bar.write(
            f"iteration {self.iteration}: validation success "
            f"{val['val_success_rate']:.2f}, return {val['val_mean_return']:.2f}"
        )
        plot_curves(self.history, self.run_dir / "curves.png")

    @torch.no_grad()
    def validate(self) -> dict:
        """Success rate and mean return on the held-out tasks at ``val_temperature``.

        Validation draws from random generators of its own, seeded alike every time, and
        leaves the training's as they were: how often it runs changes no training number,
        and every validation samples its replies from the same random stream (differences
        between two of them come from the weights alone)."""
        self._phase = "validation"
        self._progress("validation", force=True)
        self.val_collector.load_state_dict(self._val_sampler)
        training_rng = rng_state()
        try:
            self._seed_everything(self.config.seed)
            with self._autocast():  # the policy as training samples it
                self.last_val_batch = self.val_collector.collect()
        finally:
            set_rng_state(training_rng)
        stats = self.val_collector.stats
        record = {
            "iteration": self.iteration,
            "env_steps": self.env_steps,
            "val_success_rate": stats["success_rate"],
            "val_mean_return": stats["mean_return"],
            "val_tasks_held_out": stats["tasks_held_out"],
        }
        self._log(record)
        return record

    # -- logging and checkpoints ---------------------------------------------------------

    def _log(self, record: dict) -> None:
        self.history.append(record)
        with open(self.run_dir / "metrics.jsonl", "a") as out:
            out.write(json.dumps(record) + "\n")
        self._log_scalars(record)

    def _log_scalars(self, record: dict) -> None:
        for key, value in record.items():
            if (
                isinstance(value, int | float)
                and key not in ("iteration",)
                and math.isfinite(value)
            ):
                self.logger.log_scalar(key, value, step=record["iteration"])

    def _warn_if_no_anchor_repeated(self) -> None:
        fractions = [r["singleton_fraction"] for r in self.history if "singleton_fraction" in r]
        if self.config.advantage_estimator == "gigpo" and fractions and min(fractions) == 1.0:
            tqdm.write(
                f"warning: across {len(fractions)} iterations no state ever repeated within a "
                "group (singleton fraction 1.00): step-level credit was inactive and this "
                "run was GRPO. Check the environment's state hashing."
            )

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)  # numpy's legacy seeding takes 32 bits
        torch.manual_seed(seed)

    def save_checkpoint(self) -> None:
        """Write ``checkpoint.pt`` atomically (a killed save leaves the previous one)."""
        state = {
            "iteration": self.iteration,
            "env_steps": self.env_steps,
            "model": self.model.state_dict(),
            "logger": self.logger.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "collector": self.collector.state_dict(),
            "history": self.history,
            "rng": rng_state(),
            "config": self.config.to_dict(),
            "dtype": self.dtype,
        }
        save_atomically(state, self.checkpoint_path)

    def load_checkpoint(self) -> None:
        """Restore everything ``save_checkpoint`` wrote."""
        state = self._resume_state
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.collector.load_state_dict(state["collector"])
        self.iteration = state["iteration"]
        self.env_steps = state["env_steps"]
        self.history = state["history"]
        set_rng_state(state["rng"])
        if self.collector.replicas is not None:
            self.collector.update_policy_weights_(self.model.state_dict())
        # records written after the checkpoint by the interrupted run are dropped, from
        # metrics.jsonl and from the CSV logger's files alike
        with open(self.run_dir / "metrics.jsonl", "w") as out:
            out.writelines(json.dumps(record) + "\n" for record in self.history)
        if self.config.logger == "csv":
            self._rewrite_csv_scalars()
        tqdm.write(f"resumed {self.run_dir} at iteration {self.iteration}")

    def _rewrite_csv_scalars(self) -> None:
        """Rewrite ``scalars/*.csv`` to hold exactly the checkpoint's history."""
        experiment = self.logger.experiment
        for handle in experiment.files.values():
            handle.close()
        experiment.files.clear()
        experiment.scalars.clear()
        shutil.rmtree(self.run_dir / "scalars", ignore_errors=True)
        for record in self.history:
            self._log_scalars(record)
