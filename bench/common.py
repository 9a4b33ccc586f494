"""What every case shares: the device, timing, forced rewrites, and the result record each case writes.

Timing is the median of single `mx.eval(fn())` calls after warmup, with all variants of one row called in
turn inside the same loop, so drift (clocks, other load) hits them alike and ratios come from one run.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import platform
import random
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx

import mlxrewrite
from mlxrewrite.backends.device import Backend, device_backend
from mlxrewrite.core.rule import Rule
from mlxrewrite.rules import quantized_matmul_broadcast as qmm_rule

# Peak HBM bandwidth (bytes/s) by device name, most specific first; unknown devices get no roofline.
ROOFLINES = (("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H100", 3.35e12))
FAILURES = (RuntimeError, ValueError)  # what MLX raises for unsupported kernel shapes
MAX_ITERS = 20000  # cap on `measure`'s rounds when `min_time_s` asks for more


@dataclass(frozen=True)
class Env:
    """Where a result was measured: enough to compare runs and to know which roofline applies."""

    device_name: str
    backend: str  # "cpu" | "metal" | "cuda"
    slug: str  # file-name form of the device, e.g. "cpu-amd-epyc", "cuda-nvidia-h100-80gb-hbm3"
    mlx: str
    mlxrewrite: str
    commit: str
    date: str
    dtype: str  # float32 on CPU (its quantized matmul is float32-only in practice), float16 on GPUs
    roofline_bytes_per_s: float | None

    @property
    def mx_dtype(self) -> mx.Dtype:
        return getattr(mx, self.dtype)

    @classmethod
    def detect(cls) -> "Env":
        backend = Backend.current().kind
        name = _device_name(backend)
        roofline = next((bw for key, bw in ROOFLINES if key in name), None) if backend != "cpu" else None
        slug = re.sub(r"[^a-z0-9]+", "-", f"{backend} {name}".lower()).strip("-")
        return cls(name, backend, slug, mx.__version__, mlxrewrite.__version__, _git_commit(),
                   datetime.date.today().isoformat(), "float32" if backend == "cpu" else "float16", roofline)


def _device_name(backend: str) -> str:
    return device_backend().device or platform.processor() or backend


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ---- timing ----------------------------------------------------------------------------------------
def try_call(fn: Callable[[], Any]) -> tuple[Any, str | None]:
    """Run once and evaluate: (output, None), or (None, MLX's error message) for unsupported calls."""
    try:
        out = fn()
        mx.eval(out)
        return out, None
    except FAILURES as error:
        return None, str(error).splitlines()[0][:160]


def measure(variants: dict[str, Callable[[], Any]], iters: int, warmup: int = 3,
            min_time_s: float = 0.0) -> tuple[dict[str, dict], dict]:
    """Median microseconds per `mx.eval(fn())`, variants interleaved, and each variant's first output.

    Each round calls every variant once, in a new random order (seeded): a call can pay for the one before
    it (on an H100 the call after a masked SDPA took 10-30 us longer), so no variant may always follow the
    same other one. `min_time_s` raises `iters` until each variant is timed for about that long: a kernel
    of a few tens of microseconds needs thousands of calls for its median to settle to a percent. A
    variant that raises gets {"error": message} and output None, and is left out of the timing loop.
    """
    results: dict[str, dict] = {}
    outputs: dict[str, Any] = {}
    for name, fn in variants.items():
        outputs[name], error = try_call(fn)
        if error:
            results[name] = {"error": error}
    live = [(name, fn) for name, fn in variants.items() if name not in results]
    start = time.perf_counter()
    for _ in range(warmup):
        for _, fn in live:
            mx.eval(fn())
    if min_time_s and live:
        per_call = (time.perf_counter() - start) / max(warmup * len(live), 1)
        iters = max(iters, min(MAX_ITERS, math.ceil(min_time_s / per_call)))
    samples: dict[str, list[float]] = {name: [] for name, _ in live}
    order = random.Random(0)
    for _ in range(iters):
        for name, fn in order.sample(live, len(live)):
            start = time.perf_counter()
            mx.eval(fn())
            samples[name].append(time.perf_counter() - start)
    results.update({name: summarize_seconds(values) for name, values in samples.items()})
    return {name: results[name] for name in variants}, outputs


def summarize_seconds(values: list[float]) -> dict:
    """Median and interquartile range in microseconds (the IQR says how far to trust a ratio)."""
    q1, _, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (values[0],) * 3
    return {"us": round(statistics.median(values) * 1e6, 2), "iqr_us": round((q3 - q1) * 1e6, 2), "n": len(values)}


def ratio(row: dict, num: str, den: str) -> float | None:
    """time(num) / time(den) from a row of `measure` results; None where either raised."""
    a, b = row.get(num, {}), row.get(den, {})
    return round(a["us"] / b["us"], 3) if "us" in a and "us" in b else None


def max_abs_err(out: Any, reference: mx.array) -> float:
    return float(mx.max(mx.abs(out.astype(mx.float32) - reference.astype(mx.float32))).item())


# ---- rewrites ---------------------------------------------------------------------------------------
def forced(rewrite: str, rule: Rule = qmm_rule.RULE) -> Rule:
    """A built-in rule (the broadcast quantized-matmul rule unless named) with its choice of rewrite forced
    wherever it fires (to time fold and copy alike)."""
    return rule.forcing(rewrite)


def rewrites_chosen(explain: str) -> str:
    """The rewrites an `explain()` text reports ("fold", "drop_mask", "fold+copy", "none")."""
    chosen = sorted(set(re.findall(r" -> (\w+): ", explain)))
    return "+".join(chosen) or "none"


# ---- results ----------------------------------------------------------------------------------------
@dataclass
class Goal:
    """One target from the issue, checked on this run's rows."""

    text: str
    met: bool | None  # None: not applicable here (e.g. no row the goal speaks about)
    detail: str = ""

    @property
    def verdict(self) -> str:
        return {True: "MET", False: "MISSED", None: "n/a"}[self.met]


@dataclass
class Table:
    """A printable table: the same cells go to the terminal, the JSON and the Markdown report."""

    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)

    def text(self) -> str:
        widths = [max(len(str(c)) for c in col) for col in zip(self.columns, *self.rows)]
        lines = ["  ".join(str(c).rjust(w) for c, w in zip(row, widths)) for row in [self.columns, *self.rows]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in self.rows])


