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

On CUDA every new kernel instantiation is JIT-compiled on first use (seconds each), so a run cannot cover
every bucket in a minute. It runs within a time budget, most important first (what mlx-lm decoding hits:
M = 1, then speculative M, at short KV lengths, for head dims 128 and 64; see `Grid._priority`), and records
what it did not reach as not measured: those buckets keep the source-derived policy. On GPUs the probes run
in a child process (`_Isolated`), which is killed at the deadline (a JIT compile cannot be interrupted) and
replaced after a crash; the call as shipped, the one that reads out of bounds on CUDA, runs after everything
the routes need. The profile is also written while measuring, so a crash loses little.

The result is a `policy.Profile`, written to the user's cache (one file per device and MLX version), which
`Backend.current()` hands to the rules. `mlxrewrite.doctor()` is `run()`. The kernels are injectable
(`run(kernels=...)`), so tests can stand in a backend that is wrong, raises or crashes for chosen shapes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import faulthandler
import functools
import itertools
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
import types
from collections import Counter, deque
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Iterator, TextIO, Union

import mlx.core as mx

from . import intercept
from .intercept import Call
from .policy import (ALIGNMENTS, FAILURES, M_BUCKETS, M_LABELS, NOT_MEASURED, OK, ORIGINAL, QMM_REWRITES,
                     ROW_CLASSES, ROW_LABELS, Backend, Measured, Profile, QmmBucket, QmmVerdict, device_backend,
                     load_profile, profile_path, qmm_hazard_applies, qmm_mkn, write_profile)
from .rule import Decision
from .rules import quantized_matmul_broadcast as qmm_rule

N_KV, N_REP = 2, 4  # two kv heads at least: a kernel reading "matrix 0 for every batch" is right with one
PAD = 64  # rows of the cache buffer past the longest view: every probe's cache is a view of it, as in mlx-lm
LARGE_M = 128  # the probe standing for the open-ended last M bucket
TOP_ROWS = 16384  # the probe standing for the open-ended last rows class
DECODE_M = 15  # M up to this: decoding (1) and speculative verification (drafts + 1); above: prefill chunks
LAYOUTS = ("dense", "sliced")  # every way runs on a dense cache (timed) and on a view of a longer buffer
TOLERANCE = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 4e-2}  # of max |reference|; wrong reads give ~1
BUDGET_S = 50.0  # what is left when this is spent stays "not measured"
REPORT_SHARE = 0.2  # of the budget held back for what no route reads (SDPA, gather_qmm, most as-shipped calls)
CHECKPOINT_S = 10.0  # while measuring, the profile is written at least this often (when it is saved at all)
WATCHDOG_S = 300  # past the budget, the command ends with a traceback if an in-process kernel hangs
# CUDA's sticky errors: after one the context is lost, and every later call in the process fails
FATAL = re.compile(r"illegal memory access|illegal instruction|misaligned address|unspecified launch failure|"
                   r"hardware stack error|device-side assert", re.IGNORECASE)


class Kernels:
    """The MLX kernels under test. Probes reach MLX only through these (the rule's rewrites included), so a
    test double can make chosen shapes wrong or unsupported."""

    def quantized_matmul(self, x: mx.array, w: mx.array, scales: mx.array, biases: mx.array | None = None,
                         **params: Any) -> mx.array:
        return intercept.original("quantized_matmul")(x, w, scales, biases, **params)

    def scaled_dot_product_attention(self, q: mx.array, k: mx.array, v: mx.array, **params: Any) -> mx.array:
        return intercept.original("scaled_dot_product_attention")(q, k, v, **params)

    def gather_qmm(self, x: mx.array, w: mx.array, scales: mx.array, biases: mx.array | None = None,
                   **params: Any) -> mx.array:
        return mx.gather_qmm(x, w, scales, biases, **params)


class _KernelCall(Call):
    """A quantized_matmul call whose "original" is the kernel under test, so the rule's rewrites run on it."""

    __slots__ = ("kernels",)

    def __init__(self, operands: dict[str, mx.array], params: dict[str, Any], kernels: Kernels):
        super().__init__("quantized_matmul", operands, params)
        self.kernels = kernels

    def run_original(self, **overrides: Any) -> mx.array:
        return self.kernels.quantized_matmul(**{**self.operands, **self.params, **overrides})


# ---- what to probe, in which order ---------------------------------------------------------------------

def probe_rows(classes: int) -> tuple[int, ...]:
    """Rows probing the first `classes` rows classes: each class's top, once per alignment class."""
    tops = [bound or TOP_ROWS for bound in ROW_CLASSES[:classes]]
    return tuple(top if align == ALIGNMENTS[0] else top - align for top in tops for align in ALIGNMENTS)


