"""The trainer and gigpo-train: end to end with the tiny model, resume, CLI validation."""

import dataclasses
import importlib.util
import json

import pytest
import torch
import yaml

from gigpo_torchrl.policy import decoding
from gigpo_torchrl.policy.frozen_layers import frozen_depth
from gigpo_torchrl.train import TrainConfig, Trainer
from gigpo_torchrl.train.cli import FIELDS, build_parser, main, parse_config
from gigpo_torchrl.train.config import auto_dtype


def tiny_config(tmp_path, **overrides) -> TrainConfig:
    options = dict(
        model="tiny",
        env="sokoban",
        iterations=2,
        num_groups=2,
        num_generations=2,
        max_turns=3,
        val_every=1,
        save_every=1,
        val_groups=2,
        max_new_tokens=4,
        output_dir=str(tmp_path),
        run_name="run",
        micro_batch_size=4,
    )
    return TrainConfig(**(options | overrides))


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_a_short_run_writes_metrics_curves_and_a_checkpoint(tmp_path):
    trainer = Trainer(tiny_config(tmp_path))
    history = trainer.train()
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records == history
    train = [r for r in records if "loss" in r]
    assert [r["iteration"] for r in train] == [1, 2]
    for key in (
        "success_rate",
        "mean_return",
        "invalid_action_rate",
        "singleton_fraction",
        "step_group_size_histogram",
        "clip_fraction",
        "entropy",
        "time_rollout",
        "time_update",
        "tokens_generated",
    ):
        assert key in train[0]
    assert train[1]["env_steps"] == 2 * train[0]["env_steps"] == 24
    assert [r["iteration"] for r in records if "val_success_rate" in r] == [0, 1, 2]
    assert (run / "curves.png").stat().st_size > 10_000
    assert (run / "checkpoint.pt").exists() and (run / "model" / "config.json").exists()
    assert (run / "scalars" / "loss.csv").exists()  # torchrl's CSV logger
    assert yaml.safe_load((run / "config.yaml").read_text())["env"] == "sokoban"


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    straight = Trainer(tiny_config(tmp_path / "a"))
    straight.train()
    first = Trainer(tiny_config(tmp_path / "b", iterations=1))
    first.train()
    resumed = Trainer(tiny_config(tmp_path / "b", iterations=2, resume=True))
    resumed.train()
    a, b = straight.last_batch, resumed.last_batch
    assert a["observation"] == b["observation"]
    for x, y in zip(
        a.get(("tokens", "full"), as_list=True),
        b.get(("tokens", "full"), as_list=True),
        strict=True,
    ):
        assert torch.equal(x, y)
    wa, wb = weights(straight.model), weights(resumed.model)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    lines = (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["iteration"] for x in lines] == [0, 1, 1, 2, 2]


def test_kl_to_reference_only_when_beta_is_positive(tmp_path):
    with_kl = Trainer(tiny_config(tmp_path, beta=0.1, iterations=1))
    assert with_kl.reference is not None
    record = with_kl.train_iteration()
    assert record["kl_to_ref"] >= 0
    assert ("ref_log_probs", "response") in with_kl.last_batch.keys(True)
    without = Trainer(tiny_config(tmp_path, beta=0.0, iterations=1, run_name="nokl"))
    assert without.reference is None
    assert without.train_iteration()["kl_to_ref"] == 0.0


def test_zero_step_weight_reproduces_grpo_exactly(tmp_path):
    def one_iteration(run_name, **options):
        trainer = Trainer(tiny_config(tmp_path, iterations=1, run_name=run_name, **options))
        record = trainer.train_iteration()
        return record, weights(trainer.model), trainer.last_batch

    grpo, w_grpo, b_grpo = one_iteration("grpo", advantage_estimator="grpo")
    zero, w_zero, _ = one_iteration("zero", gigpo_step_advantage_weight=0.0)
    full, w_full, b_full = one_iteration("full", gigpo_step_advantage_weight=1.0)
    assert zero["loss"] == grpo["loss"]
    assert all(torch.equal(w_zero[k], w_grpo[k]) for k in w_grpo)
    # same rollouts, different credit: the step term is the only difference
    assert b_full["observation"] == b_grpo["observation"]
    step_term = b_full["advantage"] - b_grpo["advantage"]
    torch.testing.assert_close(step_term.reshape(-1), b_full["step_advantage"].reshape(-1))
    # the step term is not zero here, so the update differs (the loss value may not: at
    # ratio 1 it is the token-weighted sum of advantages, which can cancel)
    assert float(b_full["step_advantage"].abs().sum()) > 0
    assert not all(torch.equal(w_full[k], w_grpo[k]) for k in w_grpo)


