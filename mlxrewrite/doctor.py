"""`mlxrewrite doctor`: a differential self-test of the running MLX backend, and the profile the rules read.

The same pattern is wrong on Metal only for small M >= 2 and long rows, wrong on CUDA for every M, unsupported
on CUDA for some shapes, and some MLX release will fix it. So rather than trust facts read from one version's
source, the doctor runs the kernels the rules depend on, here, and compares each with the
dequantize-then-float32 reference:

- quantized_matmul with broadcast weight batch dims (mlx-lm's GQA quantized KV cache), as shipped and with
  each of the rule's rewrites (fold, copy, dequantize: the rule's own functions), over the buckets of
  `policy.QmmBucket`; each bucket is probed at both ends of its M range, at the top of its rows class, on a
  dense and a sliced cache. Verdict per way: ok, wrong, unsupported (it raised), and its time.
- scaled_dot_product_attention with an all-True mask against mask=None: equal? how much slower?
- gather_qmm with broadcast indices: right? (reported only: no rule depends on it yet)

The result is a `policy.Profile`, written to the user's cache (one file per device and MLX version), which
`Backend.current()` hands to the rules. `mlxrewrite.doctor()` is `run()`. The kernels are injectable
(`run(kernels=...)`), so tests can stand in a backend that is wrong or raises for chosen shapes.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import faulthandler
import functools
import itertools
import json
import statistics
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, TextIO

import mlx.core as mx

from . import intercept
from .intercept import Call
from .policy import (ALIGNMENTS, M_BUCKETS, M_LABELS, ORIGINAL, QMM_REWRITES, ROW_CLASSES, ROW_LABELS, Backend,
                     Measured, Profile, QmmBucket, QmmVerdict, device_backend, load_profile, profile_path,
                     write_profile)
from .rule import Decision
from .rules import quantized_matmul_broadcast as qmm_rule

N_KV, N_REP = 2, 4  # two kv heads at least: a kernel reading "matrix 0 for every batch" is right with one
PAD = 64  # rows of a sliced cache's buffer past the view's end, as in mlx-lm's caches
LARGE_M = 128  # the probe standing for the open-ended last M bucket
TOP_ROWS = 16384  # the probe standing for the open-ended last rows class
FAILURES = (RuntimeError, ValueError)  # what MLX raises for shapes it has no kernel for
TOLERANCE = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 4e-2}  # of max |reference|; wrong reads give ~1
BUDGET_S = 50.0  # probes left when this is spent are skipped (their buckets stay unmeasured)
WATCHDOG_S = 300  # the command ends with a traceback if a kernel hangs (one CUDA probe once did)


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


@dataclass
class _KernelCall(Call):
    """A quantized_matmul call whose "original" is the kernel under test, so the rule's rewrites run on it."""

    kernels: Kernels | None = None

    def run_original(self, **overrides: Any) -> mx.array:
        return self.kernels.quantized_matmul(**{**self.operands, **self.params, **overrides})