@dataclass
class Result:
    """What a case measured: raw rows, the table it prints, a short headline table, and its goals."""

    case: str
    title: str
    env: Env
    quick: bool
    grid: dict
    rows: list[dict]
    table: Table
    headline: Table
    goals: list[Goal]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Result":
        fields = dict(data, env=Env(**data["env"]), table=Table(**data["table"]), headline=Table(**data["headline"]),
                      goals=[Goal(**g) for g in data["goals"]])
        return cls(**fields)

    def write(self, out_dir: Path) -> Path:
        path = out_dir / f"{self.case}_{self.env.slug}.json"
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        return path

    def print(self) -> None:
        print(f"\n== {self.case}: {self.title}  [{self.env.device_name}, {self.env.backend}, {self.env.dtype}, "
              f"MLX {self.env.mlx}{', quick' if self.quick else ''}]")
        print(self.table.text())
        for note in self.notes:
            print(f"note: {note}")
        for goal in self.goals:
            print(f"goal {goal.verdict}: {goal.text}" + (f" ({goal.detail})" if goal.detail else ""))


def progress(case: str, row: dict, keys: tuple[str, ...], where: str = "") -> None:
    """One line per measured row on stderr, so a long GPU run shows where it is (and where it stopped);
    `where` says how far along, e.g. "12/90, 41 s"."""
    print(f"  {case}{f' [{where}]' if where else ''}: " + " ".join(f"{k}={row[k]}" for k in keys), file=sys.stderr,
          flush=True)


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def fmt_time(entry: dict) -> str:
    """A `measure` entry as a cell: microseconds, 'raises' for a call MLX rejected, 'crashed' for one that took
    its process down (bench/isolated.py)."""
    return failure(entry) or f"{entry['us']:.0f}"


def fmt_ratio(row: dict, num: str, den: str) -> str:
    """A ratio cell: the number, or why there is none (the failure of the side that failed)."""
    value = ratio(row, num, den)
    return fmt(value) if value is not None else failure(row[num]) or failure(row[den]) or "-"


def failures(entries) -> str:
    """How many of some entries failed, by kind: "3 crashed, 1 raises" ("" when none did)."""
    kinds = [kind for kind in map(failure, entries) if kind]
    return ", ".join(f"{kinds.count(kind)} {kind}" for kind in ("crashed", "raises") if kind in kinds)


def failure(entry: dict) -> str | None:
    """'crashed', 'raises', or None for an entry that was timed."""
    return "crashed" if entry.get("crashed") else "raises" if "error" in entry else None


def fmt_span(values) -> str:
    """The range of some ratios as 'min-max' (None values skipped)."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    low, high = f"{min(values):.2f}", f"{max(values):.2f}"
    return low if low == high else f"{low}-{high}"