def test_no_optimizer_step_without_a_learning_signal(tmp_path):
    # the tiny model's replies are all invalid: every return is equal, so GRPO's advantages
    # are all 0 and so is the gradient; AdamW must not step (its momentum would move weights)
    trainer = Trainer(tiny_config(tmp_path, advantage_estimator="grpo", iterations=1))
    record = trainer.train_iteration()
    assert float(trainer.last_batch["advantage"].abs().sum()) == 0
    assert record["grad_norm"] == 0 and record["optimizer_steps_skipped"] == 1
    assert not trainer.optimizer.state  # never stepped


def test_train_layers_freezes_all_but_the_top_layers(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, train_layers=1, iterations=1))
    before = weights(trainer.model)
    trainer.train_iteration()
    changed = {k for k, v in weights(trainer.model).items() if not torch.equal(v, before[k])}
    top = len(trainer.model.model.layers) - 1
    assert changed, "the top layer must train"
    assert all(k.startswith(f"model.layers.{top}.") or k == "model.norm.weight" for k in changed)


@pytest.mark.parametrize("lora", [False, True])
def test_frozen_layers_encoded_once_train_as_encoded_in_every_mini_batch(tmp_path, lora):
    """The same update (two PPO epochs of mini-batches) whether the frozen layers are
    encoded once or in every mini-batch: equal up to float rounding."""
    if lora:
        pytest.importorskip("peft")
    runs = {}
    for once in (True, False):
        config = tiny_config(
            tmp_path / str(once),
            train_layers=1,
            iterations=1,
            ppo_epochs=2,
            mini_batch_size=3,
            dtype="float32",
            lora=lora,
            lora_rank=2,
            frozen_layers_once=once,
        )
        trainer = Trainer(config)
        assert frozen_depth(trainer.model) == len(trainer.model.get_decoder().layers) - 1
        calls = []  # the bottom layer's forward calls: rollout and validation alike in both
        bottom = trainer.model.get_decoder().layers[0]
        bottom.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        record = trainer.train_iteration()
        runs[once] = (record, weights(trainer.model), len(calls))
    (once, once_weights, once_calls), (every, every_weights, every_calls) = runs[True], runs[False]
    assert once_calls < every_calls  # the update's mini-batches skipped the frozen layer
    assert once["grad_norm"] > 0  # a learning signal, or the comparison says nothing
    for key in ("loss", "kl_to_behaviour", "clip_fraction", "entropy", "grad_norm"):
        assert once[key] == pytest.approx(every[key], rel=1e-4, abs=1e-6), key
    for name, value in once_weights.items():
        torch.testing.assert_close(value, every_weights[name], atol=1e-5, rtol=1e-4)


def test_validation_before_the_first_update(tmp_path):
    history = Trainer(tiny_config(tmp_path, iterations=1, val_every=5)).train()
    assert [(r["iteration"], "val_success_rate" in r) for r in history] == [
        (0, True),
        (1, False),
        (1, True),
    ]


def test_validation_changes_no_training_number(tmp_path):
    def run(name, val_every):
        trainer = Trainer(tiny_config(tmp_path, run_name=name, val_every=val_every))
        history = trainer.train()
        return trainer, history

    often, often_history = run("often", 1)
    rarely, rarely_history = run("rarely", 2)
    assert [r["iteration"] for r in often_history if "val_success_rate" in r] == [0, 1, 2]
    assert [r["iteration"] for r in rarely_history if "val_success_rate" in r] == [0, 2]
    # the second iteration's rollouts come after a validation in one run only
    tokens = [b.last_batch.get(("tokens", "full"), as_list=True) for b in (often, rarely)]
    assert len(tokens[0]) == len(tokens[1])
    assert all(torch.equal(x, y) for x, y in zip(*tokens, strict=True))
    w_often, w_rarely = weights(often.model), weights(rarely.model)
    assert all(torch.equal(w_often[k], w_rarely[k]) for k in w_often)
    measured = ("time_", "peak_memory_", "train_tokens_per_s")  # clocks and memory vary
    numbers = [
        [{k: v for k, v in r.items() if not k.startswith(measured)} for r in h if "loss" in r]
        for h in (often_history, rarely_history)
    ]
    assert numbers[0] == numbers[1]


@pytest.mark.parametrize("release", [False, True])
def test_the_decoder_memory_is_logged_and_released_before_the_update(tmp_path, release):
    trainer = Trainer(tiny_config(tmp_path, iterations=1, release_decoder_memory=release))
    # a GPU's static cache, here on the CPU
    trainer.policy.sampling = dataclasses.replace(trainer.policy.sampling, static_cache=True)
    record = trainer.train_iteration()
    held = decoding.held_bytes(trainer.model)
    assert record["decode_held_mb"] == held / 2**20
    assert (held == 0) == release
    assert record["peak_memory_rollout_mb"] <= record["peak_memory_mb"]


