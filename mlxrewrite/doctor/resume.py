"""Resuming: a run stopped by its budget or cut short keeps what it measured in its profile; the next run of
the same grids with the same kernels, on the same device and MLX version, probes only the rest."""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from typing import Any, Mapping

from ..backends.device import NOT_MEASURED, Backend, Measured, Profile, load_profile
from .kernels import Kernels
from .probes import Task


@functools.lru_cache(maxsize=None)
def bucket_key(bucket: Any) -> str:
    """A rule's bucket (a frozen dataclass) as it is written, in a form that compares across runs."""
    return json.dumps(dataclasses.asdict(bucket), sort_keys=True)


@dataclass(frozen=True)
class Earlier:
    """What an earlier run measured (nothing, for a fresh run): its verdicts stand, its gaps get probed."""

    profile: Profile | None = None

    @functools.cached_property
    def _ways(self) -> dict[tuple[str, str], Mapping[str, Measured]]:
        rules = self.profile.rules if self.profile is not None else {}
        return {(rule, json.dumps(dict(b.key), sort_keys=True)): b.ways for rule, buckets in rules.items()
                for b in buckets}

    def kept(self, rule: str, bucket: Any, way: str) -> Measured | None:
        """The earlier verdict of `way` in `rule`'s `bucket`, if it had one (ok needs every probe; a failure
        needs one)."""
        measured = self._ways.get((rule, bucket_key(bucket)), {}).get(way)
        return measured if measured is not None and measured.status != NOT_MEASURED else None

    def remaining(self, task: Task) -> Task | None:
        """`task` less the ways measured before (the same task when none was); None when nothing is left. A
        way measured in part (some probes of its bucket) runs again on every probe: outcomes are not kept."""
        ways = tuple(w for w in task.ways if self.kept(task.rule, task.bucket, w) is None)
        return task if ways == task.ways else dataclasses.replace(task, ways=ways) if ways else None


def earlier_run(backend: Backend, grid: str, kernels: Kernels) -> Earlier:
    """The cached profile, when a run of these grids with these kernels wrote it (`load_profile` has checked
    the device and MLX version); else nothing."""
    profile = load_profile(backend)
    if profile is None or (profile.notes.get("grid"), profile.notes.get("kernels")) != (grid, type(kernels).__name__):
        return Earlier()
    return Earlier(profile)
