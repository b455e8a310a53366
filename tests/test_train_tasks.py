"""The trainer's side of the env robustness work: held-out validation tasks, env_errors."""

import pytest

from gigpo_torchrl.envs import StepResult, TextGame, register_env
from gigpo_torchrl.train import TrainConfig, Trainer
from gigpo_torchrl.train.trainer import METRICS


@register_env("test-flaky-tasks", max_steps=2, overwrite=True)
class FlakyTasks(TextGame):
    """Six tasks (the seed modulo 6); a game of an even task returns a NaN reward."""

    task = "Say anything."

    def reset(self, seed):
        self.n = seed % 6
        return f"task {self.n}"

    def step(self, action):
        reward = float("nan") if self.n % 2 == 0 else 1.0
        return StepResult("done", reward=reward, terminated=True, success=True)

    def state(self):
        return self.n


def test_training_skips_validation_tasks_and_logs_env_errors(tmp_path):
    config = TrainConfig(
        model="tiny",
        env="test-flaky-tasks",
        iterations=2,
        num_groups=3,
        num_generations=2,
        max_turns=2,
        val_every=1,
        save_every=2,
        val_groups=2,
        max_new_tokens=3,
        output_dir=str(tmp_path),
        run_name="run",
        micro_batch_size=6,
    )
    with pytest.warns(UserWarning, match="a game failed"):
        trainer = Trainer(config)
        history = trainer.train()
    held_out = trainer.val_collector.held_out_tasks
    assert len(held_out) == 2 and trainer.val_collector.tasks_held_out
    batch = trainer.last_batch
    starts = batch[batch["step"] == 0]
    assert not set(starts["state_hash"].tolist()) & held_out
    train = [r for r in history if "loss" in r]
    assert "env_errors" in METRICS and all("env_errors" in r for r in train)
    failed = sum(int(obs.split()[1]) % 2 == 0 for obs in starts["observation"])
    assert train[-1]["env_errors"] == failed
    assert sum(r["env_errors"] for r in train) > 0
    validation = [r for r in history if "val_success_rate" in r]
    assert validation and all(r["val_tasks_held_out"] is True for r in validation)
