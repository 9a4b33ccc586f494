"""What the doctor runs: the probes the loaded rules declare. A rule names a module (`Rule.probes`, imported here
only) with `grid(backend, name) -> Grid`, what to probe on this backend in the named grid, and
`report(profile, footnotes) -> lines`, its part of the table. The doctor knows no more of a rule than these
protocols, so it runs whatever the rules declare (docs/doctor.md, "Probes")."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Hashable, Protocol

from ..backends.device import Backend
from ..core.rule import default_rules
from .kernels import Kernels
from .measure import TOLERANCE, Key, Outcome

# Task priorities. ROUTES: a rule's routes read it, so it runs first, until (1 - REPORT_SHARE) of the budget;
# the others are only reported, in this order: REPORT, AS_SHIPPED (the hazard itself: it may crash the device,
# so after every safe report), EXTRA (no rule reads it yet); then the rest of ROUTES.
ROUTES, REPORT, AS_SHIPPED, EXTRA = range(4)


class Task(Protocol):
    """Some ways of one probe, measured against one reference: the unit that is scheduled, run in a child
    process (so picklable) and killed at the deadline. A frozen dataclass with a `ways` field: a resumed run
    replaces it with the ways left to measure."""

    rule: str  # the profile section it fills: its rule's name (a report-only probe may have its own)
    ways: tuple[str, ...]
    priority: int  # ROUTES, REPORT, AS_SHIPPED or EXTRA
    samples: int  # outcomes per way: a way is ok in a bucket once every sample of every probe of it was
    tolerance: float  # an error above this (relative to max |reference|) is wrong

    @property
    def label(self) -> str: ...

    @property
    def probe(self) -> Hashable:
        """Which probe of its bucket it runs (tasks that share one count as one probe)."""

    @property
    def bucket(self) -> Any:
        """The rule's bucket: a frozen dataclass, written with `dataclasses.asdict`."""

    def execute(self, kernels: Kernels, backend: Backend) -> dict[Key, Outcome]:
        """Outcomes keyed (way, sample); each way announced with `isolation.stage` before it runs."""


class ShapeTask:
    """For tasks whose probe is a frozen dataclass with a `dtype`: the probe is the bucket (override `bucket`
    where not), and the tolerance is its dtype's."""

    probe: Any

    @property
    def bucket(self) -> Any:
        return self.probe

    @property
    def tolerance(self) -> float:
        return TOLERANCE[self.probe.dtype]


class Grid(Protocol):
    """What a rule probes in one run."""

    name: str  # a run resumes only a profile of the same grids

    def tasks(self, backend: Backend) -> list[Task]:
        """Every task, most important first."""

    def close(self) -> None:
        """Release what the tasks cached in this process."""


def grid_name(backend: Backend, quick: bool) -> str:
    """Which grid the rules' probes make: "quick" (a smoke test), "cpu" or "gpu"."""
    return "quick" if quick else "cpu" if backend.kind == "cpu" else "gpu"


def probe_modules() -> list[ModuleType]:
    """The probe modules the loaded rules declare."""
    return [importlib.import_module(rule.probes) for rule in default_rules() if rule.probes]


def default_grids(backend: Backend, quick: bool) -> list[Grid]:
    return [module.grid(backend, grid_name(backend, quick)) for module in probe_modules()]


def plan(grids: list[Grid], backend: Backend) -> list[Task]:
    """Every task of a run, each grid's most important first."""
    return [task for grid in grids for task in grid.tasks(backend)]
