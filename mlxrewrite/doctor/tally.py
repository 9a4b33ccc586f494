"""Tallying: the outcomes of the tasks run so far (and what an earlier run measured) into a `policy.Profile`
that lists every bucket of the grid, measured or not."""

from __future__ import annotations

import datetime
from collections import Counter
from typing import Any

import mlx.core as mx

from ..policy import NOT_MEASURED, ORIGINAL, QMM_REWRITES, Backend, Profile, QmmBucket, QmmVerdict
from .measure import TOLERANCE, Key, Outcome, verdict
from .resume import Earlier
from .tasks import LAYOUTS, GatherTask, QmmTask, SdpaTask, Task


class Tally:
    """What the tasks found so far, and the profile it makes. `todo` is what is left of the plan once what
    `earlier` measured is taken out; `earlier`'s verdicts stand in the profile."""

    def __init__(self, backend: Backend, tasks: list[Task], notes: dict[str, Any], earlier: Earlier):
        self.backend, self.tasks, self.notes, self.earlier = backend, tasks, notes, earlier
        self.todo = [left for task in tasks if (left := earlier.remaining(task)) is not None]
        self.found: dict[Task, dict[Key, Outcome]] = {}
        self.seconds: dict[Task, float] = {}
        self.stopped: str | None = None
        self.probes = Counter(t.probe.bucket for t in tasks if isinstance(t, QmmTask) and t.for_routes)

    def add(self, task: Task, outcomes: dict[Key, Outcome], seconds: float) -> None:
        self.found[task], self.seconds[task] = outcomes, seconds

    def verdicts(self) -> dict[QmmBucket, QmmVerdict]:
        found: dict[QmmBucket, dict[str, list[Outcome]]] = {
            bucket: {name: [] for name in (ORIGINAL, *QMM_REWRITES)} for bucket in self.probes}
        for task, outcomes in self.found.items():
            if isinstance(task, QmmTask):
                for (name, _layout), outcome in outcomes.items():
                    found[task.probe.bucket][name].append(outcome)
        return {bucket: QmmVerdict(bucket, n, {
                    name: self.earlier.kept(bucket, name) or verdict(o, n * len(LAYOUTS), TOLERANCE[bucket.dtype])
                    for name, o in found[bucket].items()})
                for bucket, n in self.probes.items()}

    def _rows(self, kind: type) -> list[dict[str, Any]]:
        return [self.earlier.row(t) or t.row(self.found.get(t)) for t in self.tasks if isinstance(t, kind)]

    def profile(self, seconds: float, finished: bool) -> Profile:
        verdicts = self.verdicts()
        ran = len(self.tasks) - len(self.todo) + sum(bool(self.found.get(t)) for t in self.todo)
        unmeasured = sum(all(m.status == NOT_MEASURED for m in v.ways.values()) for v in verdicts.values())
        slowest = sorted(self.seconds, key=self.seconds.__getitem__, reverse=True)[:5]
        stopped = self.stopped or (f"time budget ({self.notes['budget_s']:g} s) spent"
                                   if finished and ran < len(self.tasks) else None)
        notes = {**self.notes, "seconds": round(seconds, 1), "finished": finished, "stopped": stopped,
                 "tasks": len(self.tasks), "tasks_run": ran, "resumed_buckets": self.earlier.buckets,
                 "buckets": len(verdicts), "complete_buckets": sum(v.complete for v in verdicts.values()),
                 "unmeasured_buckets": unmeasured,
                 "slowest": [[t.label, round(self.seconds[t], 2)] for t in slowest],
                 "sdpa": self._rows(SdpaTask), "gather_qmm": self._rows(GatherTask)}
        created = datetime.datetime.now().isoformat(timespec="seconds")
        return Profile(self.backend.device, self.backend.kind, mx.__version__, created, verdicts, notes)
