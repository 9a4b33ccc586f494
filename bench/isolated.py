"""Measure in a child process (`mlxrewrite.backends.isolation`), so that a crash costs one row, not the whole run.

A hazardous call can do more than raise. On CUDA (MLX 0.32.4, H100) a row of the gqa case died with "an
illegal memory access was encountered": the CUDA context is dead after that (every later call fails),
and the process often dies too ("double free or corruption"). The fault surfaced at the next kernel
launch, which was already the next row's input building, so it cannot be pinned to one call from
inside the process. Rows therefore run in a child:

- `Worker.run("module:function", **params)` calls the target in the child and returns the dict it returns.
  A target builds its own inputs (seeded), so the child needs nothing else.
- After the target returns, the child launches one trivial kernel (a canary). A dead context fails
  there, so a fault is charged to the request that caused it, not the next one.
- A child that dies, times out, or hits a device fault gives `{"error": "crashed: ...", "crashed":
  True, "stderr": the line naming the error, "stage": the last `stage()` it reported}`, and is
  replaced. A clean raise inside a target is the target's to report; the child stays (starting one
  costs seconds on a GPU).
"""

from __future__ import annotations

import importlib
import sys

from mlxrewrite.backends.isolation import Child, Crashed, stage


class Worker(Child):
    """The parent's end: runs targets in a child, one at a time, with a timeout per request."""

    def __init__(self, timeout_s: float = 300.0):
        super().__init__()
        self.timeout_s = timeout_s

    def run(self, target: str, **params: object) -> dict:
        """`target(**params)`'s dict, computed in the child; a crash entry if the child did not answer."""
        try:
            return self.call(call_target, target, params, timeout_s=self.timeout_s)
        except Crashed as crash:
            for line in crash.lines[-4:]:
                print(f"  [child] {line}", file=sys.stderr)
            return crash_entry(crash)


def crash_entry(crash: Crashed) -> dict:
    """A row's entry for a child that gave no answer: why, the output line that says so, and its last stage."""
    return {"error": f"crashed: {crash.reason}", "crashed": True, "stderr": crash.line[:300],
            "stage": "" if crash.stage is None else str(crash.stage)}


def call_target(target: str, params: dict) -> dict:
    """The child's side of a request: the target, then the canary (a fault anywhere in the request surfaces
    there at the latest)."""
    import mlx.core as mx

    stage(target)
    module, name = target.split(":")
    answer = getattr(importlib.import_module(module), name)(**params)
    stage("canary")
    mx.eval(mx.zeros(1) + 1)
    return answer
