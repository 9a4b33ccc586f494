"""Case gqa: mlx-lm's GQA attention over a quantized KV cache (one decode/verify step), as shipped vs rewritten.

The as-shipped call (`mx.compile`) broadcasts the cache with `expand_dims(-3)`: wrong on CUDA and on
Metal's vector kernel, correct on CPU. Variants: as shipped, `mlxrewrite.compile` (the policy's choice: the
fused kernel where verified), the same without the fused rule (unfused), fold forced, copy forced, and float
attention over the dequantized cache (what a float cache would cost).
Errors are max |out - float32 attention over the dequantized cache|. Bandwidth: bytes of the quantized
K/V (w + scales + biases of both) / time of the rewritten call, against the device's HBM roofline.

Each row runs in a child process (bench/isolated.py): on an H100 a row died with "an illegal memory
access", which kills the CUDA context. A crashed row runs again without the as-shipped call; as shipped
is then recorded as crashed, and the other variants as measured. A row that crashes without it too is
lost (recorded, left out of the goals). On a GPU the default grid is `GPU`, and `--budget-s` stops
starting rows after that many seconds (the rows left out are listed in the notes).
"""

from __future__ import annotations

import math
import time
from typing import Callable

import mlx.core as mx

import mlxrewrite
from mlxrewrite.examples import gqa_quantized_attention as gqa
from bench.common import Env, Goal, Result, Table, failure, failures, fmt, fmt_ratio, fmt_span, fmt_time, forced, \
    max_abs_err, measure, progress, ratio, rewrites_chosen
from bench.isolated import Worker, stage
from bench.plots import line_panels

B, N_KV, N_REP, GROUP = gqa.B, 8, gqa.N_REP, 64  # Llama-3-8B-like heads: 32 query heads over 8 kv heads
FULL = {"N": [2048, 4096, 8192, 16384, 32768], "M": [1, 2, 4, 8, 16], "bits": [4, 8], "D": [64, 128, 256],
        "iters": 30}
# The default on a GPU. On a fresh H100 most of a row's time is MLX compiling (NVRTC) the quantized kernels
# its shapes need: up to ~60 s for a new M regime, against ~1 s to time a row. So this grid spans the three
# regimes (decode, small and large verify: 4, 16, 64 folded rows) rather than five; with --budget-s the run
# stops starting rows in time either way.
GPU = {"N": [2048, 8192, 32768], "M": [1, 4, 16], "bits": [4, 8], "D": [64, 128, 256], "iters": 30}
QUICK = {"N": [2048, 8192], "M": [1, 4], "bits": [4, 8], "D": [64], "iters": 8}
VARIANTS = ("as_shipped", "rewritten", "unfused", "fold", "copy", "float")
FUSED = "fused-quantized-attention"
SPEEDUP_GOAL, SPEEDUP_FROM_N, NOISE = 0.5, 4096, 0.03
PROGRESS = ("bits", "D", "N", "M", "rewrite_chosen", "rewritten/as_shipped", "rewritten/copy")
TARGET = "bench.case_gqa:measure_row"  # what the child process runs per row (bench/isolated.py)


def float_attention(queries: mx.array, keys: mx.array, values: mx.array) -> mx.array:
    return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=1.0)


def inputs(n: int, m: int, d: int, bits: int, dtype: mx.Dtype) -> tuple[tuple, tuple, mx.array]:
    """(quantized-call arguments, float operands over the dequantized cache, float32 reference), evaluated."""
    args = gqa.example_inputs(n, m, d=d, n_kv=N_KV, key_bits=bits, value_bits=bits, group_size=GROUP, dtype=dtype)
    queries, k_q, v_q = args[0], args[1:4], args[4:]
    k_d, v_d = (mx.dequantize(*a, group_size=GROUP, bits=bits) for a in (k_q, v_q))
    reference = float_attention(*(a.astype(mx.float32) for a in (queries, k_d, v_d)))
    mx.eval(args, k_d, v_d, reference)
    return args, (queries, k_d, v_d), reference


def variants(bits: int) -> dict[str, Callable]:
    """"rewritten" is the policy's choice (the fused kernel where it was verified); "unfused" the same without
    it (MLX's own quantized kernels); fold and copy are forced, unfused."""
    attention = gqa.make_attention(key_bits=bits, value_bits=bits, group_size=GROUP)
    return {"as_shipped": mx.compile(attention), "rewritten": mlxrewrite.compile(attention),
            "unfused": mlxrewrite.compile(attention, disable=FUSED),
            "fold": mlxrewrite.compile(attention, rules=[forced("fold")], disable=FUSED),
            "copy": mlxrewrite.compile(attention, rules=[forced("copy")], disable=FUSED),
            "float": mx.compile(float_attention)}


