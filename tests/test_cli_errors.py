"""gigpo-train: every user error is one ``gigpo-train: error: ...`` line, before any model loads."""

import importlib.util

import pytest
import torch

from gigpo_torchrl.train.cli import main, parse_config


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if the trainer gets as far as loading a model."""
    import gigpo_torchrl.train.trainer as trainer

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the error was found")

    monkeypatch.setattr(trainer, "load_model", refuse)


def one_error_line(capsys, argv) -> str:
    """Run gigpo-train; assert exit status 2 and a single error line, and return it."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("gigpo-train: error: "), err
    assert "Traceback" not in err
    return lines[0]


def base(tmp_path, *extra):
    return ["--model", "tiny", "--output_dir", str(tmp_path / "runs"), "--run_name", "r", *extra]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--env", "gym:Nope-v0"], "gym:Nope-v0: Environment `Nope` doesn't exist"),
        (["--env", "gym:CartPole-v1"], "cannot be played as text"),
        (["--env_kwargs", '{"num_rooms": 3}'], "unexpected keyword argument 'num_rooms'"),
        (["--env", "gym:FrozenLake-v1", "--env_kwargs", '{"mapname": 1}'], "'mapname'"),
        (["--seed", str(2**63)], "--seed 9223372036854775808 must be below 2\\*\\*63"),
        (["--seed", "-1"], "--seed -1 must be >= 0"),
        (["--temperature", "1e-30"], "--temperature 1e-30 is below 0.01.*use 0 for greedy"),
        (["--val_temperature", "0.001"], "--val_temperature 0.001 is below 0.01"),
        (
            ["--num_groups", "1000000", "--num_generations", "1000"],
            "1000000000 environments stepped together: at most 65536",
        ),
        (["--val_groups", "100000000"], "--val_groups = 100000000 environments"),
        (["--max_new_tokens", "1000000000"], "--max_new_tokens 1000000000 is above"),
        (["--run_name", ".."], "--run_name '..' must be a plain folder name"),
        (["--run_name", "."], "--run_name '.' must be a plain folder name"),
        (["--run_name", "a/../../b"], "must be a plain folder name"),
        (["--env", "no_such_module_xyz:keydoor"], "no module named 'no_such_module_xyz'"),
        (["--config", "/nonexistent/run.yaml"], "--config /nonexistent/run.yaml: No such file"),
    ],
)
def test_user_errors_are_one_line_before_any_model_loads(
    extra, message, tmp_path, capsys, no_model_loading
):
    import re

    line = one_error_line(capsys, base(tmp_path, *extra))
    assert re.search(message, line), line


def test_a_logger_whose_package_is_missing_says_what_to_install(tmp_path, capsys):
    for logger in ("tensorboard", "wandb"):
        if importlib.util.find_spec(logger) is not None:
            continue
        line = one_error_line(capsys, base(tmp_path, "--logger", logger))
        assert f"pip install {logger}" in line


def test_output_folders_that_cannot_be_used(tmp_path, capsys, no_model_loading):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    line = one_error_line(capsys, ["--model", "tiny", "--output_dir", str(a_file / "runs")])
    assert f"{a_file} is not a folder" in line
    # read-only even for root: /sys refuses new files, /proc has no such folders
    line = one_error_line(capsys, ["--model", "tiny", "--output_dir", "/sys/gigpo-runs"])
    assert "is not writable" in line
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "r").write_text("a file where the run folder goes")
    line = one_error_line(capsys, base(tmp_path))
    assert "exists and is not a folder" in line


def test_missing_output_folders_are_created(tmp_path):
    config = parse_config(base(tmp_path / "not" / "yet"))
    assert config.check_run_dir() is None
    assert not (tmp_path / "not").exists()  # checking writes nothing