@dataclass(frozen=True)
class QmmProbe:
    """One broadcast quantized_matmul: x (1, N_KV, N_REP, m, K) against a cache (1, N_KV, 1, rows, d)."""

    dtype: str
    bits: int
    group_size: int
    transpose: bool
    m: int
    rows: int
    d: int

    @property
    def params(self) -> dict[str, Any]:
        return {"transpose": self.transpose, "group_size": self.group_size, "bits": self.bits, "mode": "affine"}

    @property
    def x_shape(self) -> tuple[int, ...]:
        return 1, N_KV, N_REP, self.m, self.d if self.transpose else self.rows

    @property
    def w_shape(self) -> tuple[int, int]:
        return self.rows, self.d * self.bits // 32

    @property
    def bucket(self) -> QmmBucket:
        return QmmBucket.of(self.dtype, self.x_shape, self.w_shape, self.params)

    def hazardous(self, backend: Backend) -> bool:
        """Do the source facts say the call as shipped goes wrong here (else a route may leave it alone)?"""
        return qmm_hazard_applies(backend, *qmm_mkn(self.x_shape, self.w_shape, self.params), self.transpose)[0]


@dataclass(frozen=True)
class Grid:
    """Which probes a run makes: every bucket of dtypes x bits x group sizes x head dims x transposes x the
    first `m_buckets` M buckets x `rows`, each probed at both ends of its M range; `qmm_probes` orders them."""

    name: str
    dtypes: tuple[str, ...]
    bits: tuple[int, ...]
    m_buckets: int
    rows: tuple[int, ...]
    d: tuple[int, ...] = (128, 64)  # head dims (the weights' other dim): kernels differ by it
    late_d: tuple[int, ...] = ()  # head dims probed after everything else
    group_sizes: tuple[int, ...] = (64,)
    iters: int = 3  # timed runs per way (median), after the run that checks it
    sdpa: tuple[tuple[int, int, int], ...] = ((64, 1, 1024),)  # (head dim, queries, keys)
    gather_m: tuple[int, ...] = (1, 2)

    def qmm_probes(self) -> list[QmmProbe]:
        """Every probe of the grid, most important first."""
        probes = [QmmProbe(dtype, bits, group, transpose, m, rows, d)
                  for dtype, bits, group, d, transpose, rows in itertools.product(
                      self.dtypes, self.bits, self.group_sizes, self.d + self.late_d, (True, False), self.rows)
                  for low, high in M_BUCKETS[:self.m_buckets] for m in sorted({low, high or LARGE_M})]
        return sorted(probes, key=self._priority)

    def _priority(self, probe: QmmProbe) -> tuple:
        """What mlx-lm decoding hits comes first: head dims `d` before `late_d`; decode and speculative M (up to
        DECODE_M) before prefill; short KV lengths before long ones (a kernel's first failure shows at any
        length); then by M bucket, and the grid's own order of dtypes, bits, group sizes and head dims; scores
        (transpose) before values; each alignment. So on a GPU, where each new kernel costs a JIT compile,
        the buckets a decode loop crosses are measured first."""
        bucket = probe.bucket
        m_bucket = M_LABELS.index(bucket.m)
        return (probe.d in self.late_d, M_BUCKETS[m_bucket][0] > DECODE_M, ROW_LABELS.index(bucket.rows), m_bucket,
                self.dtypes.index(probe.dtype), self.bits.index(probe.bits), self.group_sizes.index(probe.group_size),
                (self.d + self.late_d).index(probe.d), not probe.transpose, self.rows.index(probe.rows), probe.m)


def grid_for(backend: Backend, quick: bool = False) -> Grid:
    """GPUs: every bucket in float16 and bfloat16 with 8 and 4 bits for head dims 128 and 64, then 256, as far
    as the budget goes. CPU: float32 only (its fp16 quantized matmul is 10-60x slower), short rows and small M,
    to stay well inside a minute. Quick: a few buckets, for a smoke test."""
    native = "float32" if backend.kind == "cpu" else "float16"
    if quick:
        return Grid("quick", (native,), (8,), m_buckets=2, rows=(2048, 2047), iters=2)
    if backend.kind == "cpu":
        return Grid("cpu", (native,), (8, 4), m_buckets=3, rows=probe_rows(1), sdpa=((64, 1, 1024), (128, 1, 4096)))
    return Grid("gpu", ("float16", "bfloat16"), (8, 4), m_buckets=len(M_BUCKETS), rows=probe_rows(len(ROW_CLASSES)),
                late_d=(256,), sdpa=((128, 1, 4096), (64, 1, 4096), (128, 8, 4096)), gather_m=(1, 8))


# ---- running one way ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Outcome:
    """One way on one probe and cache layout."""

    error: float | None  # max |out - reference| / max |reference|; None when it raised
    us: float | None  # median time; None when untimed or it raised
    failure: str | None = None
    crashed: bool = False  # it lost the GPU context or the process: nothing after it could run there


Key = Hashable  # names a way within a task: (way, layout) for quantized_matmul, a name otherwise
Announce = Callable[[Key], None]


def _failed(error: BaseException) -> Outcome:
    """Any exception is a verdict on the way: JIT compile errors ("cannot open source file"), "No
    implementation for problem shape", others. CUDA's sticky errors also mean the context is lost."""
    text = " ".join(str(error).split()) or type(error).__name__
    return Outcome(None, None, text[:400], crashed=bool(FATAL.search(text)))


def _seconds(fn: Callable[[], mx.array]) -> float:
    start = time.perf_counter()
    mx.eval(fn())
    mx.synchronize()
    return time.perf_counter() - start