def measure_row(n: int, m: int, d: int, bits: int, dtype: str, iters: int, skip: tuple[str, ...] = ()) -> dict:
    """One row's variants (but `skip`) timed side by side, with their errors: runs in the child process."""
    where = f"bits={bits} D={d} N={n} M={m}"
    stage(f"{where}: inputs and reference")
    args, floats, reference = inputs(n, m, d, bits, getattr(mx, dtype))
    fns = {name: fn for name, fn in variants(bits).items() if name not in skip}
    stage(f"{where}: {', '.join(fns)}")
    timed, outputs = measure({name: (lambda f=fn, a=floats if name == "float" else args: f(*a))
                              for name, fn in fns.items()}, iters)
    row = {"N": n, "M": m, "D": d, "bits": bits, "kv_bytes": sum(a.nbytes for a in args[1:])}
    for name, out in outputs.items():
        row[name] = timed[name] if out is None else dict(timed[name], max_err=max_abs_err(out, reference))
    row["rewrite_chosen"] = rewrites_chosen(fns["rewritten"].explain()) if "rewritten" in fns else "?"
    return row


def row_in_child(worker: Worker, n: int, m: int, d: int, bits: int, env: Env, iters: int) -> dict:
    """A row measured in the child. If the child crashes, the row runs again without the as-shipped call (the
    one known to read out of bounds); if it crashes then too, the row is lost (`lost`: where and why)."""
    params = dict(n=n, m=m, d=d, bits=bits, dtype=env.dtype, iters=iters)
    row = worker.run(TARGET, **params)
    if row.get("crashed"):
        crash = row
        row = worker.run(TARGET, **params, skip=["as_shipped"])
        if row.get("crashed"):
            row = {"N": n, "M": m, "D": d, "bits": bits, "kv_bytes": None, "rewrite_chosen": "?", "lost": row,
                   **{name: row for name in VARIANTS}}
        row["as_shipped"] = crash
    return with_ratios(row, env)


def with_ratios(row: dict, env: Env) -> dict:
    """The ratios and the bandwidth of the rewritten call against the device's roofline."""
    for other in ("as_shipped", "copy", "float"):
        row[f"rewritten/{other}"] = ratio(row, "rewritten", other)
    bandwidth = row["kv_bytes"] / (row["rewritten"]["us"] * 1e-6) if "us" in row["rewritten"] else None
    row["GB/s"] = round(bandwidth / 1e9, 2) if bandwidth else None
    row["roofline_frac"] = round(bandwidth / env.roofline_bytes_per_s, 3) \
        if bandwidth and env.roofline_bytes_per_s else None
    return row


def run(env: Env, quick: bool, budget_s: float | None = None) -> Result:
    grid = QUICK if quick else FULL if env.backend == "cpu" else GPU
    cells = [(n, m, d, bits) for bits in grid["bits"] for d in grid["D"] for n in grid["N"] for m in grid["M"]]
    rows, skipped = [], []
    start = time.perf_counter()
    with Worker() as worker:
        for number, (n, m, d, bits) in enumerate(cells, 1):
            if budget_s is not None and time.perf_counter() - start > budget_s:
                skipped = cells[number - 1:]
                break
            rows.append(row_in_child(worker, n, m, d, bits, env, grid["iters"]))
            progress("gqa", rows[-1], PROGRESS, f"{number}/{len(cells)}, {time.perf_counter() - start:.0f} s, "
                                                f"as shipped {fmt_time(rows[-1]['as_shipped'])}")
    budget_note = [f"time budget {budget_s:.0f} s: measured {len(rows)}/{len(cells)} rows; not measured: "
                   + ", ".join(f"bits={b} D={d} N={n} M={m}" for n, m, d, b in skipped)] if skipped else []
    return Result("gqa", "GQA quantized-KV attention: as shipped vs rewritten", env, quick,
                  dict(grid, B=B, n_kv=N_KV, n_rep=N_REP, group_size=GROUP, budget_s=budget_s), rows, table(rows),
                  headline(rows), goals(rows), notes(rows) + budget_note)


def table(rows: list[dict]) -> Table:
    columns = ["bits", "D", "N", "M", *(f"{v} us" for v in VARIANTS), "chosen", "rw/shipped", "rw/copy",
               "GB/s", "roofline", "err shipped", "err rw"]
    return Table(columns, [[r["bits"], r["D"], r["N"], r["M"], *(fmt_time(r[v]) for v in VARIANTS),
                            r["rewrite_chosen"], fmt_ratio(r, "rewritten", "as_shipped"),
                            fmt_ratio(r, "rewritten", "copy"), fmt(r["GB/s"], ".3g"), fmt(r["roofline_frac"], ".0%"),
                            _err(r["as_shipped"]), _err(r["rewritten"])] for r in rows])


def _err(entry: dict) -> str:
    return failure(entry) or f"{entry['max_err']:.1e}"


