"""`mlxrewrite doctor`: a differential self-test of the running MLX backend, and the profile the rules read.

The same pattern is wrong on Metal only for small M >= 2 and long rows, wrong on CUDA for every M, unsupported
on CUDA for some shapes, and some MLX release will fix it. So rather than trust facts read from one version's
source, the doctor runs the kernels the rules depend on, here, and compares each with the
dequantize-then-float32 reference:

- quantized_matmul with broadcast weight batch dims (mlx-lm's GQA quantized KV cache), with each of the rule's
  rewrites (fold, copy, dequantize: the rule's own functions) and as shipped, over the buckets of
  `policy.QmmBucket`; each bucket is probed at both ends of its M range, at the top of its rows class, on a
  dense and a sliced cache. Verdict per way: ok, wrong, unsupported (it raised: any exception, JIT compile
  errors included), crashed (it lost the GPU context or killed the process), or not measured; and its time.
- scaled_dot_product_attention with an all-True mask against mask=None: equal? how much slower?
- gather_qmm with broadcast indices: right? (reported only: no rule depends on it yet)

On CUDA every new kernel instantiation is JIT-compiled on first use (seconds each, unless MLX's PTX cache
already holds it), so a run cannot cover every bucket in a minute. It runs within a time budget, most
important first (what mlx-lm decoding hits: M = 1, then speculative M, at short KV lengths, for head dims 128
and 64; see `Grid._priority`), and records what it did not reach as not measured: those buckets keep the
source-derived policy, and the next run resumes there. On GPUs the probes run in a child process
(`mlxrewrite.isolation`), which is killed at the deadline (a JIT compile cannot be interrupted) and replaced
after a crash; the call as shipped, the one that reads out of bounds on CUDA, runs after everything the routes
need. The profile is also written while measuring, so a crash loses little.

The result is a `policy.Profile`, written to the user's cache (one file per device and MLX version), which
`Backend.current()` hands to the rules. `mlxrewrite.doctor()` is `run()`. The kernels are injectable
(`run(kernels=...)`), so tests can stand in a backend that is wrong, raises or crashes for chosen shapes.

Modules, one job each: `probes` (the grid: what to probe, in which order), `kernels` (the injectable MLX
kernels), `measure` (one way against the reference; verdicts), `tasks` (what a run executes, and the plan),
`executors` (in process or in a child), `resume` (what an earlier run measured), `tally` (outcomes into a
profile), `session` (`run`: budget, schedule, checkpoints), `progress`, `jit_cache` (CUDA's PTX cache),
`report` (`render`: the table) and `cli` (`command`).
"""

from __future__ import annotations

import sys
import types
from typing import Any

from ..policy import Profile
from .cli import WATCHDOG_S, command
from .kernels import Kernels
from .measure import TOLERANCE, Outcome
from .probes import DECODE_M, LARGE_M, N_KV, N_REP, TOP_ROWS, Grid, QmmProbe, grid_for, probe_rows
from .progress import Progress
from .report import render
from .session import BUDGET_S, CHECKPOINT_S, REPORT_SHARE, run
from .tasks import LAYOUTS, PAD, GatherTask, QmmTask, SdpaTask, Task, plan

__all__ = ["BUDGET_S", "CHECKPOINT_S", "DECODE_M", "LARGE_M", "LAYOUTS", "N_KV", "N_REP", "PAD", "REPORT_SHARE",
           "TOLERANCE", "TOP_ROWS", "WATCHDOG_S", "GatherTask", "Grid", "Kernels", "Outcome", "Progress", "QmmProbe",
           "QmmTask", "SdpaTask", "Task", "command", "grid_for", "plan", "probe_rows", "render", "run"]


class _CallableModule(types.ModuleType):
    """`mlxrewrite.doctor()` runs the doctor while `mlxrewrite.doctor.run`, `.Kernels`, ... stay reachable:
    a function named like its module would shadow the module."""

    def __call__(self, **options: Any) -> Profile:
        return run(**options)


sys.modules[__name__].__class__ = _CallableModule
