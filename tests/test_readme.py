"""The README, run as written: its two set-up commands are what CI runs, its python blocks run in order in
one namespace, every line of its bash blocks runs, and each output block (`$ command`, then the output)
matches what the command prints now, a `...` line standing for any lines. Run in a scratch directory, with
`mlxrewrite` / `python` meaning this interpreter (`.venv/bin/python`)."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
BLOCKS = BLOCK.findall((REPO / "README.md").read_text())
SETUP, *BASH = [body for kind, body in BLOCKS if kind == "bash"]
OUTPUTS = [body for kind, body in BLOCKS if kind == "" and body.startswith("$ ")]


def command(line: str) -> list[str]:
    words = shlex.split(line)
    if words[0] == "mlxrewrite":
        return [sys.executable, "-m", "mlxrewrite", *words[1:]]
    if words[0] in ("python", ".venv/bin/python"):
        return [sys.executable, *words[1:]]
    raise AssertionError(f"README command not understood: {line}")


def run(line: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command(line), cwd=cwd, capture_output=True, text=True, timeout=300)


def matches(expected: list[str], actual: list[str]) -> bool:
    """`actual` line by line, where a "..." line of `expected` matches any lines (none included)."""
    i, skipping = 0, False
    for line in expected:
        if line.strip() == "...":
            skipping = True
            continue
        while skipping and i < len(actual) and actual[i] != line:
            i += 1
        if i >= len(actual) or actual[i] != line:
            return False
        i, skipping = i + 1, False
    return skipping or i == len(actual)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("readme")
    (path / "docs" / "img").mkdir(parents=True)
    return path


def test_the_two_setup_commands_are_what_ci_runs_and_the_first_runs_the_example(scratch):
    lines = SETUP.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("python3 -m venv .venv && .venv/bin/pip install") for line in lines)
    assert lines[1] in (REPO / ".ci" / "run").read_text()
    done = run(lines[0].rpartition("&& ")[2], scratch)
    assert done.returncode == 0 and "max |out - dequantized float reference|" in done.stdout, done.stderr


def test_python_blocks_run_in_order(scratch, monkeypatch, capsys):
    monkeypatch.chdir(scratch)
    namespace: dict = {}
    for kind, body in BLOCKS:
        if kind == "python":
            exec(compile(body, "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert "quantized-matmul-broadcast-weights" in out and (scratch / "tiny-llama" / "config.json").exists()


def test_bash_lines_run(scratch):
    """After the python blocks (the mlx-lm one writes the model directory the generate command loads)."""
    lines = [line for body in BASH for line in body.strip().splitlines()]
    assert lines
    for line in lines:
        done = run(line, scratch)
        assert done.returncode == 0, f"{line}\n{done.stderr}"
        if "generate" in line and "--explain" in line:  # as written, it rewrites something
            assert "quantized-matmul-broadcast-weights -> fold" in done.stderr and " 0 call trace(s)" not in done.stderr


@pytest.mark.parametrize("block", OUTPUTS, ids=[b.splitlines()[0][2:60] for b in OUTPUTS])
def test_output_blocks_are_what_the_commands_print(block, scratch):
    line, *expected = block.rstrip("\n").splitlines()
    done = run(line[2:], scratch)
    assert done.returncode == 1  # both show hazards
    actual = (done.stdout + done.stderr).rstrip("\n").splitlines()
    assert matches(expected, actual), "\n".join(actual)