def test_every_validation_samples_from_the_same_stream(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, iterations=1))
    before = torch.get_rng_state()
    trainer.validate()
    assert torch.equal(torch.get_rng_state(), before)  # the training's stream untouched
    first = trainer.last_val_batch.get(("tokens", "full"), as_list=True)
    torch.rand(7)  # training moves its stream on; validation's does not follow it
    trainer.validate()
    again = trainer.last_val_batch.get(("tokens", "full"), as_list=True)
    assert len(first) == len(again) and all(map(torch.equal, first, again))


def test_lora_trains_only_the_adapter(tmp_path):
    pytest.importorskip("peft")
    trainer = Trainer(tiny_config(tmp_path, lora=True, lora_rank=2, iterations=1))
    base = {k: v.clone() for k, v in trainer.model.named_parameters() if not v.requires_grad}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert all(torch.equal(v, after[k]) for k, v in base.items())
    assert (tmp_path / "run" / "model" / "adapter_config.json").exists()


def test_lora_with_train_layers_puts_adapters_in_the_top_layers_only(tmp_path):
    pytest.importorskip("peft")
    trainer = Trainer(tiny_config(tmp_path, lora=True, lora_rank=2, train_layers=1))
    trainable = [k for k, v in trainer.model.named_parameters() if v.requires_grad]
    top = len(trainer.model.get_decoder().layers) - 1
    assert trainable and all("lora_" in k and f"layers.{top}." in k for k in trainable)


def test_train_layers_beyond_the_model_trains_every_layer(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, train_layers=99))
    layers = trainer.model.get_decoder().layers
    assert all(p.requires_grad for p in layers.parameters())
    assert not trainer.model.get_input_embeddings().weight.requires_grad


# -- command line ----------------------------------------------------------------------


SAMPLE = {
    "advantage_estimator": "rloo",
    "use_gym_env": "false",
    "gigpo_step_advantage_weight": "0.8",
    "num_generations": "3",
    "beta": "0.04",
    "entropy_coeff": "0.01",
    "max_turns": "7",
    "gamma": "0.9",
    "norm_adv": "none",
    "compat": "none",  # verl-agent refuses rloo: see tests/test_compat_penalty.py
    "invalid_action_penalty": "0.2",
    "anchor": "history:2",
    "similarity_threshold": "0.9",
    "env": "taxi",
    "env_kwargs": "{}",
    "model": "tiny",
    "backend": "transformers",
    "memory": "0",
    "num_groups": "5",
    "temperature": "0.7",
    "top_p": "0.9",
    "max_new_tokens": "12",
    "constrain_actions": "true",
    "learning_rate": "0.001",
    "weight_decay": "0.01",
    "iterations": "3",
    "ppo_epochs": "2",
    "mini_batch_size": "48",
    "micro_batch_size": "4",
    "loss_agg_mode": "seq_mean_token_sum",
    "max_tokens_per_micro_batch": "1024",
    "device": "cpu",
    "dtype": "float32",
    "gradient_checkpointing": "true",
    "compile_decode": "true",
    "release_decoder_memory": "true",
    "num_threads": "1",
    "num_env_workers": "0",
    "num_policy_replicas": "0",
    "ray_address": "none",
    "train_layers": "2",
    "frozen_layers_once": "false",
    "val_at_start": "false",
    "clip_epsilon": "0.3",
    "max_grad_norm": "0.5",
    "lora": "false",
    "lora_rank": "4",
    "val_every": "2",
    "val_groups": "3",
    "val_temperature": "0.2",
    "save_every": "3",
    "logger": "tensorboard",
    "output_dir": "out",
    "run_name": "r",
    "seed": "7",
    "resume": "true",
    "overwrite": "true",  # refused with resume by check_run_dir, not by parsing
}