def _scale(reference: mx.array) -> float:
    return max(mx.max(mx.abs(reference)).item(), 1e-30)


def _check(fn: Callable[[], mx.array], reference: mx.array, scale: float) -> Outcome:
    try:
        out = fn()
        return Outcome(mx.max(mx.abs(out.astype(mx.float32) - reference)).item() / scale, None)
    except Exception as error:  # noqa: BLE001 - whatever a kernel raises is what we measure
        return _failed(error)


def _compare(ways: dict[Key, Callable[[], mx.array]], reference: mx.array, scale: float, iters: int,
             announce: Announce) -> dict[Key, Outcome]:
    """Run each way once against the reference (which also warms it up: JIT compiles happen here), then time
    those that ran `iters` times, taking turns, so that drift (clocks, other load) hits them alike. A way that
    loses the context ends the comparison: the ways after it stay unmeasured."""
    outcomes: dict[Key, Outcome] = {}
    for key, fn in ways.items():
        announce(key)
        outcomes[key] = _check(fn, reference, scale)
        if outcomes[key].crashed:
            return outcomes
    ran = [key for key, outcome in outcomes.items() if outcome.failure is None]
    times: dict[Key, list[float]] = {key: [] for key in ran}
    for _ in range(iters):
        for key in ran:
            announce(key)
            times[key].append(_seconds(ways[key]))
    return {key: dataclasses.replace(outcome, us=statistics.median(times[key]) * 1e6) if times.get(key) else outcome
            for key, outcome in outcomes.items()}


@functools.lru_cache(maxsize=4)  # probes come in priority order, which keeps a (dtype, bits, group, d) together
def _kv_buffer(dtype: str, bits: int, group_size: int, d: int, length: int) -> tuple[tuple[mx.array, ...], mx.array]:
    """One quantized cache buffer (w, scales, biases) of shape (1, N_KV, length, .) per (dtype, bits, group size,
    d), shared by every M and rows probed with it, and its dequantized float32 value (the reference's). Each kv
    head is offset by 2, so a kernel reading another head's rows gives an error near 1, not within rounding."""
    values = mx.random.normal((1, N_KV, length, d)) + 2 * mx.arange(N_KV).reshape(1, N_KV, 1, 1)
    quantized = tuple(mx.quantize(values.astype(getattr(mx, dtype)), group_size=group_size, bits=bits))
    reference = mx.dequantize(*quantized, group_size=group_size, bits=bits).astype(mx.float32)
    mx.eval(quantized, reference)
    return quantized, reference


def _way(call: _KernelCall, name: str, params: dict[str, Any]) -> Callable[[], mx.array]:
    """The call as shipped, or one of the rule's rewrites forced on it."""
    if name == ORIGINAL:
        return call.run_original
    return functools.partial(qmm_rule.RULE.apply, call, Decision(qmm_rule.NAME, name, "doctor", params))


# ---- tasks: what a run does, one step at a time ------------------------------------------------------------

@dataclass(frozen=True)
class QmmTask:
    """Some ways of one probe, on a dense cache (timed) and a sliced one (as mlx-lm's caches are), sharing x
    and the reference. The cache is a view of a buffer of `buffer_rows` rows (`_kv_buffer`). A rewrite that
    failed on the dense cache is not run again on the sliced one: its verdict cannot get better, and a failed
    JIT compile is not cached, so it would cost its time again. The call as shipped runs on both (the table
    reports both ways it goes wrong)."""

    probe: QmmProbe
    ways: tuple[str, ...]
    buffer_rows: int

    @property
    def for_routes(self) -> bool:
        """Does a route read what this task measures? The rewrites, yes; `plan` runs the call as shipped alone
        only where no route reads it."""
        return self.ways != (ORIGINAL,)

    @property
    def label(self) -> str:
        p = self.probe
        ways = " as shipped" if self.ways == (ORIGINAL,) else ""
        return f"qmm {p.dtype} {p.bits}-bit g{p.group_size} d={p.d} T={p.transpose:d} M={p.m} rows={p.rows}{ways}"

    def execute(self, kernels: Kernels, backend: Backend, iters: int, announce: Announce) -> dict[Key, Outcome]:
        p = self.probe
        buffer, dequantized = _kv_buffer(p.dtype, p.bits, p.group_size, p.d, self.buffer_rows)
        sliced = [a[:, :, :p.rows] for a in buffer]
        dense = [mx.contiguous(a) for a in sliced]
        deq = mx.expand_dims(dequantized[:, :, :p.rows], -3)
        x = mx.random.normal(p.x_shape).astype(getattr(mx, p.dtype))
        reference = x.astype(mx.float32) @ (mx.swapaxes(deq, -1, -2) if p.transpose else deq)
        mx.eval(x, reference, dense)
        scale = _scale(reference)
        params = qmm_rule.rewrite_params(reference.shape[:-2], {k: (2,) for k in qmm_rule.WEIGHTS}, backend)
        outcomes: dict[Key, Outcome] = {}
        for layout, weights, timed in zip(LAYOUTS, (dense, sliced), (iters, 0)):
            operands = dict(zip(("x", "w", "scales", "biases"), (x, *(mx.expand_dims(a, -3) for a in weights))))
            call = _KernelCall(operands, p.params, kernels)
            failed = {name for (name, _), o in outcomes.items() if o.failure or o.error > TOLERANCE[p.dtype]}
            ways = {(name, layout): _way(call, name, params) for name in self.ways
                    if name == ORIGINAL or name not in failed}
            outcomes.update(_compare(ways, reference, scale, timed, announce))
            if any(outcome.crashed for outcome in outcomes.values()):
                break
        return outcomes


