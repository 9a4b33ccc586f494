"""What a `mlxrewrite doctor` profile says of broadcast quantized_matmul calls, read the qmm rules' way. Not a rule.

The doctor probes the broadcast rule's calls (rules/qmm_probes.py) and writes one bucket per `QmmBucket`: for
the call as shipped and each rewrite, ok, wrong, unsupported, crashed or not measured, and how fast. Buckets are
coarse on purpose, so a decode loop (a growing KV length) crosses few of them. A bucket the doctor did not get
to (its time budget ran out) keeps the source-derived choice (qmm_dispatch.py), less the rewrites that failed in
a measured bucket of the same kernel family (dtype, quantization, transpose, head dim): a JIT compile error for
one head dim thus steers every call with that head dim away.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Mapping

from mlxrewrite.backends.device import NOT_MEASURED, Bucket, Measured, Profile

from .qmm_dispatch import qmm_mkn, quantization

ORIGINAL = "original"  # the call as written: a route that prefers it leaves the call alone
QMM_REWRITES = ("fold", "copy", "dequantize")
SOURCE_WAYS = ("fold", "copy")  # the source-derived choice for a hazardous call: fold, or copy when it cannot
# Buckets. M: Metal runs its vector kernel for M below a limit (4..33), so a bucket's smallest M shows whether
# any of it is wrong; CUDA switches from qmv to qmm kernels (with alignment needs) as M grows, so its largest
# shows whether any of it is unsupported. Weight rows (the KV length): get_qmv_batch_limit's size classes,
# and the alignments MLX's CUDA kernels test (128 for qmm_sm80, 8 for qmv and TMA).
M_BUCKETS: tuple[tuple[int, int | None], ...] = ((1, 1), (2, 3), (4, 7), (8, 15), (16, 31), (32, None))
ROW_CLASSES: tuple[int | None, ...] = (2048, 4096, None)  # upper bounds
ALIGNMENTS = (128, 8, 1)
M_LABELS = tuple(str(low) if low == high else f"{low}+" if high is None else f"{low}-{high}" for low, high in M_BUCKETS)
ROW_LABELS = tuple(f"<={bound}" if bound else f">{ROW_CLASSES[-2]}" for bound in ROW_CLASSES)


@dataclass(frozen=True)
class QmmBucket:
    """The facts of a broadcast quantized_matmul call that decide which kernel runs, coarse enough that a
    decode loop (a growing KV length) crosses few buckets. Rows are the weight matrix's rows (the KV length
    in attention, for either transpose); d is its other dim, unpacked (the head dim), taken exactly."""

    dtype: str
    mode: str
    bits: int
    group_size: int
    transpose: bool
    m: str  # M bucket: "1", "2-3", ..., "32+"
    d: int
    rows: str  # rows size class: "<=2048", "<=4096", ">4096"
    align: int  # the largest of ALIGNMENTS dividing the rows

    @classmethod
    def of(cls, dtype: str, x_shape: tuple, w_shape: tuple, params: Mapping[str, Any]) -> "QmmBucket":
        mode, bits, group_size = quantization(params)
        m, k, n = qmm_mkn(x_shape, w_shape, params)
        rows = w_shape[-2]
        m_bucket = next(i for i, (_, high) in enumerate(M_BUCKETS) if high is None or m <= high)
        row_class = next(i for i, bound in enumerate(ROW_CLASSES) if bound is None or rows <= bound)
        return cls(dtype, mode, bits, group_size, bool(params["transpose"]), M_LABELS[m_bucket],
                   k if params["transpose"] else n, ROW_LABELS[row_class], next(a for a in ALIGNMENTS if rows % a == 0))

    @property
    def family(self) -> tuple:
        """The facts that pick a kernel family (and a JIT-compiled kernel's source), whatever M and the rows:
        on CUDA, d and the group size decide between the sm90, sm80 and naive kernels."""
        return self.dtype, self.mode, self.bits, self.group_size, self.transpose, self.d

    def label(self) -> str:
        return (f"{self.dtype} {self.mode} {self.bits}-bit g{self.group_size} transpose={self.transpose} "
                f"M {self.m} d {self.d} rows {self.rows} (multiple of {self.align})")


@dataclass(frozen=True)
class QmmVerdict:
    """What the doctor measured for one bucket."""

    bucket: QmmBucket
    probes: int  # how many probes stand for the bucket (each on a dense and a sliced cache)
    ways: Mapping[str, Measured]  # ORIGINAL and each of QMM_REWRITES

    @classmethod
    def read(cls, entry: Bucket) -> "QmmVerdict":
        ways = {name: entry.ways.get(name, Measured(NOT_MEASURED)) for name in (ORIGINAL, *QMM_REWRITES)}
        return cls(QmmBucket(**entry.key), entry.probes, ways)

    @property
    def complete(self) -> bool:
        """Every rewrite has a verdict (ok needs every probe; a failure needs one), so routes may rank them."""
        return all(self.ways[name].status != NOT_MEASURED for name in QMM_REWRITES)

    @property
    def ranked(self) -> tuple[str, ...]:
        """The rewrites that were correct on every probe, fastest first."""
        times = {name: m.us for name, m in self.ways.items() if name != ORIGINAL and m.ok and m.us is not None}
        return tuple(sorted(times, key=times.__getitem__))

    @property
    def preference(self) -> tuple[str, ...]:
        """`ranked`, then dequantize (it needs no quantized kernel) as the last resort."""
        return tuple(dict.fromkeys((*self.ranked, "dequantize")))

    def describe(self) -> str:
        shipped = self.ways[ORIGINAL]
        error = f" (error {shipped.max_error:.1e})" if "wrong" in shipped.status else ""
        timed = ", ".join(f"{name} {self.ways[name].us:.0f} us" for name in self.ranked)
        return f"as shipped {shipped.status}{error}; correct rewrites, fastest first: {timed or 'none'}"


@dataclass(frozen=True)
class QmmMeasurements:
    """A profile's quantized_matmul buckets, with what the routes ask of them."""

    device: str
    mlx: str
    verdicts: Mapping[QmmBucket, QmmVerdict]

    @functools.cached_property
    def _family_failures(self) -> dict[tuple, frozenset[str]]:
        """Per kernel family, computed once: routes ask per traced call."""
        failed: dict[tuple, set[str]] = {}
        for verdict in self.verdicts.values():
            found = failed.setdefault(verdict.bucket.family, set())
            found.update(name for name in QMM_REWRITES if verdict.ways[name].failed)
        return {family: frozenset(names) for family, names in failed.items()}

    def family_failures(self, bucket: QmmBucket) -> frozenset[str]:
        """The rewrites that failed in any bucket of `bucket`'s kernel family: an unmeasured bucket avoids them."""
        return self._family_failures.get(bucket.family, frozenset())

    def hazard_ways(self, bucket: QmmBucket) -> tuple[tuple[str, ...], str]:
        """The rewrites, in order, for a hazardous call in `bucket`, and why. Measured (every rewrite has a
        verdict): the correct ones, fastest first, then dequantize. Otherwise the source policy (fold, else
        copy), less what failed in the bucket's kernel family, then dequantize when anything was dropped."""
        verdict = self.verdicts.get(bucket)
        if verdict is not None and verdict.complete:
            return verdict.preference, (f"measured by `mlxrewrite doctor` ({self.device}, MLX {self.mlx}) for "
                                        f"{bucket.label()}: {verdict.describe()}")
        failed = self.family_failures(bucket)
        why = f"{bucket.label()} not measured by `mlxrewrite doctor` ({self.device}, MLX {self.mlx})"
        if not failed:
            return SOURCE_WAYS, why
        ways = (*(w for w in SOURCE_WAYS if w not in failed), "dequantize")
        return ways, (f"{why}; {', '.join(sorted(failed))} failed in measured buckets of its kernel family, so "
                      "the source policy without them")


def measured(profile: Profile | None, rule: str) -> QmmMeasurements | None:
    """What `profile` measured of `rule`'s quantized_matmul buckets (read once per profile); None where it
    measured nothing for `rule`."""
    return None if profile is None else profile.decoded(rule, _read)


def _read(profile: Profile, buckets: tuple[Bucket, ...]) -> QmmMeasurements:
    verdicts = map(QmmVerdict.read, buckets)
    return QmmMeasurements(profile.device, profile.mlx, {verdict.bucket: verdict for verdict in verdicts})