def headline(rows: list[dict]) -> Table:
    """Per (bits, D): the ratio ranges over N >= 4k, the best bandwidth, and the worst errors."""
    out = Table(["bits", "D", f"rw/shipped (N>={SPEEDUP_FROM_N})", "rw/copy", "best GB/s", "roofline",
                 "max err shipped", "max err rw"])
    for bits, d in sorted({(r["bits"], r["D"]) for r in rows}):
        group = [r for r in rows if (r["bits"], r["D"]) == (bits, d)]
        big = [r for r in group if r["N"] >= SPEEDUP_FROM_N]
        best = max(group, key=lambda r: r["GB/s"] or 0)
        shipped = ", ".join(filter(None, (fmt_span(r["rewritten/as_shipped"] for r in big),
                                          failures(r["as_shipped"] for r in big))))
        out.rows.append([bits, d, shipped, fmt_span(r["rewritten/copy"] for r in group), fmt(best["GB/s"], ".3g"),
                         fmt(best["roofline_frac"], ".0%"), _worst(r["as_shipped"] for r in group),
                         _worst(r["rewritten"] for r in group)])
    return out


def _worst(entries) -> str:
    """The largest error among the entries that ran, and how many did not."""
    entries = list(entries)
    errors = [e["max_err"] for e in entries if "max_err" in e]
    return ", ".join(filter(None, (f"{max(errors):.1e}" if errors else "", failures(entries))))


def goals(rows: list[dict]) -> list[Goal]:
    return [speed_goal(rows), copy_goal(rows)]


def speed_goal(rows: list[dict]) -> Goal:
    """Rows where as shipped raised or crashed count as met: the rewrite runs what as shipped cannot run at all
    (an infinite speed-up). Rows where the rewrite itself failed count as missed; lost rows are left out."""
    lost = [r for r in rows if "lost" in r]
    big = [r for r in rows if r["N"] >= SPEEDUP_FROM_N and r["rewrite_chosen"] not in ("none", "?")]
    failed = [r for r in big if "error" in r["rewritten"]]
    unrunnable = [r for r in big if "error" in r["as_shipped"] and r not in failed]
    slow = [r for r in big if r["rewritten/as_shipped"] is not None and r["rewritten/as_shipped"] > SPEEDUP_GOAL]
    missed = failed + slow
    detail = [f"{len(big) - len(missed)}/{len(big)} rows"]
    if unrunnable:
        detail.append(f"met by default in {len(unrunnable)} where as shipped failed "
                      f"({failures(r['as_shipped'] for r in unrunnable)}): only the rewrite runs there")
    if failed:
        detail.append(f"the rewrite failed in {len(failed)}")
    if slow:
        detail.append(f"worst {max(r['rewritten/as_shipped'] for r in slow):.2f}")
    if lost:
        detail.append(f"{len(lost)} rows lost to a crash without as shipped too (see their 'lost' entry)")
    return Goal(f"rewritten <= {SPEEDUP_GOAL}x as-shipped time at N >= {SPEEDUP_FROM_N} (rows where a rule fires)",
                (not missed) if big else None, "; ".join(detail))


def copy_goal(rows: list[dict]) -> Goal:
    """Rows where copy is wrong (on an H100, qmm_sm90 at head dim 64) count as met: the rewrite must not be as
    fast as a wrong answer."""
    wrong = [r for r in rows if is_wrong(r, "copy")]
    ratios = [r["rewritten/copy"] for r in rows if r["rewritten/copy"] is not None and r not in wrong]
    over = [x for x in ratios if x > 1 + NOISE]
    detail = f"{len(ratios) - len(over)}/{len(ratios)} rows, max {max(ratios):.2f}" if ratios else ""
    if wrong:
        detail += f"; met by default in {len(wrong)} where copy is wrong"
    return Goal(f"rewritten never slower than copy (rewritten/copy <= {1 + NOISE:.2f}, {NOISE:.0%} timing noise)",
                (not over) if ratios or wrong else None, detail)


def is_wrong(row: dict, variant: str) -> bool:
    """Is `variant`'s error NaN, or over 100x the rewritten call's (and 1e-2)?"""
    error, rewritten = row[variant].get("max_err"), row["rewritten"].get("max_err")
    if error is None or rewritten is None:
        return False
    return math.isnan(error) or error > max(100 * rewritten, 1e-2)


def notes(rows: list[dict]) -> list[str]:
    found = []
    for variant in ("as_shipped", "fold", "copy"):
        wrong = [r for r in rows if is_wrong(r, variant)]
        if wrong:
            found.append(f"{variant} is wrong in {len(wrong)}/{len(rows)} rows (error NaN or >100x the rewritten "
                         "one's): its times are not a like-for-like baseline there")
    return found


def plot(result: Result, path) -> None:
    """rewritten/as-shipped vs N, one line per M, one panel per (bits, D)."""
    panels = {}
    for r in result.rows:
        if r["rewritten/as_shipped"] is not None:
            panels.setdefault(f"{r['bits']}-bit, D={r['D']}", {}).setdefault(f"M={r['M']}", []).append(
                (r["N"], r["rewritten/as_shipped"]))
    line_panels(panels, path, title=f"GQA quantized attention, rewritten / as shipped ({result.env.device_name})",
                xlabel="N (cache length)", ylabel="time ratio", hline=SPEEDUP_GOAL, logx=True)