def _first_failure(outcomes: Iterable[Outcome]) -> Outcome | None:
    """The crash if there was one (it explains what came after it), else the first failure."""
    failed = [o for o in outcomes if o.failure]
    return next((o for o in failed if o.crashed), failed[0] if failed else None)


@dataclass(frozen=True)
class SdpaTask:
    """mask=None against an all-True bool mask: the same attention, so equal up to rounding; and the cost."""

    dtype: str
    d: int
    queries: int
    keys: int
    for_routes = False

    @property
    def label(self) -> str:
        return f"sdpa d={self.d} L={self.queries} N={self.keys}"

    def execute(self, kernels: Kernels, backend: Backend, iters: int, announce: Announce) -> dict[Key, Outcome]:
        q, k, v = (mx.random.normal(shape).astype(getattr(mx, self.dtype)) for shape in (
            (1, N_KV * N_REP, self.queries, self.d), (1, N_KV, self.keys, self.d), (1, N_KV, self.keys, self.d)))
        mask = mx.ones((1, 1, self.queries, self.keys), dtype=mx.bool_)
        plain = functools.partial(kernels.scaled_dot_product_attention, q, k, v, scale=self.d ** -0.5, mask=None)
        masked = functools.partial(kernels.scaled_dot_product_attention, q, k, v, scale=self.d ** -0.5, mask=mask)
        announce("none")
        try:
            reference = plain().astype(mx.float32)
            scale = _scale(reference)
        except Exception as error:  # noqa: BLE001 - as in _check
            return {"none": _failed(error)}
        return _compare({"none": plain, "mask": masked}, reference, scale, iters, announce)

    def row(self, outcomes: dict[Key, Outcome] | None) -> dict[str, Any]:
        row: dict[str, Any] = {"dtype": self.dtype, "d": self.d, "queries": self.queries, "keys": self.keys}
        failed = _first_failure((outcomes or {}).values())
        if failed is not None:
            return {**row, "status": "crashed" if failed.crashed else "unsupported", "error": failed.failure}
        if not outcomes or "mask" not in outcomes:
            return {**row, "status": NOT_MEASURED}
        none, mask = outcomes["none"], outcomes["mask"]
        return {**row, "status": "equal" if mask.error <= TOLERANCE[self.dtype] else "differ", "max_diff": mask.error,
                "none_us": none.us, "mask_us": mask.us, "mask_over_none": mask.us / none.us}


@dataclass(frozen=True)
class GatherTask:
    """gather_qmm where one index per batch row is broadcast across the next batch dim."""

    dtype: str
    m: int
    d: int
    for_routes = False

    @property
    def label(self) -> str:
        return f"gather_qmm M={self.m} d={self.d}"

    def execute(self, kernels: Kernels, backend: Backend, iters: int, announce: Announce) -> dict[Key, Outcome]:
        values = mx.random.normal((8, 512, self.d)).astype(getattr(mx, self.dtype))
        w, scales, biases = mx.quantize(values, group_size=64, bits=4)
        deq = mx.dequantize(w, scales, biases, group_size=64, bits=4).astype(mx.float32)
        x = mx.random.normal((3, 4, self.m, self.d)).astype(getattr(mx, self.dtype))
        indices = mx.array([[1], [5], [7]])  # (3, 1) against x's batch (3, 4)
        reference = x.astype(mx.float32) @ mx.expand_dims(deq[indices[:, 0]], 1).swapaxes(-1, -2)
        gather = functools.partial(kernels.gather_qmm, x, w, scales, biases, rhs_indices=indices, transpose=True,
                                   group_size=64, bits=4)
        return _compare({"gather_qmm": gather}, reference, _scale(reference), iters, announce)

    def row(self, outcomes: dict[Key, Outcome] | None) -> dict[str, Any]:
        measured = _measured(list((outcomes or {}).values()), 1, TOLERANCE[self.dtype])
        return {"dtype": self.dtype, "m": self.m, "d": self.d, "status": measured.status,
                "max_error": measured.max_error, "us": measured.us, "error": measured.error}


Task = Union[QmmTask, SdpaTask, GatherTask]


def plan(grid: Grid, backend: Backend) -> list[Task]:
    """Every task of a run, most important first: the probes the routes read (the rewrites, and the call as
    shipped where the source facts call it right, so a route may leave it), then SDPA, then the call as shipped
    where it is only reported (it is the one that reads out of bounds on CUDA, so it comes late), then
    gather_qmm."""
    probes = grid.qmm_probes()
    rows = max(grid.rows) + PAD
    may_leave = {p.bucket for p in probes if not p.hazardous(backend)}
    routed = [QmmTask(p, QMM_REWRITES + ((ORIGINAL,) if p.bucket in may_leave else ()), rows) for p in probes]
    shipped = [QmmTask(p, (ORIGINAL,), rows) for p in probes if p.bucket not in may_leave]
    return [*routed, *(SdpaTask(grid.dtypes[0], *shape) for shape in grid.sdpa), *shipped,
            *(GatherTask(grid.dtypes[0], m, grid.d[0]) for m in grid.gather_m)]


