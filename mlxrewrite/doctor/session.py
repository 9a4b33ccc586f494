"""One doctor run: plan the rules' tasks, take out what an earlier run measured, run the rest most important
first within the time budget (in process or in a child), write the profile as it goes, and return it."""

from __future__ import annotations

import time
from collections import deque
from typing import Callable, Iterator, Sequence

from ..backends.device import Profile, device_backend, profile_path, write_profile
from . import jit_cache
from .executors import Executor, InProcess, Isolated
from .kernels import Kernels
from .probes import ROUTES, Grid, Task, default_grids, plan
from .progress import Progress
from .resume import Earlier, earlier_run
from .tally import Tally

BUDGET_S = 50.0  # what is left when this is spent stays "not measured"
REPORT_SHARE = 0.2  # of the budget held back for what no route reads (SDPA, gather_qmm, most as-shipped calls)
CHECKPOINT_S = 10.0  # while measuring, the profile is written at least this often (when it is saved at all)


def schedule(tasks: list[Task], clock: Callable[[], float], end: float, budget_s: float) -> Iterator[Task]:
    """The tasks to run, in order, while time is left: what the routes read until (1 - REPORT_SHARE) of the
    budget is spent, then what is only reported (by priority), then the rest of what the routes read."""
    routed = deque(t for t in tasks if t.priority == ROUTES)
    reported = deque(sorted((t for t in tasks if t.priority != ROUTES), key=lambda t: t.priority))
    for queue, until in ((routed, end - budget_s * REPORT_SHARE), (reported, end), (routed, end)):
        while queue and clock() < until:
            yield queue.popleft()


def run(*, quick: bool = False, grids: Sequence[Grid] | None = None, kernels: Kernels | None = None,
        save: bool = True, progress: bool = True, budget_s: float = BUDGET_S, seed: int = 0,
        isolate: bool | None = None, fresh: bool = False, clock: Callable[[], float] = time.monotonic) -> Profile:
    """Measure for at most `budget_s` seconds, most important first, build the profile, and (save=True)
    write it where `Backend.current()` will find it, also every CHECKPOINT_S while measuring. `grids`: what
    to probe (default: the grids of the loaded rules' probes, `quick` or for this backend). With save=True a
    cached profile of the same grids and kernels that left something unmeasured is resumed (its verdicts
    kept, only the rest probed), and one that left nothing is returned as it is; `fresh` measures everything
    again. `isolate` runs the probes in a child process (default: on GPUs); `clock` paces the budget (tests
    pass a fake one)."""
    start = clock()
    backend = device_backend()
    grids = default_grids(backend, quick) if grids is None else list(grids)
    name = "+".join(dict.fromkeys(grid.name for grid in grids))
    kernels = kernels or Kernels()
    isolate = backend.kind != "cpu" if isolate is None else isolate
    path = profile_path(backend) if save else None
    earlier = Earlier() if fresh or path is None else earlier_run(backend, name, kernels)
    cache = jit_cache.state(backend)
    tally = Tally(backend, plan(grids, backend), {"grid": name, "kernels": type(kernels).__name__,
                                                  "isolated": isolate, "budget_s": budget_s,
                                                  **({"jit_cache": cache} if cache else {})}, earlier)
    bar = Progress(len(tally.todo), progress)
    if earlier.profile is not None:
        if not tally.todo and earlier.profile.notes.get("finished"):
            bar.note(f"nothing left to measure: {path} was measured completely on {earlier.profile.created}; "
                     "--fresh measures again")
            return earlier.profile
        bar.note(f"resuming: {tally.resumed} of {len(tally.routed)} buckets measured in an earlier run "
                 f"({earlier.profile.created}); --fresh measures all again")
    if cache:
        bar.note(jit_cache.describe(cache))
    executor: Executor = Isolated(kernels, backend, seed, clock) if isolate else InProcess(kernels, backend, seed)
    written = start
    try:
        for task in schedule(tally.todo, clock, start + budget_s, budget_s):
            bar.running(task.label)
            began = clock()
            tally.add(task, executor.execute(task, start + budget_s), clock() - began)
            bar.step(task.label)
            if executor.lost:
                tally.stopped = executor.lost
                break
            if path is not None and clock() - written >= CHECKPOINT_S:
                write_profile(tally.profile(clock() - start, finished=False), path)
                written = clock()
    finally:
        executor.close()
        for grid in grids:
            grid.close()
    profile = tally.profile(clock() - start, finished=True)
    notes = profile.notes
    bar.close(f"{notes['tasks_run']}/{notes['tasks']} tasks in {notes['seconds']:.0f} s; "
              f"{notes['complete_buckets']}/{notes['buckets']} buckets measured"
              + (f" ({notes['stopped']})" if notes["stopped"] else ""))
    if path is not None:
        write_profile(profile, path)
    return profile
