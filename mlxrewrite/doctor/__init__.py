"""`mlxrewrite doctor`: a differential self-test of the running MLX backend, and the profile the rules read.

Facts read from one MLX version's source go stale (a kernel wrong for some shapes on one backend; a release
that fixes it), so the doctor runs here what the loaded rules declare (`Rule.probes`, see `probes`): each way
of running a call (as shipped, each rewrite) against the rule's reference, per bucket of the rule's calls:
ok, wrong, unsupported (it raised), crashed (it lost the GPU context or killed the process) or not measured,
and how fast. Within a time budget, most important first; on GPUs in a child process (`mlxrewrite.backends.isolation`),
killed at the deadline and replaced after a crash; written while measuring, and resumed by the next run.
The result is a `backend.Profile`, cached per device and MLX version, which `Backend.current()` hands to the
rules. `mlxrewrite.doctor()` is `run()`; `run(kernels=...)` stands in a faulty backend (tests).

Modules, one job each: `probes` (the protocols of a rule's probes), `kernels` (the injectable MLX kernels),
`measure` (one way against the reference; verdicts), `executors` (in process or in a child), `resume` (what an
earlier run measured), `tally` (outcomes into a profile), `session` (`run`: budget, schedule, checkpoints),
`progress`, `jit_cache` (CUDA's PTX cache), `report` (`render`: the table) and `cli` (`command`).
"""

from __future__ import annotations

import sys
import types
from typing import Any

from ..backends.device import Profile
from .cli import WATCHDOG_S, command
from .kernels import KernelCall, Kernels
from .measure import TOLERANCE, Outcome
from .probes import AS_SHIPPED, EXTRA, REPORT, ROUTES, Grid, Task, default_grids, grid_name, plan
from .progress import Progress
from .report import Footnotes, render
from .session import BUDGET_S, CHECKPOINT_S, REPORT_SHARE, run

__all__ = ["AS_SHIPPED", "BUDGET_S", "CHECKPOINT_S", "EXTRA", "REPORT", "REPORT_SHARE", "ROUTES", "TOLERANCE",
           "WATCHDOG_S", "Footnotes", "Grid", "KernelCall", "Kernels", "Outcome", "Progress", "Task", "command",
           "default_grids", "grid_name", "plan", "render", "run"]


class _CallableModule(types.ModuleType):
    """`mlxrewrite.doctor()` runs the doctor while `mlxrewrite.doctor.run`, `.Kernels`, ... stay reachable:
    a function named like its module would shadow the module."""

    def __call__(self, **options: Any) -> Profile:
        return run(**options)


sys.modules[__name__].__class__ = _CallableModule
