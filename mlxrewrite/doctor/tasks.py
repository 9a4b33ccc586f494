"""The doctor's tasks (one probe's ways; an SDPA shape; a gather_qmm shape) and the plan that orders them: a
task is the unit that is scheduled, run in a child process, and killed at the deadline."""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Union

import mlx.core as mx

from ..isolation import stage
from ..policy import NOT_MEASURED, ORIGINAL, QMM_REWRITES, Backend
from ..rule import Decision
from ..rules import quantized_matmul_broadcast as qmm_rule
from .kernels import KernelCall, Kernels
from .measure import TOLERANCE, Key, Outcome, compare, failed, first_failure, scale_of, verdict
from .probes import N_KV, N_REP, Grid, QmmProbe

PAD = 64  # rows of the cache buffer past the longest view: every probe's cache is a view of it, as in mlx-lm
LAYOUTS = ("dense", "sliced")  # every way runs on a dense cache (timed) and on a view of a longer buffer


@functools.lru_cache(maxsize=4)  # probes come in priority order, which keeps a (dtype, bits, group, d) together
def kv_buffer(dtype: str, bits: int, group_size: int, d: int, length: int) -> tuple[tuple[mx.array, ...], mx.array]:
    """One quantized cache buffer (w, scales, biases) of shape (1, N_KV, length, .) per (dtype, bits, group size,
    d), shared by every M and rows probed with it, and its dequantized float32 value (the reference's). Each kv
    head is offset by 2, so a kernel reading another head's rows gives an error near 1, not within rounding."""
    values = mx.random.normal((1, N_KV, length, d)) + 2 * mx.arange(N_KV).reshape(1, N_KV, 1, 1)
    quantized = tuple(mx.quantize(values.astype(getattr(mx, dtype)), group_size=group_size, bits=bits))
    reference = mx.dequantize(*quantized, group_size=group_size, bits=bits).astype(mx.float32)
    mx.eval(quantized, reference)
    return quantized, reference


def _way(call: KernelCall, name: str, params: dict[str, Any]) -> Callable[[], mx.array]:
    """The call as shipped, or one of the rule's rewrites forced on it."""
    if name == ORIGINAL:
        return call.run_original
    return functools.partial(qmm_rule.RULE.apply, call, Decision(qmm_rule.NAME, name, "doctor", params))


