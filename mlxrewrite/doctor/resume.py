"""Resuming: a run stopped by its budget or cut short keeps what it measured in its profile; the next run of
the same grid with the same kernels, on the same device and MLX version, probes only the rest."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..policy import NOT_MEASURED, Backend, Measured, Profile, QmmBucket, load_profile
from .kernels import Kernels
from .probes import Grid
from .tasks import QmmTask, ReportTask, SdpaTask, Task


@dataclass(frozen=True)
class Earlier:
    """What an earlier run measured (nothing, for a fresh run): its verdicts stand, its gaps get probed."""

    profile: Profile | None = None

    def kept(self, bucket: QmmBucket, way: str) -> Measured | None:
        """The earlier verdict of `way` in `bucket` if it had one (ok needs every probe; a failure needs one)."""
        verdict = self.profile.qmm.get(bucket) if self.profile is not None else None
        measured = verdict.ways.get(way) if verdict is not None else None
        return measured if measured is not None and measured.status != NOT_MEASURED else None

    def row(self, task: ReportTask) -> dict[str, Any] | None:
        """The earlier row of an SDPA or gather_qmm task, if it was measured."""
        if self.profile is None:
            return None
        fields = dataclasses.asdict(task)
        rows = self.profile.notes.get("sdpa" if isinstance(task, SdpaTask) else "gather_qmm", [])
        return next((r for r in rows if r["status"] != NOT_MEASURED and fields.items() <= r.items()), None)

    def remaining(self, task: Task) -> Task | None:
        """`task` less the ways measured before (the same task when none was); None when nothing is left. A
        way measured in part (some probes of its bucket) runs again on every probe: outcomes are not kept."""
        if not isinstance(task, QmmTask):
            return task if self.row(task) is None else None
        ways = tuple(w for w in task.ways if self.kept(task.probe.bucket, w) is None)
        return task if ways == task.ways else dataclasses.replace(task, ways=ways) if ways else None

    @property
    def buckets(self) -> int:
        """How many buckets the earlier run measured completely."""
        return 0 if self.profile is None else sum(v.complete for v in self.profile.qmm.values())


def earlier_run(backend: Backend, grid: Grid, kernels: Kernels) -> Earlier:
    """The cached profile, when a run of this grid with these kernels wrote it (`load_profile` has checked the
    device and MLX version); else nothing."""
    profile = load_profile(backend)
    if profile is None or (profile.notes.get("grid"), profile.notes.get("kernels")) != (grid.name,
                                                                                       type(kernels).__name__):
        return Earlier()
    return Earlier(profile)
