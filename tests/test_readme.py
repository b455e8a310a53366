"""The README's examples run and print what their comments say."""

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_examples_print_what_they_promise():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    examples = [b for b in blocks if "print(" in b and "# " in b and "list_envs" not in b]
    assert len(examples) == 2
    for example in examples:
        check_example(example)


def check_example(example):
    promised = re.findall(r"print\(.*\)\s+# (.*)", example)
    assert promised, "README examples show their output in comments"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(example, str(README), "exec"), {})
    assert out.getvalue().splitlines() == promised


def test_readme_environment_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    env_blocks = [b for b in blocks if "gigpo_torchrl.envs import" in b]
    assert len(env_blocks) == 2
    namespace = {}
    with contextlib.redirect_stdout(io.StringIO()):
        for block in env_blocks:
            exec(compile(block, str(README), "exec"), namespace)
    assert namespace["td"]["next", "action_valid"].all()
    from gigpo_torchrl.envs import make_env

    env = make_env("countdown")
    td = env.reset()
    td["action_text"] = ["2"]
    assert env.step(td)["next", "observation"][0] == "2"


def test_readme_starts_with_the_two_commands():
    lines = README.read_text().splitlines()
    first_block = lines[lines.index("```bash") + 1 : lines.index("```bash") + 3]
    assert first_block[0].startswith("bash scripts/run.sh")
    assert first_block[1].startswith("bash scripts/test.sh")
    ci = (README.parent / ".ci" / "run").read_text()
    assert "scripts/test.sh" in ci