def _measured(outcomes: list[Outcome], expected: int, tolerance: float) -> Measured:
    """One way over a bucket's probes: the failures seen (one probe is enough), else ok if all `expected`
    outcomes came in, else not measured."""
    errors = [o.error for o in outcomes if o.error is not None]
    times = [o.us for o in outcomes if o.us is not None]
    flags = {"wrong": any(e > tolerance for e in errors), "crashed": any(o.crashed for o in outcomes),
             "unsupported": any(o.failure and not o.crashed for o in outcomes)}
    failed = _first_failure(outcomes)
    status = ", ".join(name for name in FAILURES if flags[name]) or (OK if len(outcomes) >= expected else NOT_MEASURED)
    return Measured(status, max(errors, default=None), statistics.mean(times) if times else None,
                    failed.failure if failed else None)


# ---- where tasks run ----------------------------------------------------------------------------------------

def _ignore(_key: Key) -> None:
    """In-process, nothing needs to know which way is running."""


class _InProcess:
    """Runs tasks in this process (CPU, or kernels injected by tests). A task that hangs cannot be stopped
    (the command's watchdog ends the process), and a lost GPU context ends the run (`lost`)."""

    def __init__(self, kernels: Kernels, backend: Backend, iters: int, seed: int):
        self.kernels, self.backend, self.iters = kernels, backend, iters
        self.lost: str | None = None
        mx.random.seed(seed)

    def execute(self, task: Task, deadline: float) -> dict[Key, Outcome]:
        """Runs `task` to its end: in-process, a deadline cannot be enforced."""
        outcomes = task.execute(self.kernels, self.backend, self.iters, _ignore)
        crashed = next((o for o in outcomes.values() if o.crashed), None)
        if crashed is not None:
            self.lost = f"stopped after {task.label}: {crashed.failure}"
        return outcomes

    def close(self) -> None:
        _kv_buffer.cache_clear()


def serve(fd: int) -> None:
    """The child process of `_Isolated` (started as `python -c`, so that a user's script is not run again, as
    multiprocessing's spawn would): takes its setup from the parent, then runs tasks as they come, naming each
    way before it runs so that a crash is pinned on the way that caused it. It ends itself once a way has lost
    the GPU context."""
    conn = Connection(fd)
    kernels, backend, iters, seed = conn.recv()
    mx.random.seed(seed)
    while (task := conn.recv()) is not None:
        outcomes = task.execute(kernels, backend, iters, lambda key: conn.send(("running", key)))
        conn.send(("done", outcomes))
        if any(o.crashed for o in outcomes.values()):
            return