# ---- what to probe ---------------------------------------------------------------------------------------

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
    sliced: bool  # the cache is a view of a longer buffer (not dense), as mlx-lm's caches are; untimed

    @property
    def params(self) -> dict[str, Any]:
        return {"transpose": self.transpose, "group_size": self.group_size, "bits": self.bits, "mode": "affine"}

    @property
    def x_shape(self) -> tuple[int, ...]:
        return 1, N_KV, N_REP, self.m, self.d if self.transpose else self.rows

    @property
    def bucket(self) -> QmmBucket:
        return QmmBucket.of(self.dtype, self.x_shape, (self.rows, self.d * self.bits // 32), self.params)


@dataclass(frozen=True)
class Grid:
    """Which probes a run makes: every bucket of dtypes x bits x transposes x the first `m_buckets` M buckets
    x `rows`, each probed at both ends of its M range, on a dense (timed) and a sliced cache."""

    name: str
    dtypes: tuple[str, ...]
    bits: tuple[int, ...]
    m_buckets: int
    rows: tuple[int, ...]
    d: int = 128
    group_size: int = 64
    iters: int = 3  # timed runs per way (median), after the run that checks it
    sdpa: tuple[tuple[int, int, int], ...] = ((64, 1, 1024),)  # (head dim, queries, keys)
    gather_m: tuple[int, ...] = (1, 2)

    def qmm_probes(self) -> list[QmmProbe]:
        """Bucket by bucket (a bucket counts only when all its probes ran), cache by cache (data is reused)."""
        probes = []
        for dtype, bits, rows, transpose in itertools.product(self.dtypes, self.bits, self.rows, (True, False)):
            for low, high in M_BUCKETS[:self.m_buckets]:
                for m, sliced in itertools.product(sorted({low, high or LARGE_M}), (False, True)):
                    probes.append(QmmProbe(dtype, bits, self.group_size, transpose, m, rows, self.d, sliced))
        return probes


def grid_for(backend: Backend, quick: bool = False) -> Grid:
    """GPUs: every bucket in float16 and bfloat16. CPU: float32 only (its fp16 quantized matmul is 10-60x
    slower), short rows and small M, to stay well inside a minute. Quick: a few buckets, for a smoke test."""
    native = "float32" if backend.kind == "cpu" else "float16"
    if quick:
        return Grid("quick", (native,), (4,), m_buckets=2, rows=(2048, 2047), iters=2)
    if backend.kind == "cpu":
        return Grid("cpu", (native,), (4, 8), m_buckets=3, rows=probe_rows(1),
                    sdpa=((64, 1, 1024), (128, 1, 4096)))
    return Grid("gpu", ("float16", "bfloat16"), (4, 8), m_buckets=len(M_BUCKETS), rows=probe_rows(len(ROW_CLASSES)),
                iters=5, sdpa=((64, 1, 16384), (128, 1, 4096), (128, 2, 16384), (256, 8, 4096)), gather_m=(1, 2, 8))


# ---- running one thing -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Outcome:
    """One way on one probe."""

    error: float | None  # max |out - reference| / max |reference|; None when it raised
    us: float | None  # median time; None when untimed or it raised
    failure: str | None = None


def _seconds(fn: Callable[[], mx.array]) -> float:
    start = time.perf_counter()
    mx.eval(fn())
    mx.synchronize()
    return time.perf_counter() - start


def _check(fn: Callable[[], mx.array], reference: mx.array, scale: float) -> Outcome:
    try:
        out = fn()
        mx.eval(out)
    except FAILURES as failure:
        return Outcome(None, None, str(failure).splitlines()[0])
    return Outcome(mx.max(mx.abs(out.astype(mx.float32) - reference)).item() / scale, None)


def _compare(ways: dict[str, Callable[[], mx.array]], reference: mx.array, iters: int) -> dict[str, Outcome]:
    """Run each way once against the reference (which also warms it up), then time those that ran `iters`
    times, taking turns, so that drift (clocks, other load) hits them alike."""
    scale = max(mx.max(mx.abs(reference)).item(), 1e-30)
    outcomes = {name: _check(fn, reference, scale) for name, fn in ways.items()}
    ran = [name for name, outcome in outcomes.items() if outcome.failure is None]
    times: dict[str, list[float]] = {name: [] for name in ran}
    for _ in range(iters):
        for name in ran:
            times[name].append(_seconds(ways[name]))
    return {name: dataclasses.replace(outcome, us=statistics.median(times[name]) * 1e6) if times.get(name) else outcome
            for name, outcome in outcomes.items()}


@functools.lru_cache(maxsize=2)  # a dense and a sliced cache at a time: probes come cache by cache
def _cache(dtype: str, bits: int, group_size: int, rows: int, d: int, sliced: bool):
    """Quantized (w, scales, biases) expanded to (1, N_KV, 1, rows, .), and its dequantized float32 value.
    Each kv head is offset by 2 and a sliced buffer's tail by 8, so reading another head's rows or past
    the view's end gives an error near 1, not within rounding."""
    length = rows + PAD if sliced else rows
    values = mx.random.normal((1, N_KV, length, d)) + 2 * mx.arange(N_KV).reshape(1, N_KV, 1, 1)
    values = mx.where((mx.arange(length) >= rows).reshape(length, 1), values + 8, values)
    quantized = [a[:, :, :rows] for a in mx.quantize(values.astype(getattr(mx, dtype)), group_size=group_size,
                                                         bits=bits)]
    reference = mx.dequantize(*quantized, group_size=group_size, bits=bits).astype(mx.float32)
    expanded = tuple(mx.expand_dims(a, -3) for a in quantized)
    mx.eval(expanded, reference)
    return expanded, mx.expand_dims(reference, -3)


def _qmm_outcomes(probe: QmmProbe, kernels: Kernels, backend: Backend, iters: int) -> dict[str, Outcome]:
    """The call as shipped and every rewrite of the rule (its own functions, forced) on one probe."""
    weights, deq = _cache(probe.dtype, probe.bits, probe.group_size, probe.rows, probe.d, probe.sliced)
    x = mx.random.normal(probe.x_shape).astype(getattr(mx, probe.dtype))
    reference = x.astype(mx.float32) @ (mx.swapaxes(deq, -1, -2) if probe.transpose else deq)
    operands = dict(zip(("x", "w", "scales", "biases"), (x, *weights)))
    call = _KernelCall("quantized_matmul", operands, probe.params, None, kernels)
    params = qmm_rule.rewrite_params(reference.shape[:-2], {k: (2,) for k in qmm_rule.WEIGHTS}, backend)
    ways: dict[str, Callable[[], mx.array]] = {ORIGINAL: call.run_original}
    for rewrite in QMM_REWRITES:
        ways[rewrite] = functools.partial(qmm_rule.RULE.apply, call, Decision(qmm_rule.NAME, rewrite, "doctor", params))
    return _compare(ways, reference, 0 if probe.sliced else iters)


def _measured(outcomes: list[Outcome], tolerance: float) -> Measured:
    """One way over all probes of a bucket: wrong if any probe was, unsupported if any raised."""
    errors = [o.error for o in outcomes if o.error is not None]
    failures = [o.failure for o in outcomes if o.failure]
    times = [o.us for o in outcomes if o.us is not None]
    flags = (("wrong", any(e > tolerance for e in errors)), ("unsupported", bool(failures)))
    return Measured(", ".join(name for name, hit in flags if hit) or "ok", max(errors, default=None),
                    statistics.mean(times) if times else None, failures[0] if failures else None)


def _sdpa_row(dtype: str, d: int, queries: int, keys: int, kernels: Kernels, iters: int) -> dict[str, Any]:
    """mask=None against an all-True bool mask: the same attention, so equal up to rounding; and the cost."""
    q, k, v = (mx.random.normal(shape).astype(getattr(mx, dtype))
               for shape in ((1, N_KV * N_REP, queries, d), (1, N_KV, keys, d), (1, N_KV, keys, d)))
    mask = mx.ones((1, 1, queries, keys), dtype=mx.bool_)
    plain = functools.partial(kernels.scaled_dot_product_attention, q, k, v, scale=d ** -0.5, mask=None)
    masked = functools.partial(kernels.scaled_dot_product_attention, q, k, v, scale=d ** -0.5, mask=mask)
    row: dict[str, Any] = {"dtype": dtype, "d": d, "queries": queries, "keys": keys}
    try:
        reference = plain().astype(mx.float32)
    except FAILURES as failure:
        return {**row, "status": "unsupported", "error": str(failure).splitlines()[0]}
    outcomes = _compare({"none": plain, "mask": masked}, reference, iters)
    if outcomes["mask"].failure:
        return {**row, "status": "unsupported", "error": outcomes["mask"].failure}
    none_us, mask_us, diff = outcomes["none"].us, outcomes["mask"].us, outcomes["mask"].error
    return {**row, "status": "equal" if diff <= TOLERANCE[dtype] else "differ", "max_diff": diff,
            "none_us": none_us, "mask_us": mask_us, "mask_over_none": mask_us / none_us}


def _gather_row(dtype: str, m: int, d: int, kernels: Kernels, iters: int) -> dict[str, Any]:
    """gather_qmm where one index per batch row is broadcast across the next batch dim."""
    w, scales, biases = mx.quantize(mx.random.normal((8, 512, d)).astype(getattr(mx, dtype)), group_size=64, bits=4)
    deq = mx.dequantize(w, scales, biases, group_size=64, bits=4).astype(mx.float32)
    x = mx.random.normal((3, 4, m, d)).astype(getattr(mx, dtype))
    indices = mx.array([[1], [5], [7]])  # (3, 1) against x's batch (3, 4)
    reference = x.astype(mx.float32) @ mx.expand_dims(deq[indices[:, 0]], 1).swapaxes(-1, -2)
    gather = functools.partial(kernels.gather_qmm, x, w, scales, biases, rhs_indices=indices, transpose=True,
                               group_size=64, bits=4)
    measured = _measured([_compare({"gather_qmm": gather}, reference, iters)["gather_qmm"]], TOLERANCE[dtype])
    return {"dtype": dtype, "m": m, "d": d, "status": measured.status, "max_error": measured.max_error,
            "us": measured.us, "error": measured.error}


# ---- the run -------------------------------------------------------------------------------------------------

class Progress:
    """A progress bar on stderr: redrawn in place on a terminal, one line per tenth otherwise (logs)."""

    def __init__(self, total: int, enabled: bool = True, stream: TextIO | None = None):
        self.total, self.done, self.enabled, self.stream = total, 0, enabled, stream or sys.stderr
        self.start = time.perf_counter()
        self.live = enabled and self.stream.isatty()

    def step(self, label: str) -> None:
        self.done += 1
        new_tenth = self.done * 10 // self.total != (self.done - 1) * 10 // self.total
        if not self.enabled or not (self.live or new_tenth):
            return
        filled = 30 * self.done // self.total
        line = (f"doctor [{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} "
                f"{time.perf_counter() - self.start:4.0f}s {label}")
        self.stream.write(f"\r{line:<100}" if self.live else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.live:
            self.stream.write("\n")


def run(*, quick: bool = False, grid: Grid | None = None, kernels: Kernels | None = None, save: bool = True,
        progress: bool = True, budget_s: float = BUDGET_S, seed: int = 0) -> Profile:
    """Measure, build the profile, and (save=True) write it where `Backend.current()` will find it."""
    start = time.perf_counter()
    backend = device_backend()
    grid = grid or grid_for(backend, quick)
    kernels = kernels or Kernels()
    mx.random.seed(seed)
    probes = grid.qmm_probes()
    bar = Progress(len(grid.sdpa) + len(grid.gather_m) + len(probes), progress)
    dtype = grid.dtypes[0]
    notes: dict[str, Any] = {"grid": grid.name, "kernels": type(kernels).__name__, "sdpa": [], "gather_qmm": []}
    for d, queries, keys in grid.sdpa:
        notes["sdpa"].append(_sdpa_row(dtype, d, queries, keys, kernels, grid.iters))
        bar.step(f"sdpa d={d} L={queries} N={keys}")
    for m in grid.gather_m:
        notes["gather_qmm"].append(_gather_row(dtype, m, grid.d, kernels, grid.iters))
        bar.step(f"gather_qmm M={m}")
    outcomes: dict[QmmBucket, dict[str, list[Outcome]]] = {}
    skipped: set[QmmBucket] = set()
    for probe in probes:
        if time.perf_counter() - start > budget_s:
            skipped.add(probe.bucket)
        else:
            for name, outcome in _qmm_outcomes(probe, kernels, backend, grid.iters).items():
                outcomes.setdefault(probe.bucket, {}).setdefault(name, []).append(outcome)
        bar.step(f"{probe.dtype} {probe.bits}-bit T={probe.transpose:d} M={probe.m} rows={probe.rows}")
    bar.close()
    _cache.cache_clear()
    verdicts = {bucket: QmmVerdict(bucket, len(ways[ORIGINAL]), {name: _measured(found, TOLERANCE[bucket.dtype])
                                                                 for name, found in ways.items()})
                for bucket, ways in outcomes.items() if bucket not in skipped}
    notes.update(seconds=round(time.perf_counter() - start, 1), skipped_buckets=len(skipped))
    created = datetime.datetime.now().isoformat(timespec="seconds")
    profile = Profile(backend.device, backend.kind, mx.__version__, created, verdicts, notes)
    path = profile_path(backend) if save else None
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


def _cell(measured: list[Measured]) -> str:
    status = measured[0].status
    if status == "ok":
        return "ok" + _time_text(m.us for m in measured)
    error = max((m.max_error for m in measured if m.max_error is not None), default=None)
    return f"**{status.upper()}**" + (f" {error:.0e}" if "wrong" in status else "")


def _table_order(verdict: QmmVerdict) -> tuple:
    b = verdict.bucket
    return b.dtype, b.bits, not b.transpose, M_LABELS.index(b.m), b.d, ROW_LABELS.index(b.rows), -b.align


def _qmm_lines(profile: Profile) -> list[str]:
    """One line per bucket, except that buckets differing only in rows share a line when every way has the
    same status and the same way is chosen in each."""
    names = (ORIGINAL, *QMM_REWRITES)
    groups: dict[tuple, list[QmmVerdict]] = {}
    for verdict in sorted(profile.qmm.values(), key=_table_order):
        b = verdict.bucket
        groups.setdefault((b.dtype, b.bits, b.group_size, b.transpose, b.m, b.d), []).append(verdict)
    lines = ["| dtype | bits/group | transpose | M | d | rows | as shipped | fold | copy | dequantize | rewrite |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (dtype, bits, group, transpose, m, d), verdicts in groups.items():
        signature = {(tuple(v.ways[n].status for n in names), v.preference[0]) for v in verdicts}
        parts = [[v] for v in verdicts] if len(signature) > 1 else [verdicts]
        for part in parts:
            rows = f"{part[0].bucket.rows} %{part[0].bucket.align}" if len(part) == 1 else f"all {len(part)} classes"
            cells = [_cell([v.ways[n] for v in part]) for n in names]
            chosen = part[0].preference[0]
            lines.append(f"| {dtype} | {bits}/{group} | {transpose} | {m} | {d} | {rows} | {' | '.join(cells)} "
                         f"| {chosen} |")
    return lines


def render(profile: Profile) -> str:
    """The profile as a markdown report: what is wrong, unsupported, and what the rules choose, per bucket."""
    notes = profile.notes
    verdicts = list(profile.qmm.values())
    shipped = [v.ways[ORIGINAL].status for v in verdicts]
    chosen = [v.preference[0] for v in verdicts]
    lines = [f"# mlxrewrite doctor: {profile.backend} {profile.device!r}, MLX {profile.mlx}, {profile.created}", "",
             f"Grid `{notes.get('grid')}` (kernels: {notes.get('kernels')}), {len(verdicts)} buckets measured in "
             f"{notes.get('seconds')} s; {notes.get('skipped_buckets', 0)} left unmeasured by the time budget "
             "(the source-derived policy applies there).", "",
             "## quantized_matmul with broadcast weight batch dims (GQA quantized KV cache)", "",
             f"As shipped: wrong in {sum('wrong' in s for s in shipped)} of {len(verdicts)} buckets, unsupported in "
             f"{sum('unsupported' in s for s in shipped)}. Rewrite (the fastest correct one): "
             + ", ".join(f"{name} {chosen.count(name)}" for name in dict.fromkeys(chosen))
             + ". A call is left as shipped only where it measured ok and MLX's source facts (policy.py) call "
             "it right too. Rows: the weights' rows (the KV length) by size class, then %A: a multiple of A (1: "
             "neither 8 nor 128). Cells: status, then max error relative to max |reference| (wrong) or median time "
             "(ok; a range over the buckets a line stands for). A bucket is wrong or unsupported if any of its "
             "probes was (M at both ends of its range; dense and sliced caches); the JSON has each error.", ""]
    lines += _qmm_lines(profile)
    lines += ["", "## scaled_dot_product_attention: all-True mask vs mask=None", "",
              "| dtype | d | queries | keys | status | max diff | None us | mask us | mask / None |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in notes.get("sdpa", []):
        timed = (f"{r['max_diff']:.0e} | {r['none_us']:.0f} | {r['mask_us']:.0f} | {r['mask_over_none']:.2f}x"
                 if "mask_us" in r else f"{r.get('error', '')} | | |")
        lines.append(f"| {r['dtype']} | {r['d']} | {r['queries']} | {r['keys']} | {r['status']} | {timed} |")
    lines += ["", "## gather_qmm with broadcast indices (reported only)", "",
              "| dtype | M | d | status | max error | us |", "|---|---|---|---|---|---|"]
    for r in notes.get("gather_qmm", []):
        error = "" if r["max_error"] is None else f"{r['max_error']:.0e}"
        timed = "" if r["us"] is None else f"{r['us']:.0f}"
        lines.append(f"| {r['dtype']} | {r['m']} | {r['d']} | {r['status']} | {error} | {timed} |")
    return "\n".join(lines)


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
        faulthandler.dump_traceback_later(WATCHDOG_S, exit=True, file=sys.__stderr__)
        try:
            profile = run(quick=args.quick, save=not args.no_cache)
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
