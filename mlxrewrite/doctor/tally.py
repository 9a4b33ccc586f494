"""Tallying: the outcomes of the tasks run so far (and what an earlier run measured) into a `Profile` that lists
every bucket of every rule's grid, measured or not, one verdict per way."""

from __future__ import annotations

import dataclasses
import datetime
from collections import Counter
from typing import Any

import mlx.core as mx

from ..backends.device import NOT_MEASURED, Backend, Bucket, Measured, Profile
from .measure import Key, Outcome, verdict
from .probes import ROUTES, Task
from .resume import Earlier

Slot = tuple[str, Any]  # (rule, bucket)


class Tally:
    """What the tasks found so far, and the profile it makes. `todo` is what is left of the plan once what
    `earlier` measured is taken out; `earlier`'s verdicts stand in the profile. A bucket counts (in `buckets`,
    the notes and the summary) when a route reads it, and is complete when every way a route reads has a
    verdict."""

    def __init__(self, backend: Backend, tasks: list[Task], notes: dict[str, Any], earlier: Earlier):
        self.backend, self.tasks, self.notes, self.earlier = backend, tasks, notes, earlier
        self.todo = [left for task in tasks if (left := earlier.remaining(task)) is not None]
        self.found: dict[Task, dict[Key, Outcome]] = {}
        self.seconds: dict[Task, float] = {}
        self.stopped: str | None = None
        self.probes: dict[Slot, set] = {}
        self.expected: dict[Slot, Counter] = {}  # per way: the outcomes an ok verdict needs
        self.tolerance: dict[Slot, float] = {}
        self.routed: dict[Slot, set[str]] = {}  # the ways a route reads
        for task in tasks:
            slot = task.rule, task.bucket
            self.probes.setdefault(slot, set()).add(task.probe)
            self.expected.setdefault(slot, Counter()).update(dict.fromkeys(task.ways, task.samples))
            self.tolerance[slot] = task.tolerance
            if task.priority == ROUTES:
                self.routed.setdefault(slot, set()).update(task.ways)
        self.resumed = sum(all(earlier.kept(*slot, w) for w in ways) for slot, ways in self.routed.items())

    def add(self, task: Task, outcomes: dict[Key, Outcome], seconds: float) -> None:
        self.found[task], self.seconds[task] = outcomes, seconds

    def verdicts(self) -> dict[Slot, dict[str, Measured]]:
        found: dict[Slot, dict[str, list[Outcome]]] = {slot: {way: [] for way in ways}
                                                       for slot, ways in self.expected.items()}
        for task, outcomes in self.found.items():
            for (way, _sample), outcome in outcomes.items():
                found[task.rule, task.bucket][way].append(outcome)
        return {slot: {way: self.earlier.kept(*slot, way) or verdict(o, self.expected[slot][way], self.tolerance[slot])
                       for way, o in ways.items()} for slot, ways in found.items()}

    def profile(self, seconds: float, finished: bool) -> Profile:
        verdicts = self.verdicts()
        ran = len(self.tasks) - len(self.todo) + sum(bool(self.found.get(t)) for t in self.todo)
        complete = sum(all(verdicts[slot][w].status != NOT_MEASURED for w in ways)
                       for slot, ways in self.routed.items())
        unmeasured = sum(all(m.status == NOT_MEASURED for m in verdicts[slot].values()) for slot in self.routed)
        slowest = sorted(self.seconds, key=self.seconds.__getitem__, reverse=True)[:5]
        stopped = self.stopped or (f"time budget ({self.notes['budget_s']:g} s) spent"
                                   if finished and ran < len(self.tasks) else None)
        notes = {**self.notes, "seconds": round(seconds, 1), "finished": finished, "stopped": stopped,
                 "tasks": len(self.tasks), "tasks_run": ran, "resumed_buckets": self.resumed,
                 "buckets": len(self.routed), "complete_buckets": complete, "unmeasured_buckets": unmeasured,
                 "slowest": [[t.label, round(self.seconds[t], 2)] for t in slowest]}
        rules: dict[str, list[Bucket]] = {}
        for (rule, bucket), ways in verdicts.items():
            rules.setdefault(rule, []).append(Bucket(dataclasses.asdict(bucket), len(self.probes[rule, bucket]), ways))
        created = datetime.datetime.now().isoformat(timespec="seconds")
        return Profile(self.backend.device, self.backend.kind, mx.__version__, created,
                       {rule: tuple(buckets) for rule, buckets in rules.items()}, notes)