class _Isolated:
    """Runs tasks in a child process (GPUs). A task still running at the deadline, such as a long JIT
    compile, is killed; a way that crashes the process (an abort after CUDA's illegal memory access) costs only
    itself, and the next task gets a new process. Only a process that dies outside any kernel call ends the
    run (`lost`): starting another would likely fail the same way."""

    def __init__(self, kernels: Kernels, backend: Backend, iters: int, seed: int, clock: Callable[[], float]):
        self.setup, self.clock = (kernels, backend, iters, seed), clock
        self.process: subprocess.Popen | None = None
        self.conn: Connection | None = None
        self.lost: str | None = None

    def _start(self) -> None:
        ours, theirs = socket.socketpair()
        with theirs:
            self.process = subprocess.Popen(  # the parent's sys.path: its kernels (a test's fake too) unpickle
                [sys.executable, "-c", f"from mlxrewrite.doctor import serve; serve({theirs.fileno()})"],
                pass_fds=(theirs.fileno(),), env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        self.conn = Connection(ours.detach())
        self.conn.send(self.setup)

    def execute(self, task: Task, deadline: float) -> dict[Key, Outcome]:
        running: Key | None = None
        try:
            if self.process is None:
                self._start()
            self.conn.send(task)
            while self.conn.poll(max(0.0, deadline - self.clock())):
                kind, value = self.conn.recv()
                if kind == "done":
                    if any(o.crashed for o in value.values()):
                        self.close()
                    return value
                running = value
        except (EOFError, OSError):  # the process died
            return self._died(running)
        self.close(kill=True)  # past the deadline: the task's ways stay unmeasured
        return {}

    def _died(self, running: Key | None) -> dict[Key, Outcome]:
        code = self.process.wait()
        self.close()
        if running is None:
            self.lost = f"the doctor's worker process died outside any kernel call (exit code {code})"
            return {}
        return {running: Outcome(None, None, f"the process running it died (exit code {code})", crashed=True)}

    def close(self, kill: bool = False) -> None:
        if self.process is None:
            return
        if not kill:
            with contextlib.suppress(OSError):
                self.conn.send(None)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(5)
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.conn.close()
        self.process = self.conn = None


# ---- the run -------------------------------------------------------------------------------------------------

def _schedule(tasks: list[Task], clock: Callable[[], float], end: float, budget_s: float) -> Iterator[Task]:
    """The tasks to run, in order, while time is left: what the routes read until (1 - REPORT_SHARE) of the
    budget is spent, then what is only reported, then the rest of what the routes read."""
    routed = deque(t for t in tasks if t.for_routes)
    reported = deque(t for t in tasks if not t.for_routes)
    for queue, until in ((routed, end - budget_s * REPORT_SHARE), (reported, end), (routed, end)):
        while queue and clock() < until:
            yield queue.popleft()


class _Tally:
    """What the tasks found so far, and the profile it makes: every bucket of the grid, measured or not."""

    def __init__(self, backend: Backend, tasks: list[Task], notes: dict[str, Any]):
        self.backend, self.tasks, self.notes = backend, tasks, notes
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
        return {bucket: QmmVerdict(bucket, n, {name: _measured(o, n * len(LAYOUTS), TOLERANCE[bucket.dtype])
                                               for name, o in found[bucket].items()})
                for bucket, n in self.probes.items()}

    def profile(self, seconds: float, finished: bool) -> Profile:
        verdicts = self.verdicts()
        ran = [t for t in self.tasks if self.found.get(t)]
        unmeasured = sum(all(m.status == NOT_MEASURED for m in v.ways.values()) for v in verdicts.values())
        slowest = sorted(self.seconds, key=self.seconds.__getitem__, reverse=True)[:5]
        stopped = self.stopped or (f"time budget ({self.notes['budget_s']:g} s) spent"
                                   if finished and len(ran) < len(self.tasks) else None)
        notes = {**self.notes, "seconds": round(seconds, 1), "finished": finished, "stopped": stopped,
                 "tasks": len(self.tasks), "tasks_run": len(ran),
                 "buckets": len(verdicts), "complete_buckets": sum(v.complete for v in verdicts.values()),
                 "unmeasured_buckets": unmeasured,
                 "slowest": [[t.label, round(self.seconds[t], 2)] for t in slowest],
                 "sdpa": [t.row(self.found.get(t)) for t in self.tasks if isinstance(t, SdpaTask)],
                 "gather_qmm": [t.row(self.found.get(t)) for t in self.tasks if isinstance(t, GatherTask)]}
        created = datetime.datetime.now().isoformat(timespec="seconds")
        return Profile(self.backend.device, self.backend.kind, mx.__version__, created, verdicts, notes)


class Progress:
    """A progress bar on stderr: redrawn in place on a terminal, naming the task in flight (a long JIT compile
    shows which); one line per tenth otherwise (logs)."""

    def __init__(self, total: int, enabled: bool = True, stream: TextIO | None = None):
        self.total, self.done, self.enabled, self.stream = max(total, 1), 0, enabled, stream or sys.stderr
        self.start = time.perf_counter()
        self.live = enabled and self.stream.isatty()

    def _draw(self, label: str) -> None:
        filled = 30 * self.done // self.total
        line = (f"doctor [{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} "
                f"{time.perf_counter() - self.start:4.0f}s {label}")
        self.stream.write(f"\r{line:<110}" if self.live else line + "\n")
        self.stream.flush()

    def running(self, label: str) -> None:
        if self.live:
            self._draw(label)

    def step(self, label: str) -> None:
        self.done += 1
        if self.enabled and (self.live or self.done * 10 // self.total != (self.done - 1) * 10 // self.total):
            self._draw(label)

    def close(self, summary: str) -> None:
        if self.enabled:
            self.stream.write(("\n" if self.live else "") + f"doctor: {summary}\n")
            self.stream.flush()


def run(*, quick: bool = False, grid: Grid | None = None, kernels: Kernels | None = None, save: bool = True,
        progress: bool = True, budget_s: float = BUDGET_S, seed: int = 0, isolate: bool | None = None,
        clock: Callable[[], float] = time.monotonic) -> Profile:
    """Measure for at most `budget_s` seconds, most important first, build the profile, and (save=True)
    write it where `Backend.current()` will find it, also every CHECKPOINT_S while measuring. `isolate` runs
    the probes in a child process (default: on GPUs); `clock` paces the budget (tests pass a fake one)."""
    start = clock()
    backend = device_backend()
    grid = grid or grid_for(backend, quick)
    kernels = kernels or Kernels()
    isolate = backend.kind != "cpu" if isolate is None else isolate
    tasks = plan(grid, backend)
    tally = _Tally(backend, tasks, {"grid": grid.name, "kernels": type(kernels).__name__, "isolated": isolate,
                                    "budget_s": budget_s})
    path = profile_path(backend) if save else None
    bar = Progress(len(tasks), progress)
    executor = (_Isolated(kernels, backend, grid.iters, seed, clock) if isolate
                else _InProcess(kernels, backend, grid.iters, seed))
    written = start
    try:
        for task in _schedule(tasks, clock, start + budget_s, budget_s):
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
    profile = tally.profile(clock() - start, finished=True)
    notes = profile.notes
    bar.close(f"{notes['tasks_run']}/{notes['tasks']} tasks in {notes['seconds']:.0f} s; "
              f"{notes['complete_buckets']}/{notes['buckets']} buckets measured"
              + (f" ({notes['stopped']})" if notes["stopped"] else ""))
    if path is not None:
        write_profile(profile, path)
    return profile


# ---- the table ---------------------------------------------------------------------------------------------

def _time_text(values: Iterable[float | None]) -> str:
    known = sorted(v for v in values if v is not None)
    if not known:
        return ""
    low, high = f"{known[0]:.0f}", f"{known[-1]:.0f}"
    return f" {low} us" if low == high else f" {low}-{high} us"


class _Footnotes:
    """Each distinct error message once, numbered, under the tables."""

    def __init__(self) -> None:
        self.numbers: dict[str, int] = {}

    def ref(self, error: str | None) -> str:
        return "" if error is None else f" [{self.numbers.setdefault(error, len(self.numbers) + 1)}]"

    def lines(self) -> list[str]:
        return ["", "## Errors", "", *(f"[{n}] {error}" for error, n in self.numbers.items())] if self.numbers else []


def _cell(measured: list[Measured], notes: _Footnotes) -> str:
    status = measured[0].status
    if status in (OK, NOT_MEASURED):
        return status + _time_text(m.us for m in measured)
    error = max((m.max_error for m in measured if m.max_error is not None), default=None)
    shown = f" {error:.0e}" if "wrong" in status and error is not None else ""
    return f"**{status.upper()}**{shown}{notes.ref(next((m.error for m in measured if m.error), None))}"


def _measured_at_all(verdict: QmmVerdict) -> bool:
    return any(m.status != NOT_MEASURED for m in verdict.ways.values())


def _table_order(verdict: QmmVerdict) -> tuple:
    b = verdict.bucket
    return b.dtype, b.bits, b.group_size, b.d, not b.transpose, M_LABELS.index(b.m), ROW_LABELS.index(b.rows), -b.align


def _qmm_lines(profile: Profile, notes: _Footnotes) -> list[str]:
    """One line per measured bucket, except that buckets differing only in rows share a line when every way
    has the same status and the same rewrite is chosen in each. A rewrite marked * comes from the source
    policy less the kernel family's failures, as not every rewrite of the bucket was measured."""
    names = (ORIGINAL, *QMM_REWRITES)
    groups: dict[tuple, list[QmmVerdict]] = {}
    for verdict in sorted(filter(_measured_at_all, profile.qmm.values()), key=_table_order):
        b = verdict.bucket
        groups.setdefault((b.dtype, b.bits, b.group_size, b.transpose, b.m, b.d), []).append(verdict)
    lines = ["| dtype | bits/group | transpose | M | d | rows | as shipped | fold | copy | dequantize | rewrite |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (dtype, bits, group, transpose, m, d), verdicts in groups.items():
        chosen = {v.bucket: profile.hazard_ways(v.bucket)[0][0] + ("" if v.complete else "*") for v in verdicts}
        signature = {(tuple(v.ways[n].status for n in names), chosen[v.bucket]) for v in verdicts}
        for part in [[v] for v in verdicts] if len(signature) > 1 else [verdicts]:
            rows = f"{part[0].bucket.rows} %{part[0].bucket.align}" if len(part) == 1 else f"all {len(part)} classes"
            cells = [_cell([v.ways[n] for v in part], notes) for n in names]
            lines.append(f"| {dtype} | {bits}/{group} | {transpose} | {m} | {d} | {rows} | {' | '.join(cells)} "
                         f"| {chosen[part[0].bucket]} |")
    return lines


def _unmeasured_lines(profile: Profile) -> list[str]:
    """The buckets not measured at all, by kernel family: which M buckets, how many of the family's buckets."""
    families: dict[tuple, list[QmmVerdict]] = {}
    for verdict in sorted(profile.qmm.values(), key=_table_order):
        families.setdefault(verdict.bucket.family, []).append(verdict)
    lines = []
    for (dtype, _mode, bits, group, transpose, d), verdicts in families.items():
        missing = [v for v in verdicts if not _measured_at_all(v)]
        if missing:
            m_labels = ", ".join(dict.fromkeys(v.bucket.m for v in missing))
            lines.append(f"| {dtype} | {bits}/{group} | {transpose} | {d} | {len(missing)} of {len(verdicts)} | "
                         f"{m_labels} |")
    if not lines:
        return []
    return ["", "### Not measured (the time budget ran out first)", "",
            "These keep the source-derived policy (fold, else copy), less any rewrite that failed in a measured "
            "bucket of the same dtype, bits, group, transpose and d.", "",
            "| dtype | bits/group | transpose | d | buckets | M |", "|---|---|---|---|---|---|", *lines]


def _summary(profile: Profile) -> list[str]:
    notes = profile.notes
    verdicts = list(profile.qmm.values())
    stopped = f" Stopped: {notes['stopped']}." if notes.get("stopped") else ""
    partial = "" if notes.get("finished", True) else (
        " **This profile is partial: the run that wrote it did not finish (it was interrupted or crashed).**")
    slowest = "; ".join(f"{label} {seconds:.1f} s" for label, seconds in notes.get("slowest", []))
    return [f"Grid `{notes.get('grid')}` (kernels: {notes.get('kernels')}, "
            f"{'in a child process' if notes.get('isolated') else 'in process'}), {notes.get('seconds')} s of a "
            f"{notes.get('budget_s', BUDGET_S):g} s budget, {notes.get('tasks_run')}/{notes.get('tasks')} tasks. "
            f"Buckets: {notes.get('complete_buckets')} measured, {notes.get('unmeasured_buckets')} not measured, "
            f"{len(verdicts) - notes.get('complete_buckets', 0) - notes.get('unmeasured_buckets', 0)} in part."
            f"{stopped}{partial}", "", f"Slowest tasks (first runs include JIT compiles): {slowest}."]


_QMM_LEGEND = (
    "The rewrite column is what the rule runs on a hazardous call (the fastest correct rewrite, then "
    "dequantize); a call is left as shipped only where it measured ok and MLX's source facts (policy.py) call it "
    "right too. Rows: the weights' rows (the KV length) by size class, then %A: a multiple of A (1: neither 8 nor "
    "128). Cells: status, then max error relative to max |reference| (wrong) or median time (ok; a range over the "
    "buckets a line stands for), and [n]: the error under the tables. A bucket is wrong or unsupported if any of "
    "its probes was (M at both ends of its range; dense and sliced caches). *: not every rewrite of the bucket was "
    "measured.")


def render(profile: Profile) -> str:
    """The profile as a markdown report: what is wrong, unsupported, crashed or not measured, and what the
    rules choose, per bucket."""
    notes = profile.notes
    footnotes = _Footnotes()
    measured = [v for v in profile.qmm.values() if _measured_at_all(v)]
    shipped = [v.ways[ORIGINAL].status for v in measured if v.ways[ORIGINAL].status != NOT_MEASURED]
    lines = [f"# mlxrewrite doctor: {profile.backend} {profile.device!r}, MLX {profile.mlx}, {profile.created}", "",
             *_summary(profile), "",
             "## quantized_matmul with broadcast weight batch dims (GQA quantized KV cache)", "",
             f"As shipped (measured in {len(shipped)} of the {len(measured)} buckets shown): wrong in "
             f"{sum('wrong' in s for s in shipped)}, unsupported in {sum('unsupported' in s for s in shipped)}, "
             f"crashed in {sum('crashed' in s for s in shipped)}. {_QMM_LEGEND}", ""]
    lines += _qmm_lines(profile, footnotes) + _unmeasured_lines(profile)
    lines += ["", "## scaled_dot_product_attention: all-True mask vs mask=None", "",
              "| dtype | d | queries | keys | status | max diff | None us | mask us | mask / None |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in notes.get("sdpa", []):
        timed = (f"{r['max_diff']:.0e} | {r['none_us']:.0f} | {r['mask_us']:.0f} | {r['mask_over_none']:.2f}x"
                 if "mask_us" in r else f"{footnotes.ref(r.get('error')).strip()} | | |")
        lines.append(f"| {r['dtype']} | {r['d']} | {r['queries']} | {r['keys']} | {r['status']} | {timed} |")
    lines += ["", "## gather_qmm with broadcast indices (reported only)", "",
              "| dtype | M | d | status | max error | us |", "|---|---|---|---|---|---|"]
    for r in notes.get("gather_qmm", []):
        error = "" if r["max_error"] is None else f"{r['max_error']:.0e}"
        timed = "" if r["us"] is None else f"{r['us']:.0f}"
        lines.append(f"| {r['dtype']} | {r['m']} | {r['d']} | {r['status']}{footnotes.ref(r['error'])} | {error} "
                     f"| {timed} |")
    return "\n".join(lines + footnotes.lines())


# ---- command line --------------------------------------------------------------------------------------------

def command(args: argparse.Namespace) -> int:
    """`mlxrewrite doctor`: measure (or --show the cached profile), print the table or JSON; exit 0."""
    if args.show:
        profile = load_profile(device_backend())
        if profile is None:
            where = profile_path(device_backend()) or "MLXREWRITE_PROFILE=off"
            print(f"mlxrewrite: no profile for this device ({where}); run `mlxrewrite doctor`", file=sys.stderr)
            return 0
    else:
        budget_s = BUDGET_S if args.budget is None else args.budget
        faulthandler.dump_traceback_later(budget_s + WATCHDOG_S, exit=True, file=sys.__stderr__)
        try:
            profile = run(quick=args.quick, save=not args.no_cache, budget_s=budget_s)
        finally:
            faulthandler.cancel_dump_traceback_later()
    if args.out:
        Path(args.out).write_text(json.dumps(profile.to_dict(), indent=1))
    print(json.dumps(profile.to_dict(), indent=1) if args.json else render(profile))
    return 0


class _CallableModule(types.ModuleType):
    """`mlxrewrite.doctor()` runs the doctor while `mlxrewrite.doctor.run`, `.Kernels`, ... stay reachable:
    a function named like its module would shadow the module."""

    def __call__(self, **options: Any) -> Profile:
        return run(**options)


sys.modules[__name__].__class__ = _CallableModule
