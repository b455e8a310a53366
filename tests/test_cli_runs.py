"""Run folders: no lost run, resume that cannot mix runs, checkpoints that cannot run code,
logger files that match the metrics, progress inside an iteration (tiny model, CPU)."""

import csv
import json
import os

import pytest
import torch

import gigpo_torchrl.train.trainer as trainer_module
from gigpo_torchrl.train import TrainConfig, Trainer
from gigpo_torchrl.train.checkpoint import RUN_FILES, read_checkpoint
from gigpo_torchrl.train.cli import main
from tests.test_train import tiny_config


def argv_of(config: TrainConfig) -> list[str]:
    """The gigpo-train flags of a config's non-default options."""
    out = []
    for name, value in config.to_dict().items():
        if value != getattr(TrainConfig(), name):
            out += [f"--{name}", json.dumps(value) if isinstance(value, dict) else str(value)]
    return out


def csv_steps(run, name="loss"):
    with open(run / "scalars" / f"{name}.csv") as f:
        return [int(row[0]) for row in csv.reader(f)]


def iterations_in(run):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["iteration"] for x in lines]


def test_an_existing_run_is_kept_unless_overwrite(tmp_path, capsys):
    Trainer(tiny_config(tmp_path, iterations=1)).train()
    run = tmp_path / "run"
    before = {name: (run / name).stat().st_mtime_ns for name in ("checkpoint.pt", "metrics.jsonl")}
    with pytest.raises(ValueError, match="holds a run .*pass --resume to continue it, --overwrite"):
        Trainer(tiny_config(tmp_path, iterations=1))
    # the case: a bad --model used to leave nothing of the old run
    argv = argv_of(tiny_config(tmp_path, model=str(tmp_path / "no-such-model")))
    assert main(argv) == 2
    assert "holds a run" in capsys.readouterr().err
    # with --overwrite a failing start still leaves the old run as it was
    assert main([*argv, "--overwrite"]) == 2
    assert "not an existing local checkpoint directory" in capsys.readouterr().err
    after = {name: (run / name).stat().st_mtime_ns for name in before}
    assert after == before


def test_overwrite_replaces_every_file_of_the_old_run(tmp_path):
    run = tmp_path / "run"
    Trainer(tiny_config(tmp_path, iterations=2)).train()
    assert csv_steps(run) == [1, 2]
    (run / "notes.txt").write_text("mine")  # not the run's: kept
    (run / "scalars" / "old_metric.csv").write_text("1,0.5\n")
    Trainer(tiny_config(tmp_path, iterations=1, overwrite=True)).train()
    assert iterations_in(run) == [0, 1, 1]
    assert csv_steps(run) == [1]  # not appended to the old file
    assert csv_steps(run, "val_success_rate") == [0, 1]
    assert not (run / "scalars" / "old_metric.csv").exists()
    assert (run / "notes.txt").read_text() == "mine"
    assert not (run / "texts").exists() and not (run / "videos").exists()
    assert read_checkpoint(run / "checkpoint.pt")["iteration"] == 1


def test_run_folder_lists_only_known_names():
    assert "scalars" in RUN_FILES and "checkpoint.pt" in RUN_FILES


class KilledWhileSaving(Trainer):
    """A run killed during the checkpoint write of iteration ``kill_at``."""

    kill_at = 3

    def save_checkpoint(self):
        if self.iteration == self.kill_at:
            raise KeyboardInterrupt
        super().save_checkpoint()


def test_resume_rewinds_the_logger_files_with_the_metrics(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        KilledWhileSaving(tiny_config(tmp_path, iterations=4, save_every=1)).train()
    assert csv_steps(run) == [1, 2, 3]  # iteration 3 was logged, never checkpointed
    history = Trainer(tiny_config(tmp_path, iterations=4, resume=True)).train()
    assert iterations_in(run) == [r["iteration"] for r in history] == [0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert csv_steps(run) == [1, 2, 3, 4]  # each iteration once
    assert csv_steps(run, "val_success_rate") == [0, 1, 2, 3, 4]
    assert not (run / "texts").exists() and not (run / "videos").exists()


def test_resume_refuses_options_that_change_the_run(tmp_path, capsys):
    Trainer(tiny_config(tmp_path, iterations=1)).train()
    changed = tiny_config(tmp_path, iterations=2, resume=True, learning_rate=1e-3, gamma=0.9)
    with pytest.raises(ValueError) as error:
        Trainer(changed)
    message = str(error.value)
    assert "gamma: 0.5 -> 0.9" in message and "learning_rate: 0.0001 -> 0.001" in message
    assert "iterations" not in message.split("(only")[0]  # a safe change is not listed
    capsys.readouterr()
    assert main(argv_of(changed)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gigpo-train: error: --resume with options")
    # the safe ones may change
    safe = dict(iterations=2, val_every=2, save_every=2, num_threads=1, micro_batch_size=2)
    Trainer(tiny_config(tmp_path, resume=True, **safe)).train()
    assert read_checkpoint(tmp_path / "run" / "checkpoint.pt")["iteration"] == 2


class Payload:
    """Unpickling this creates a file: what a hostile checkpoint could do instead."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_a_checkpoint_cannot_run_code(tmp_path, capsys):
    Trainer(tiny_config(tmp_path, iterations=1)).train()
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    state = torch.load(checkpoint, weights_only=True)  # ours is plain data
    marker = tmp_path / "code-ran"
    state["history"].append(Payload(str(marker)))
    torch.save(state, checkpoint)
    with pytest.raises(ValueError, match="loading those could run code, so it is refused"):
        Trainer(tiny_config(tmp_path, iterations=2, resume=True))
    assert main(argv_of(tiny_config(tmp_path, iterations=2, resume=True))) == 2
    assert "not a readable checkpoint" in capsys.readouterr().err
    assert not marker.exists()


def test_large_seeds_run(tmp_path):
    # numpy's legacy seeding takes 32 bits; the trainer takes any seed below 2**63
    trainer = Trainer(tiny_config(tmp_path, seed=2**40 + 5, iterations=1))
    assert trainer.train_iteration()["iteration"] == 1


def test_progress_inside_an_iteration(tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(trainer_module, "PROGRESS_INTERVAL", 0.0)
    trainer = Trainer(tiny_config(tmp_path, iterations=1, val_at_start=False))
    trainer.collector.on_step = lambda rows, active: calls.append((rows, active))
    trainer.train_iteration()  # without a bar: only the collector's callback
    assert calls and calls[-1][0] == trainer.collector.stats["steps"]
    assert [rows for rows, _ in calls] == sorted(rows for rows, _ in calls)
    assert calls[0][1] == 4  # 2 groups x 2 generations acted at the first step
    trainer.config.iterations = 2
    trainer.train()  # with the bar
    err = capsys.readouterr().err
    assert "rollout: 4 env steps, 4 playing" in err
    assert "update: micro-batch 1/" in err
    assert "validation: " in err


def test_a_moved_run_folder_resumes(tmp_path):
    Trainer(tiny_config(tmp_path / "a", iterations=1)).train()
    (tmp_path / "c").mkdir()
    (tmp_path / "a" / "run").rename(tmp_path / "c" / "moved")
    history = Trainer(tiny_config(tmp_path / "c", run_name="moved", resume=True)).train()
    assert [r["iteration"] for r in history] == [0, 1, 1, 2, 2]
    assert csv_steps(tmp_path / "c" / "moved") == [1, 2]