def test_a_missing_model_path_is_one_line(tmp_path, capsys):
    line = one_error_line(capsys, base(tmp_path, "--model", str(tmp_path / "no-model")))
    assert "not an existing local checkpoint directory" in line
    assert not (tmp_path / "runs" / "r" / "config.yaml").exists()  # nothing written


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not a checkpoint at all",
        # a pickle claiming a 2**60-byte string (what gave a MemoryError)
        b"\x80\x04\x8e" + (2**60).to_bytes(8, "little") + b"x" * 10,
        b"PK\x03\x04" + b"\x00" * 100,  # the start of a zip archive, cut short
    ],
)
def test_unreadable_checkpoints_are_one_line(content, tmp_path, capsys, no_model_loading):
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "checkpoint.pt").write_bytes(content)
    line = one_error_line(capsys, base(tmp_path, "--resume"))
    assert "checkpoint.pt is not a readable checkpoint" in line


def test_a_truncated_checkpoint_is_one_line(tmp_path, capsys, no_model_loading):
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    torch.save({"iteration": 1, "model": {"w": torch.zeros(1000)}, "rng": {}}, run / "full.pt")
    data = (run / "full.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    line = one_error_line(capsys, base(tmp_path, "--resume"))
    assert "not a readable checkpoint" in line


def test_resume_and_overwrite_exclude_each_other(tmp_path, capsys, no_model_loading):
    line = one_error_line(capsys, base(tmp_path, "--resume", "--overwrite"))
    assert "--resume and --overwrite exclude each other" in line


# -- YAML --------------------------------------------------------------------------------


def test_yaml_values_are_read_as_their_options_type(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "learning_rate: 1e-4\n"  # YAML 1.1: a string
        'lora: "false"\n'  # a quoted string: must not become true
        "gradient_checkpointing: 'yes'\n"
        "iterations: '3'\n"
        "max_turns: null\n"
        "compat: none\n"
        "run_name: 2024\n"
        "env_kwargs: '{\"num_boxes\": 1}'\n"
        "env: sokoban\n"
    )
    config = parse_config(["--config", str(path)])
    assert config.learning_rate == 1e-4
    assert config.lora is False
    assert config.gradient_checkpointing is True
    assert config.iterations == 3
    assert config.max_turns is None and config.compat is None
    assert config.run_name == "2024"
    assert config.env_kwargs == {"num_boxes": 1}


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("iterations: many\n", "iterations: 'many' is not an integer"),
        ("iterations: 2.5\n", "iterations: 2.5 is not an integer"),
        ("lora: maybe\n", "lora: 'maybe' is not true or false"),
        ("lora: 1\n", "lora: 1 is not true or false"),
        ("learning_rate: fast\n", "learning_rate: 'fast' is not a number"),
        ("learning_rate: true\n", "learning_rate: True is not a number"),
        ("env_kwargs: [1, 2]\n", "env_kwargs: \\[1, 2\\] is not a mapping"),
        ("model: [tiny]\n", "model: \\['tiny'\\] is not a string"),
        ("env: taxi\n  bad indent: [\n", "not valid YAML"),
        ("- a list\n", "expected a mapping"),
    ],
)
def test_yaml_values_of_the_wrong_type_are_named(yaml_text, message, tmp_path, capsys):
    import re

    path = tmp_path / "run.yaml"
    path.write_text(yaml_text)
    line = one_error_line(capsys, ["--config", str(path), "--output_dir", str(tmp_path)])
    assert re.search(message, line), line


def test_python_callers_get_the_same_type_checks(tmp_path):
    from gigpo_torchrl.train import TrainConfig

    with pytest.raises(ValueError, match="--lora 'false' must be true or false"):
        TrainConfig(model="tiny", lora="false").validate()
    with pytest.raises(ValueError, match="--learning_rate '1e-4' must be a number"):
        TrainConfig(model="tiny", learning_rate="1e-4").validate()
    with pytest.raises(ValueError, match="--env 3 must be a string"):
        TrainConfig(model="tiny", env=3).validate()
    TrainConfig(model="tiny", output_dir=tmp_path).validate()  # a Path is fine
