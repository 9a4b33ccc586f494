"""`mlxrewrite doctor`'s probes for sdpa-noop-mask (`Rule.probes`; imported by the doctor only): an all-True bool
mask against mask=None, the same attention, so equal up to rounding; and what the masked path costs here. Only
reported: the rule drops a provably no-op mask wherever it may, and this is its evidence on this backend."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import mlx.core as mx

from mlxrewrite.backends.device import NOT_MEASURED, Backend, Profile
from mlxrewrite.doctor.kernels import Kernels
from mlxrewrite.doctor.measure import Key, Outcome, compare, failed, scale_of
from mlxrewrite.doctor.probes import REPORT, ShapeTask
from mlxrewrite.examples.gqa_quantized_attention import N_REP
from mlxrewrite.backends.isolation import stage

from .sdpa_noop_mask import NAME

if TYPE_CHECKING:
    from mlxrewrite.doctor.report import Footnotes

N_KV = 2  # kv heads, each attended by N_REP query heads (mlx-lm's GQA)


@dataclass(frozen=True)
class SdpaShape:
    """One attention shape (the bucket is the shape)."""

    dtype: str
    d: int
    queries: int
    keys: int


@dataclass(frozen=True)
class SdpaTask(ShapeTask):
    """mask=None (the reference, and timed) and an all-True bool mask, on one shape."""

    probe: SdpaShape
    iters: int
    ways: tuple[str, ...] = ("none", "mask")
    rule: ClassVar[str] = NAME
    priority: ClassVar[int] = REPORT
    samples: ClassVar[int] = 1

    @property
    def label(self) -> str:
        return f"sdpa d={self.probe.d} L={self.probe.queries} N={self.probe.keys}"

    def execute(self, kernels: Kernels, backend: Backend) -> dict[Key, Outcome]:
        p = self.probe
        q, k, v = (mx.random.normal(shape).astype(getattr(mx, p.dtype)) for shape in (
            (1, N_KV * N_REP, p.queries, p.d), (1, N_KV, p.keys, p.d), (1, N_KV, p.keys, p.d)))
        masks = {"none": None, "mask": mx.ones((1, 1, p.queries, p.keys), dtype=mx.bool_)}
        attend = functools.partial(kernels.scaled_dot_product_attention, q, k, v, scale=p.d ** -0.5)
        stage(("none", ""))
        try:
            reference = attend(mask=None).astype(mx.float32)
        except Exception as error:  # noqa: BLE001 - as in measure._check
            return {("none", ""): failed(error)}
        ways = {(way, ""): functools.partial(attend, mask=masks[way]) for way in self.ways}
        return compare(ways, reference, scale_of(reference), self.iters)


@dataclass(frozen=True)
class Grid:
    name: str
    dtype: str
    shapes: tuple[tuple[int, int, int], ...]  # (head dim, queries, keys)
    iters: int = 3

    def tasks(self, backend: Backend) -> list[SdpaTask]:
        return [SdpaTask(SdpaShape(self.dtype, *shape), self.iters) for shape in self.shapes]

    def close(self) -> None:
        """Its tasks cache nothing."""


def grid(backend: Backend, name: str) -> Grid:
    """Decode (one query) at the model head dims; on GPUs also a speculative step (8 queries)."""
    if name == "gpu":
        return Grid(name, "float16", ((128, 1, 4096), (64, 1, 4096), (128, 8, 4096)))
    native = "float32" if backend.kind == "cpu" else "float16"
    if name == "cpu":
        return Grid(name, native, ((64, 1, 1024), (128, 1, 4096)))
    return Grid(name, native, ((64, 1, 1024),), iters=2)


def report(profile: Profile, notes: "Footnotes") -> list[str]:
    """The rule's part of the doctor's report: per shape, equal or not, and the masked path's cost."""
    lines = ["", "## scaled_dot_product_attention: all-True mask vs mask=None", "",
             "| dtype | d | queries | keys | status | max diff | None us | mask us | mask / None |",
             "|---|---|---|---|---|---|---|---|---|"]
    for bucket in profile.rules.get(NAME, ()):
        r, none, mask = bucket.key, bucket.ways["none"], bucket.ways["mask"]
        failure = next((m for m in (none, mask) if m.failed and "wrong" not in m.status), None)
        if failure is not None:
            status = "crashed" if "crashed" in failure.status else "unsupported"
            timed = f"{notes.ref(failure.error).strip()} | | |"
        elif mask.status == NOT_MEASURED or none.status == NOT_MEASURED:
            status, timed = NOT_MEASURED, " | | |"
        else:
            status = "equal" if mask.ok else "differ"
            timed = f"{mask.max_error:.0e} | {none.us:.0f} | {mask.us:.0f} | {mask.us / none.us:.2f}x"
        lines.append(f"| {r['dtype']} | {r['d']} | {r['queries']} | {r['keys']} | {status} | {timed} |")
    return lines
