"""`mlxrewrite doctor`'s probes for quantized-matmul-broadcast-weights (`Rule.probes`; imported by the doctor only).

Each probe is one call of mlx-lm's GQA attention (the shared fixture, `mlxrewrite.examples.
gqa_quantized_attention`): x (1, N_KV, N_REP, M, K) against a quantized cache broadcast from (1, N_KV, 1, rows, d),
run as shipped and with each of the rule's rewrites forced (the rule's own functions), against the
dequantize-then-float32 reference. The buckets are `qmm_profile.QmmBucket`: each is probed where its calls are
most likely to go wrong, at both ends of its M range and at the top of its rows class, on a dense and a sliced
cache. `Grid._priority` puts first what mlx-lm decoding hits. Also reported, for no rule yet: gather_qmm with
broadcast indices.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import mlx.core as mx

from mlxrewrite.backends.device import Backend
from mlxrewrite.doctor.kernels import KernelCall, Kernels
from mlxrewrite.doctor.measure import Key, Outcome, compare, scale_of
from mlxrewrite.doctor.probes import AS_SHIPPED, EXTRA, ROUTES, ShapeTask
from mlxrewrite.examples.gqa_quantized_attention import broadcast_cache
from mlxrewrite.core.rule import Decision

from . import qmm_report, quantized_matmul_broadcast as broadcast
from .qmm_dispatch import cuda_qmm_overreads, qmm_hazard_applies, qmm_mkn
from .qmm_profile import ALIGNMENTS, M_BUCKETS, M_LABELS, ORIGINAL, QMM_REWRITES, ROW_CLASSES, ROW_LABELS, QmmBucket
from .qmm_report import GATHER

N_KV, N_REP = 2, 4  # two kv heads at least: a kernel reading "matrix 0 for every batch" is right with one
LARGE_M = 128  # the probe standing for the open-ended last M bucket
TOP_ROWS = 16384  # the probe standing for the open-ended last rows class
DECODE_M = 15  # M up to this: decoding (1) and speculative verification (drafts + 1); above: prefill chunks
PAD = 64  # rows of the cache buffer past the longest view: every probe's cache is a view of it, as in mlx-lm
LAYOUTS = ("dense", "sliced")  # every way runs on a dense cache (timed) and on a view of a longer buffer


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
    return functools.partial(broadcast.RULE.apply, call, Decision(broadcast.NAME, name, "doctor", params))


@dataclass(frozen=True)
class QmmTask(ShapeTask):
    """Some ways of one probe, on a dense cache (timed) and a sliced one (as mlx-lm's caches are), sharing x
    and the reference. The cache is a view of a buffer of `buffer_rows` rows (`kv_buffer`). A rewrite that
    failed on the dense cache is not run again on the sliced one: its verdict cannot get better, and a failed
    JIT compile is not cached, so it would cost its time again. The call as shipped runs on both (the table
    reports both ways it goes wrong)."""

    probe: QmmProbe
    ways: tuple[str, ...]
    buffer_rows: int
    priority: int  # ROUTES where a route reads what it measures; `plan` runs the call as shipped alone elsewhere
    iters: int
    rule: ClassVar[str] = broadcast.NAME
    samples: ClassVar[int] = len(LAYOUTS)

    @property
    def bucket(self) -> QmmBucket:
        return self.probe.bucket

    @property
    def label(self) -> str:
        p = self.probe
        ways = " as shipped" if self.ways == (ORIGINAL,) else ""
        return f"qmm {p.dtype} {p.bits}-bit g{p.group_size} d={p.d} T={p.transpose:d} M={p.m} rows={p.rows}{ways}"

    def execute(self, kernels: Kernels, backend: Backend) -> dict[Key, Outcome]:
        p = self.probe
        buffer, dequantized = kv_buffer(p.dtype, p.bits, p.group_size, p.d, self.buffer_rows)
        sliced = [a[:, :, :p.rows] for a in buffer]
        dense = [mx.contiguous(a) for a in sliced]
        deq = mx.expand_dims(dequantized[:, :, :p.rows], -3)
        x = mx.random.normal(p.x_shape).astype(getattr(mx, p.dtype))
        reference = x.astype(mx.float32) @ (mx.swapaxes(deq, -1, -2) if p.transpose else deq)
        mx.eval(x, reference, dense)
        scale = scale_of(reference)
        slack = cuda_qmm_overreads(backend, p.dtype, math.prod(reference.shape[:-1]), p.x_shape[-1], p.params)
        params = broadcast.rewrite_params(backend, reference.shape[:-2], {k: (2,) for k in broadcast.WEIGHTS}, slack)
        outcomes: dict[Key, Outcome] = {}
        for layout, weights, timed in zip(LAYOUTS, (dense, sliced), (self.iters, 0)):
            operands = dict(zip(("x", *broadcast.WEIGHTS), (x, *broadcast_cache(*weights))))
            call = KernelCall("quantized_matmul", operands, p.params, kernels)
            failures = {name for (name, _), o in outcomes.items() if o.failure or o.error > self.tolerance}
            ways = {(name, layout): _way(call, name, params) for name in self.ways
                    if name == ORIGINAL or name not in failures}
            outcomes.update(compare(ways, reference, scale, timed))
            if any(outcome.crashed for outcome in outcomes.values()):
                break
        return outcomes


@dataclass(frozen=True)
class GatherShape:
    """gather_qmm where one index per batch row is broadcast across the next batch dim (the bucket is the shape)."""

    dtype: str
    m: int
    d: int


@dataclass(frozen=True)
class GatherTask(ShapeTask):
    """gather_qmm with broadcast indices against the dequantized experts: reported, no rule reads it yet."""

    probe: GatherShape
    iters: int
    ways: tuple[str, ...] = ("gather_qmm",)
    rule: ClassVar[str] = GATHER
    priority: ClassVar[int] = EXTRA
    samples: ClassVar[int] = 1

    @property
    def label(self) -> str:
        return f"gather_qmm M={self.probe.m} d={self.probe.d}"

    def execute(self, kernels: Kernels, backend: Backend) -> dict[Key, Outcome]:
        p = self.probe
        values = mx.random.normal((8, 512, p.d)).astype(getattr(mx, p.dtype))
        w, scales, biases = mx.quantize(values, group_size=64, bits=4)
        deq = mx.dequantize(w, scales, biases, group_size=64, bits=4).astype(mx.float32)
        x = mx.random.normal((3, 4, p.m, p.d)).astype(getattr(mx, p.dtype))
        indices = mx.array([[1], [5], [7]])  # (3, 1) against x's batch (3, 4)
        reference = x.astype(mx.float32) @ mx.expand_dims(deq[indices[:, 0]], 1).swapaxes(-1, -2)
        gather = functools.partial(kernels.gather_qmm, x, w, scales, biases, rhs_indices=indices, transpose=True,
                                   group_size=64, bits=4)
        return compare({("gather_qmm", ""): gather}, reference, scale_of(reference), self.iters)


@dataclass(frozen=True)
class Grid:
    """Which probes a run makes: every bucket of dtypes x bits x group sizes x head dims x transposes x the
    first `m_buckets` M buckets x `rows`, each probed at both ends of its M range; `probes` orders them."""

    name: str
    dtypes: tuple[str, ...]
    bits: tuple[int, ...]
    m_buckets: int
    rows: tuple[int, ...]
    d: tuple[int, ...] = (128, 64)  # head dims (the weights' other dim): kernels differ by it
    late_d: tuple[int, ...] = ()  # head dims probed after everything else
    group_sizes: tuple[int, ...] = (64,)
    iters: int = 3  # timed runs per way (median), after the run that checks it
    gather_m: tuple[int, ...] = (1, 2)

    def probes(self) -> list[QmmProbe]:
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

    def tasks(self, backend: Backend) -> list[QmmTask | GatherTask]:
        """The probes the routes read first (the rewrites, and the call as shipped where the source facts call
        it right, so a route may leave it), then the call as shipped where it is only reported (it is the one
        that reads out of bounds on CUDA, so it comes late), then gather_qmm."""
        probes = self.probes()
        rows = max(self.rows) + PAD
        may_leave = {p.bucket for p in probes if not p.hazardous(backend)}
        routed = [QmmTask(p, QMM_REWRITES + ((ORIGINAL,) if p.bucket in may_leave else ()), rows, ROUTES, self.iters)
                  for p in probes]
        shipped = [QmmTask(p, (ORIGINAL,), rows, AS_SHIPPED, self.iters) for p in probes if p.bucket not in may_leave]
        return [*routed, *shipped, *(GatherTask(GatherShape(self.dtypes[0], m, self.d[0]), self.iters)
                                     for m in self.gather_m)]

    def close(self) -> None:
        kv_buffer.cache_clear()


report = qmm_report.report  # the probe module's other half (Rule.probes): the rule's part of the doctor's table


def grid(backend: Backend, name: str) -> Grid:
    """GPUs: every bucket in float16 and bfloat16 with 8 and 4 bits for head dims 128 and 64, then 256, as far
    as the budget goes. CPU: float32 only (its fp16 quantized matmul is 10-60x slower), short rows and small M,
    to stay well inside a minute. Quick: a few buckets, for a smoke test."""
    native = "float32" if backend.kind == "cpu" else "float16"
    if name == "quick":
        return Grid("quick", (native,), (8,), m_buckets=2, rows=(2048, 2047), iters=2)
    if name == "cpu":
        return Grid("cpu", (native,), (8, 4), m_buckets=3, rows=probe_rows(1))
    return Grid("gpu", ("float16", "bfloat16"), (8, 4), m_buckets=len(M_BUCKETS), rows=probe_rows(len(ROW_CLASSES)),
                late_d=(256,), gather_m=(1, 8))
