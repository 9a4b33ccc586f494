"""What the doctor probes, and in which order: the buckets of `policy.QmmBucket` a grid covers, each probed
where its calls are most likely to go wrong (both ends of its M range, the top of its rows class)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from ..policy import (ALIGNMENTS, M_BUCKETS, M_LABELS, ROW_CLASSES, ROW_LABELS, Backend, QmmBucket,
                      qmm_hazard_applies, qmm_mkn)

N_KV, N_REP = 2, 4  # two kv heads at least: a kernel reading "matrix 0 for every batch" is right with one
LARGE_M = 128  # the probe standing for the open-ended last M bucket
TOP_ROWS = 16384  # the probe standing for the open-ended last rows class
DECODE_M = 15  # M up to this: decoding (1) and speculative verification (drafts + 1); above: prefill chunks


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
