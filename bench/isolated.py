"""Measure in a child process, so that a crash costs one row, not the whole run.

A hazardous call can do more than raise. On CUDA (MLX 0.32.4, H100) a row of the gqa case died with "an
illegal memory access was encountered": the CUDA context is dead after that (every later call fails),
and the process often dies too ("double free or corruption"). The fault surfaced at the next kernel
launch, which was already the next row's input building, so it cannot be pinned to one call from
inside the process. Rows therefore run in a child:

- `Worker` (the parent's end) starts `python -m bench.isolated` and sends one JSON request per line:
  a target `module:function` and its keyword parameters. The child calls it and answers with the
  JSON dict it returns. A target builds its own inputs (seeded), so the child needs nothing else.
- After the target returns, the child launches one trivial kernel (a canary). A dead context fails
  there, so a fault is charged to the request that caused it, not the next one.
- A child that dies, times out, or hits a device fault gives `{"error": "crashed: ...", "crashed":
  True, "stderr": the line naming the error, "stage": the last `stage()` it reported}`, and is
  replaced. A clean raise inside a target is the target's to report; the child stays (starting one
  costs seconds on a GPU).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import select
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEVICE_FAULT = re.compile(r"illegal memory access|unspecified launch failure|misaligned address|CUDA_ERROR|cudaError")
STAGE = "bench.isolated stage: "


class Worker:
    """The parent's end: one child process at a time, started on demand, replaced after a crash."""

    def __init__(self, timeout_s: float = 300.0):
        self.timeout_s = timeout_s
        self._proc: subprocess.Popen | None = None
        self._stderr: Any = None

    def run(self, target: str, **params: Any) -> dict:
        """`target(**params)`'s dict, computed in the child; a crash entry if the child did not answer."""
        proc = self._proc or self._start()
        try:
            proc.stdin.write(json.dumps({"target": target, "params": params}) + "\n")
            proc.stdin.flush()
            line = self._read_line(proc)
        except OSError:  # the child died before reading the request
            line = ""
        answer = json.loads(line) if line else self._crashed(proc)
        if answer.get("crashed"):
            self.close()
        return answer

    def close(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._stderr.close()
            self._proc = self._stderr = None

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _start(self) -> subprocess.Popen:
        self._stderr = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty child never blocks
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))))
        self._proc = subprocess.Popen([sys.executable, "-m", "bench.isolated"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._stderr, text=True, cwd=ROOT, env=env)
        return self._proc

    def _read_line(self, proc: subprocess.Popen) -> str:
        """The child's answer, or "" if it exited or ran past the timeout (then it is killed)."""
        ready, _, _ = select.select([proc.stdout], [], [], self.timeout_s)
        if not ready:
            proc.kill()
            proc.wait()
            return ""
        return proc.stdout.readline()

    def _crashed(self, proc: subprocess.Popen) -> dict:
        code = proc.wait()
        self._stderr.seek(0)
        lines = [line.strip() for line in self._stderr.read().splitlines() if line.strip()]
        for line in lines[-4:]:
            print(f"  [child] {line}", file=sys.stderr)
        return crash_entry(code, lines, self.timeout_s)


def crash_entry(code: int, stderr_lines: list[str], timeout_s: float) -> dict:
    """Why a child gave no answer (a device fault, a signal, an exit status), the stderr line that says so
    (the last one naming an error: a dying process's very last line is often "double free"), and the
    last stage the child reported."""
    text = "\n".join(stderr_lines)
    if (fault := DEVICE_FAULT.search(text)) is not None:
        reason = fault.group(0)
    elif code == -9:
        reason = f"killed (timeout {timeout_s:.0f} s or out of memory)"
    else:
        reason = f"signal {-code}" if code < 0 else f"exit status {code}"
    named = [line for line in stderr_lines if "rror" in line or DEVICE_FAULT.search(line)]
    stages = [line.removeprefix(STAGE) for line in stderr_lines if line.startswith(STAGE)]
    return {"error": f"crashed: {reason}", "crashed": True, "stderr": (named or stderr_lines or [""])[-1][:300],
            "stage": stages[-1] if stages else ""}


# ---- the child's end --------------------------------------------------------------------------------
def stage(text: str) -> None:
    """Say what the child is doing now: a crash entry names the last stage reported."""
    print(STAGE + text, file=sys.stderr, flush=True)


def serve(request: dict) -> dict:
    """Run the target, then the canary: a fault anywhere in the request surfaces here at the latest."""
    import mlx.core as mx

    stage(request["target"])
    module, name = request["target"].split(":")
    answer = getattr(importlib.import_module(module), name)(**request["params"])
    stage("canary")
    mx.eval(mx.zeros(1) + 1)
    return answer


def main() -> None:
    """Answer requests until stdin closes; answers go to a private copy of stdout, stray prints to stderr."""
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    for line in sys.stdin:
        answers.write(json.dumps(serve(json.loads(line))) + "\n")
        answers.flush()


if __name__ == "__main__":
    main()
