"""Every Python block of the README runs as written and prints what its comments say.

Each block runs on its own, in a fresh namespace (a reader copies one block, not the page),
from a scratch folder, in README order. A block is skipped only when it is marked as
needing hardware this machine may lack: a first line such as ``# needs a GPU`` or
``# needs vLLM``, or an HTML comment with those words on the line just before the fence
(``<!-- needs a GPU -->``). ``print(...)  # output`` comments are compared with what the
block prints (a comment starting with ``e.g.`` stands for any line).
"""

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
NEEDS_HARDWARE = re.compile(r"needs? (a )?(GPU|CUDA|vLLM)", re.IGNORECASE)


def python_blocks() -> list[tuple[int, str, bool]]:
    """``(line number, code, skipped)`` of every ```` ```python ```` block, in order."""
    lines = README.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i + 1
            end = next(j for j in range(start, len(lines)) if lines[j].strip() == "```")
            code = "\n".join(lines[start:end]) + "\n"
            before = lines[i - 1] if i > 0 else ""
            first = lines[start] if start < end else ""
            marked = (first.lstrip().startswith("#") and NEEDS_HARDWARE.search(first)) or (
                before.strip().startswith("<!--") and NEEDS_HARDWARE.search(before)
            )
            if marked and not torch.cuda.is_available():
                blocks.append((start + 1, code, True))
            else:
                blocks.append((start + 1, code, False))
            i = end
        i += 1
    return blocks


def promised_output(code: str) -> list[str] | None:
    """The output the ``print(...)  # ...`` comments promise, or None when a print has none
    (or the block lists the registry, which other code in the process may have grown)."""
    prints = [line for line in code.splitlines() if re.match(r"\s*print\(", line)]
    promises = [re.search(r"print\(.*\)\s+# (.*)$", line) for line in prints]
    if not prints or not all(promises) or "list_envs()" in code:
        return None
    return [m.group(1) for m in promises]


def test_every_python_block_runs_and_prints_what_it_promises(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that write (runs/, checkpoints) write here
    blocks = python_blocks()
    assert len(blocks) >= 5
    namespaces = {}
    for line, code, skipped in blocks:
        if skipped:
            continue
        namespace: dict = {"__name__": "__readme__"}
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                exec(compile(code, f"{README}:{line}", "exec"), namespace)
            except Exception as error:
                raise AssertionError(
                    f"README.md block at line {line} fails: {type(error).__name__}: {error}"
                ) from error
        promised = promised_output(code)
        if promised is not None:
            printed = out.getvalue().splitlines()
            assert len(printed) == len(promised), (line, printed, promised)
            for got, want in zip(printed, promised, strict=True):
                assert want.startswith("e.g.") or got == want, (line, got, want)
        namespaces[line] = namespace

    # the environment examples did what the text around them says
    env_block = next(n for n in namespaces.values() if "env" in n and "td" in n)
    assert env_block["td"]["next", "action_valid"].all()
    from gigpo_torchrl.envs import make_env

    env = make_env("countdown")
    td = env.reset()
    td["action_text"] = ["2"]
    assert env.step(td)["next", "observation"][0] == "2"


def test_hardware_marks_are_recognised():
    assert NEEDS_HARDWARE.search("# needs a GPU and vLLM")
    assert NEEDS_HARDWARE.search("<!-- needs vLLM -->")
    assert not NEEDS_HARDWARE.search("# the GPU path is tested elsewhere")


def test_readme_starts_with_the_two_commands():
    lines = README.read_text().splitlines()
    first_block = lines[lines.index("```bash") + 1 : lines.index("```bash") + 3]
    assert first_block[0].startswith("bash scripts/run.sh")
    assert first_block[1].startswith("bash scripts/test.sh")
    ci = (README.parent / ".ci" / "run").read_text()
    assert "scripts/test.sh" in ci


@pytest.mark.parametrize("path", ["docs/semantics.md"])
def test_the_docs_the_readme_points_to_exist(path):
    assert path in README.read_text()
    assert (README.parent / path).is_file()
