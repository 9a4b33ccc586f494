"""Running one way (the call as shipped, or a rewrite) against the reference, and judging what it gave: an
error, a time, an exception, a lost context; then one verdict per way over a bucket's probes."""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx

from ..backends.device import FAILURES, NOT_MEASURED, OK, Measured
from ..backends.isolation import STICKY_FAULT, stage

TOLERANCE = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 4e-2}  # of max |reference|; wrong reads give ~1

Key = tuple[str, str]  # an outcome of a task: (way, sample), e.g. ("fold", "sliced")


@dataclass(frozen=True)
class Outcome:
    """One way on one probe and cache layout."""

    error: float | None  # max |out - reference| / max |reference|; None when it raised
    us: float | None  # median time; None when untimed or it raised
    failure: str | None = None
    crashed: bool = False  # it lost the GPU context or the process: nothing after it could run there


def failed(error: BaseException) -> Outcome:
    """Any exception is a verdict on the way: JIT compile errors ("cannot open source file"), "No
    implementation for problem shape", others. CUDA's sticky errors also mean the context is lost."""
    text = " ".join(str(error).split()) or type(error).__name__
    return Outcome(None, None, text[:400], crashed=bool(STICKY_FAULT.search(text)))


def scale_of(reference: mx.array) -> float:
    """What errors are relative to: max |reference|."""
    return max(mx.max(mx.abs(reference)).item(), 1e-30)


def _seconds(fn: Callable[[], mx.array]) -> float:
    start = time.perf_counter()
    mx.eval(fn())
    mx.synchronize()
    return time.perf_counter() - start


def _check(fn: Callable[[], mx.array], reference: mx.array, scale: float) -> Outcome:
    try:
        out = fn()
        return Outcome(mx.max(mx.abs(out.astype(mx.float32) - reference)).item() / scale, None)
    except Exception as error:  # noqa: BLE001 - whatever a kernel raises is what we measure
        return failed(error)


def compare(ways: dict[Key, Callable[[], mx.array]], reference: mx.array, scale: float,
            iters: int) -> dict[Key, Outcome]:
    """Run each way once against the reference (which also warms it up: JIT compiles happen here), then time
    those that ran `iters` times, taking turns, so that drift (clocks, other load) hits them alike. A way that
    loses the context ends the comparison: the ways after it stay unmeasured. Each way is announced as a
    `stage` before it runs, so that in a child process a crash is pinned on the way that caused it."""
    outcomes: dict[Key, Outcome] = {}
    for key, fn in ways.items():
        stage(key)
        outcomes[key] = _check(fn, reference, scale)
        if outcomes[key].crashed:
            return outcomes
    ran = [key for key, outcome in outcomes.items() if outcome.failure is None]
    times: dict[Key, list[float]] = {key: [] for key in ran}
    for _ in range(iters):
        for key in ran:
            stage(key)
            times[key].append(_seconds(ways[key]))
    return {key: dataclasses.replace(outcome, us=statistics.median(times[key]) * 1e6) if times.get(key) else outcome
            for key, outcome in outcomes.items()}


def verdict(outcomes: list[Outcome], expected: int, tolerance: float) -> Measured:
    """One way over a bucket's probes: the failures seen (one probe is enough), else ok if all `expected`
    outcomes came in, else not measured."""
    errors = [o.error for o in outcomes if o.error is not None]
    times = [o.us for o in outcomes if o.us is not None]
    flags = {"wrong": any(e > tolerance for e in errors), "crashed": any(o.crashed for o in outcomes),
             "unsupported": any(o.failure and not o.crashed for o in outcomes)}
    failures = [o for o in outcomes if o.failure]  # the error shown: a crash (it explains what came after it)
    first = next((o for o in failures if o.crashed), failures[0] if failures else None)
    status = ", ".join(name for name in FAILURES if flags[name]) or (OK if len(outcomes) >= expected else NOT_MEASURED)
    return Measured(status, max(errors, default=None), statistics.mean(times) if times else None,
                    first.failure if first else None)