@dataclass(frozen=True)
class QmmTask:
    """Some ways of one probe, on a dense cache (timed) and a sliced one (as mlx-lm's caches are), sharing x
    and the reference. The cache is a view of a buffer of `buffer_rows` rows (`kv_buffer`). A rewrite that
    failed on the dense cache is not run again on the sliced one: its verdict cannot get better, and a failed
    JIT compile is not cached, so it would cost its time again. The call as shipped runs on both (the table
    reports both ways it goes wrong)."""

    probe: QmmProbe
    ways: tuple[str, ...]
    buffer_rows: int
    for_routes: bool  # does a route read what it measures? `plan` runs the call as shipped alone where none does

    @property
    def label(self) -> str:
        p = self.probe
        ways = " as shipped" if self.ways == (ORIGINAL,) else ""
        return f"qmm {p.dtype} {p.bits}-bit g{p.group_size} d={p.d} T={p.transpose:d} M={p.m} rows={p.rows}{ways}"

    def execute(self, kernels: Kernels, backend: Backend, iters: int) -> dict[Key, Outcome]:
        p = self.probe
        buffer, dequantized = kv_buffer(p.dtype, p.bits, p.group_size, p.d, self.buffer_rows)
        sliced = [a[:, :, :p.rows] for a in buffer]
        dense = [mx.contiguous(a) for a in sliced]
        deq = mx.expand_dims(dequantized[:, :, :p.rows], -3)
        x = mx.random.normal(p.x_shape).astype(getattr(mx, p.dtype))
        reference = x.astype(mx.float32) @ (mx.swapaxes(deq, -1, -2) if p.transpose else deq)
        mx.eval(x, reference, dense)
        scale = scale_of(reference)
        slack = qmm_rule.cuda_qmm_overreads(backend, p.dtype, math.prod(reference.shape[:-1]), p.x_shape[-1],
                                            p.params)
        params = qmm_rule.rewrite_params(backend, reference.shape[:-2], {k: (2,) for k in qmm_rule.WEIGHTS}, slack)
        outcomes: dict[Key, Outcome] = {}
        for layout, weights, timed in zip(LAYOUTS, (dense, sliced), (iters, 0)):
            operands = dict(zip(("x", "w", "scales", "biases"), (x, *(mx.expand_dims(a, -3) for a in weights))))
            call = KernelCall(operands, p.params, kernels)
            failures = {name for (name, _), o in outcomes.items() if o.failure or o.error > TOLERANCE[p.dtype]}
            ways = {(name, layout): _way(call, name, params) for name in self.ways
                    if name == ORIGINAL or name not in failures}
            outcomes.update(compare(ways, reference, scale, timed))
            if any(outcome.crashed for outcome in outcomes.values()):
                break
        return outcomes


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

    def execute(self, kernels: Kernels, backend: Backend, iters: int) -> dict[Key, Outcome]:
        q, k, v = (mx.random.normal(shape).astype(getattr(mx, self.dtype)) for shape in (
            (1, N_KV * N_REP, self.queries, self.d), (1, N_KV, self.keys, self.d), (1, N_KV, self.keys, self.d)))
        mask = mx.ones((1, 1, self.queries, self.keys), dtype=mx.bool_)
        plain = functools.partial(kernels.scaled_dot_product_attention, q, k, v, scale=self.d ** -0.5, mask=None)
        masked = functools.partial(kernels.scaled_dot_product_attention, q, k, v, scale=self.d ** -0.5, mask=mask)
        stage("none")
        try:
            reference = plain().astype(mx.float32)
            scale = scale_of(reference)
        except Exception as error:  # noqa: BLE001 - as in measure._check
            return {"none": failed(error)}
        return compare({"none": plain, "mask": masked}, reference, scale, iters)

    def row(self, outcomes: dict[Key, Outcome] | None) -> dict[str, Any]:
        """The report's row (its first fields are the task's own, which is how a resumed run finds it)."""
        row: dict[str, Any] = dataclasses.asdict(self)
        failure = first_failure((outcomes or {}).values())
        if failure is not None:
            return {**row, "status": "crashed" if failure.crashed else "unsupported", "error": failure.failure}
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

    def execute(self, kernels: Kernels, backend: Backend, iters: int) -> dict[Key, Outcome]:
        values = mx.random.normal((8, 512, self.d)).astype(getattr(mx, self.dtype))
        w, scales, biases = mx.quantize(values, group_size=64, bits=4)
        deq = mx.dequantize(w, scales, biases, group_size=64, bits=4).astype(mx.float32)
        x = mx.random.normal((3, 4, self.m, self.d)).astype(getattr(mx, self.dtype))
        indices = mx.array([[1], [5], [7]])  # (3, 1) against x's batch (3, 4)
        reference = x.astype(mx.float32) @ mx.expand_dims(deq[indices[:, 0]], 1).swapaxes(-1, -2)
        gather = functools.partial(kernels.gather_qmm, x, w, scales, biases, rhs_indices=indices, transpose=True,
                                   group_size=64, bits=4)
        return compare({"gather_qmm": gather}, reference, scale_of(reference), iters)

    def row(self, outcomes: dict[Key, Outcome] | None) -> dict[str, Any]:
        """The report's row (its first fields are the task's own, which is how a resumed run finds it)."""
        measured = verdict(list((outcomes or {}).values()), 1, TOLERANCE[self.dtype])
        return {**dataclasses.asdict(self), "status": measured.status, "max_error": measured.max_error,
                "us": measured.us, "error": measured.error}


Task = Union[QmmTask, SdpaTask, GatherTask]
ReportTask = Union[SdpaTask, GatherTask]  # what only the report reads: a row in the profile's notes


def plan(grid: Grid, backend: Backend) -> list[Task]:
    """Every task of a run, most important first: the probes the routes read (the rewrites, and the call as
    shipped where the source facts call it right, so a route may leave it), then SDPA, then the call as shipped
    where it is only reported (it is the one that reads out of bounds on CUDA, so it comes late), then
    gather_qmm."""
    probes = grid.qmm_probes()
    rows = max(grid.rows) + PAD
    may_leave = {p.bucket for p in probes if not p.hazardous(backend)}
    routed = [QmmTask(p, QMM_REWRITES + ((ORIGINAL,) if p.bucket in may_leave else ()), rows, True) for p in probes]
    shipped = [QmmTask(p, (ORIGINAL,), rows, False) for p in probes if p.bucket not in may_leave]
    return [*routed, *(SdpaTask(grid.dtypes[0], *shape) for shape in grid.sdpa), *shipped,
            *(GatherTask(grid.dtypes[0], m, grid.d[0]) for m in grid.gather_m)]