def test_every_flag_is_real_and_reaches_the_config():
    assert set(SAMPLE) == set(FIELDS), "add new options to SAMPLE"
    sample = dict(SAMPLE)
    if importlib.util.find_spec("tensorboard") is None:  # a logger must be installed
        argv = [token for name, value in sample.items() for token in (f"--{name}", value)]
        with pytest.raises(ValueError, match="pip install tensorboard"):
            parse_config(argv)
        sample["logger"] = "csv"
    argv = [token for name, value in sample.items() for token in (f"--{name}", value)]
    config = parse_config(argv)
    expected = TrainConfig(
        advantage_estimator="rloo",
        use_gym_env=False,
        gigpo_step_advantage_weight=0.8,
        num_generations=3,
        beta=0.04,
        entropy_coeff=0.01,
        max_turns=7,
        gamma=0.9,
        norm_adv="none",
        compat=None,
        invalid_action_penalty=0.2,
        anchor="history:2",
        similarity_threshold=0.9,
        env="taxi",
        env_kwargs={},
        model="tiny",
        backend="transformers",
        memory=0,
        num_groups=5,
        temperature=0.7,
        top_p=0.9,
        max_new_tokens=12,
        constrain_actions=True,
        learning_rate=0.001,
        weight_decay=0.01,
        iterations=3,
        ppo_epochs=2,
        mini_batch_size=48,
        micro_batch_size=4,
        loss_agg_mode="seq_mean_token_sum",
        max_tokens_per_micro_batch=1024,
        device="cpu",
        dtype="float32",
        gradient_checkpointing=True,
        compile_decode=True,
        release_decoder_memory=True,
        num_threads=1,
        num_env_workers=0,
        num_policy_replicas=0,
        ray_address=None,
        train_layers=2,
        frozen_layers_once=False,
        val_at_start=False,
        clip_epsilon=0.3,
        max_grad_norm=0.5,
        lora=False,
        lora_rank=4,
        val_every=2,
        val_groups=3,
        val_temperature=0.2,
        save_every=3,
        logger=sample["logger"],
        output_dir="out",
        run_name="r",
        seed=7,
        resume=True,
        overwrite=True,
    )
    assert config == expected
    assert parse_config(["--resume"]).resume is True
    assert parse_config(["--env_kwargs", '{"num_boxes": 2}', "--env", "sokoban"]).env_kwargs == {
        "num_boxes": 2
    }


def test_yaml_config_with_flags_winning(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("env: taxi\nnum_generations: 6\nbeta: 0.02\n")
    config = parse_config(["--config", str(path), "--num_generations", "3"])
    assert (config.env, config.num_generations, config.beta) == ("taxi", 3, 0.02)
    path.write_text("env: taxi\nnum_generation: 6\n")
    with pytest.raises(ValueError, match=r"unknown options \['num_generation'\]"):
        parse_config(["--config", str(path)])


def _cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux reports them (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as info:
            return {flag for line in info if line.startswith("flags") for flag in line.split()}
    except OSError:
        return set()


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_rollout_validation_and_update_all_run_in_the_chosen_precision(tmp_path, dtype):
    trainer = Trainer(tiny_config(tmp_path, iterations=1, dtype=dtype))
    seen = []  # (phase, autocast on) at every forward of the model's first decoder layer
    layer = trainer.model.model.layers[0]
    hook = layer.register_forward_hook(
        lambda *_: seen.append((trainer._phase, torch.is_autocast_enabled("cpu")))
    )
    try:
        trainer.validate()
        trainer.train_iteration()
    finally:
        hook.remove()
    phases = {phase for phase, _ in seen}
    assert {"validation", "rollout"} <= phases  # the update's phase name varies
    assert {on for _, on in seen} == {dtype == "bfloat16"}


def test_dtype_auto_is_bfloat16_where_the_hardware_computes_it():
    assert TrainConfig(dtype="auto", device="cpu").resolve_dtype() == auto_dtype("cpu")
    assert TrainConfig(dtype="float32", device="cpu").resolve_dtype() == "float32"
    assert auto_dtype("cuda") == auto_dtype("cuda:1") == "bfloat16"
    flags = _cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags to check the CPU against")
    native = bool(flags & {"avx512_bf16", "amx_bf16"})
    assert auto_dtype("cpu") == ("bfloat16" if native else "float32")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--use_gym_env", "false"], "gigpo needs an environment"),
        (["--gigpo_step_advantage_weight", "-0.5"], "gigpo_step_advantage_weight -0.5"),
        (["--env", "chess"], "'chess' is not a registered environment; known: .*sokoban"),
        (["--advantage_estimator", "ppo"], "advantage_estimator 'ppo' is not one of"),
        (["--num_generations", "0"], "num_generations 0"),
        (["--gamma", "2"], "gamma 2.0"),
        (["--backend", "vllm", "--lora"], "--lora with --backend vllm"),
        (["--loss_agg_mode", "sum"], "loss_agg_mode 'sum' is not one of"),
        (["--device", "tpu"], "--device 'tpu' must be auto, cpu, cuda or cuda:N"),
        (["--device", "cuda:99"], "--device cuda:99: (no CUDA device|only)"),
        (["--dtype", "float16"], "dtype 'float16' is not one of"),
        (["--model", "random:gpt-5"], "unknown preset; known: random:smollm2-135m"),
        (["--max_tokens_per_micro_batch", "0"], "max_tokens_per_micro_batch 0"),
    ],
)
def test_bad_options_fail_before_any_model_loads(argv, message, capsys, monkeypatch):
    import gigpo_torchrl.policy.models as models

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before validation")

    monkeypatch.setattr(models, "load_model", no_loading)
    with pytest.raises(ValueError, match=message):
        parse_config(argv)
    assert main(argv) == 2
    assert "gigpo-train: error:" in capsys.readouterr().err


def test_unknown_flag_is_rejected():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--gigpo_weight", "1"])
