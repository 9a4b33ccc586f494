"""Case gqa: mlx-lm's GQA attention over a quantized KV cache (one decode/verify step), as shipped vs rewritten.

The as-shipped call (`mx.compile`) broadcasts the cache with `expand_dims(-3)`: wrong on CUDA and on
Metal's vector kernel, correct on CPU. Variants: as shipped, `mlxrewrite.compile` (the policy's choice),
fold forced, copy forced, and float attention over the dequantized cache (what a float cache would cost).
Errors are max |out - float32 attention over the dequantized cache|. Bandwidth: bytes of the quantized
K/V (w + scales + biases of both) / time of the rewritten call, against the device's HBM roofline.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx

import mlxrewrite
from bench.common import Env, Goal, Result, Table, fmt, fmt_span, fmt_time, forced, max_abs_err, measure, \
    progress, ratio, rewrites_chosen
from bench.plots import line_panels

B, N_KV, N_REP, GROUP = 1, 8, 4, 64  # Llama-3-8B-like heads: 32 query heads over 8 kv heads
FULL = {"N": [2048, 4096, 8192, 16384, 32768], "M": [1, 2, 4, 8, 16], "bits": [4, 8], "D": [64, 128, 256],
        "iters": 30}
QUICK = {"N": [2048, 8192], "M": [1, 4], "bits": [4, 8], "D": [64], "iters": 8}
VARIANTS = ("as_shipped", "rewritten", "fold", "copy", "float")
SPEEDUP_GOAL, SPEEDUP_FROM_N, NOISE = 0.5, 4096, 0.03


def make_gqa(bits: int) -> Callable:
    """mlx-lm's quantized_scaled_dot_product_attention for pre-scaled queries, K and V at `bits`."""
    def gqa(queries, k_w, k_s, k_b, v_w, v_s, v_b):
        b, h, m, d = queries.shape
        q = queries.reshape(b, N_KV, N_REP, m, d)
        keys = [mx.expand_dims(a, -3) for a in (k_w, k_s, k_b)]
        values = [mx.expand_dims(a, -3) for a in (v_w, v_s, v_b)]
        scores = mx.quantized_matmul(q, *keys, transpose=True, group_size=GROUP, bits=bits)
        scores = mx.softmax(scores, axis=-1, precise=True)
        return mx.quantized_matmul(scores, *values, transpose=False, group_size=GROUP, bits=bits).reshape(b, h, m, d)
    return gqa


def float_attention(queries: mx.array, keys: mx.array, values: mx.array) -> mx.array:
    return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=1.0)


def inputs(n: int, m: int, d: int, bits: int, dtype: mx.Dtype) -> tuple[tuple, mx.array, mx.array]:
    """(quantized-call arguments, dequantized keys, dequantized values), all evaluated."""
    mx.random.seed(0)
    keys, values = (mx.random.normal((B, N_KV, n, d)).astype(dtype) for _ in range(2))
    queries = (mx.random.normal((B, N_KV * N_REP, m, d)) * d**-0.5).astype(dtype)
    k_q, v_q = (mx.quantize(a, group_size=GROUP, bits=bits) for a in (keys, values))
    k_d, v_d = (mx.dequantize(*a, group_size=GROUP, bits=bits) for a in (k_q, v_q))
    args = (queries, *k_q, *v_q)
    mx.eval(args, k_d, v_d)
    return args, k_d, v_d


def measure_row(n: int, m: int, d: int, bits: int, env: Env, iters: int) -> dict:
    args, k_d, v_d = inputs(n, m, d, bits, env.mx_dtype)
    reference = float_attention(*(a.astype(mx.float32) for a in (args[0], k_d, v_d)))
    gqa = make_gqa(bits)
    fns = {"as_shipped": mx.compile(gqa), "rewritten": mlxrewrite.compile(gqa),
           "fold": mlxrewrite.compile(gqa, rules=[forced("fold")]),
           "copy": mlxrewrite.compile(gqa, rules=[forced("copy")]), "float": mx.compile(float_attention)}
    operands = {name: (args[0], k_d, v_d) if name == "float" else args for name in fns}
    row = {"N": n, "M": m, "D": d, "bits": bits, "kv_bytes": sum(a.nbytes for a in args[1:])}
    timed, outputs = measure({name: (lambda f=fn, a=operands[name]: f(*a)) for name, fn in fns.items()}, iters)
    for name, out in outputs.items():
        row[name] = timed[name] if out is None else dict(timed[name], max_err=max_abs_err(out, reference))
    row["rewrite_chosen"] = rewrites_chosen(fns["rewritten"].explain())
    row["rewritten/as_shipped"] = ratio(row, "rewritten", "as_shipped")
    row["rewritten/copy"] = ratio(row, "rewritten", "copy")
    row["rewritten/float"] = ratio(row, "rewritten", "float")
    bandwidth = row["kv_bytes"] / (row["rewritten"]["us"] * 1e-6) if "us" in row["rewritten"] else None
    row["GB/s"] = round(bandwidth / 1e9, 2) if bandwidth else None
    row["roofline_frac"] = round(bandwidth / env.roofline_bytes_per_s, 3) \
        if bandwidth and env.roofline_bytes_per_s else None
    progress("gqa", row, ("bits", "D", "N", "M", "rewrite_chosen", "rewritten/as_shipped", "rewritten/copy"))
    return row


def run(env: Env, quick: bool) -> Result:
    grid = QUICK if quick else FULL
    rows = [measure_row(n, m, d, bits, env, grid["iters"])
            for bits in grid["bits"] for d in grid["D"] for n in grid["N"] for m in grid["M"]]
    return Result("gqa", "GQA quantized-KV attention: as shipped vs rewritten", env, quick,
                  dict(grid, B=B, n_kv=N_KV, n_rep=N_REP, group_size=GROUP), rows, table(rows), headline(rows),
                  goals(rows), notes(rows))


def table(rows: list[dict]) -> Table:
    columns = ["bits", "D", "N", "M", *(f"{v} us" for v in VARIANTS), "chosen", "rw/shipped", "rw/copy",
               "GB/s", "roofline", "err shipped", "err rw"]
    return Table(columns, [[r["bits"], r["D"], r["N"], r["M"], *(fmt_time(r[v]) for v in VARIANTS),
                            r["rewrite_chosen"], fmt(r["rewritten/as_shipped"]), fmt(r["rewritten/copy"]),
                            fmt(r["GB/s"], ".3g"), fmt(r["roofline_frac"], ".0%"), _err(r["as_shipped"]),
                            _err(r["rewritten"])] for r in rows])


def _err(entry: dict) -> str:
    return "raises" if "error" in entry else f"{entry['max_err']:.1e}"


def headline(rows: list[dict]) -> Table:
    """Per (bits, D): the ratio ranges over N >= 4k, the best bandwidth, and the worst errors."""
    out = Table(["bits", "D", f"rw/shipped (N>={SPEEDUP_FROM_N})", "rw/copy", "best GB/s", "roofline",
                 "max err shipped", "max err rw"])
    for bits, d in sorted({(r["bits"], r["D"]) for r in rows}):
        group = [r for r in rows if (r["bits"], r["D"]) == (bits, d)]
        big = [r for r in group if r["N"] >= SPEEDUP_FROM_N]
        best = max(group, key=lambda r: r["GB/s"] or 0)
        out.rows.append([bits, d, fmt_span(r["rewritten/as_shipped"] for r in big),
                         fmt_span(r["rewritten/copy"] for r in group), fmt(best["GB/s"], ".3g"),
                         fmt(best["roofline_frac"], ".0%"), _worst(r["as_shipped"] for r in group),
                         _worst(r["rewritten"] for r in group)])
    return out


def _worst(entries) -> str:
    entries = list(entries)
    if any("error" in e for e in entries):
        return "raises"
    return f"{max(e['max_err'] for e in entries):.1e}"


def goals(rows: list[dict]) -> list[Goal]:
    big = [r for r in rows if r["N"] >= SPEEDUP_FROM_N and r["rewrite_chosen"] != "none"]  # where the rule fires
    slow = [r for r in big if "error" not in r["as_shipped"] and r["rewritten/as_shipped"] > SPEEDUP_GOAL]
    raised = sum("error" in r["as_shipped"] for r in big)
    speed = Goal(f"rewritten <= {SPEEDUP_GOAL}x as-shipped time at N >= {SPEEDUP_FROM_N} (rows where a rule fires)",
                 (not slow) if big else None,
                 f"{len(big) - len(slow)}/{len(big)} rows" + (f", as shipped raised in {raised}" if raised else "")
                 + (f"; worst {max(r['rewritten/as_shipped'] for r in slow):.2f}" if slow else ""))
    ratios = [r["rewritten/copy"] for r in rows if r["rewritten/copy"] is not None]
    over = [x for x in ratios if x > 1 + NOISE]
    copy = Goal(f"rewritten never slower than copy (rewritten/copy <= {1 + NOISE:.2f}, {NOISE:.0%} timing noise)",
                (not over) if ratios else None,
                f"{len(ratios) - len(over)}/{len(ratios)} rows, max {max(ratios):.2f}" if ratios else "")
    return [speed, copy]


def notes(rows: list[dict]) -> list[str]:
    wrong = [r for r in rows if "max_err" in r["as_shipped"] and "max_err" in r["rewritten"]
             and r["as_shipped"]["max_err"] > max(100 * r["rewritten"]["max_err"], 1e-2)]
    if not wrong:
        return []
    return [f"as shipped is wrong in {len(wrong)}/{len(rows)} rows (error >100x the rewritten one's): "
            "its times are not a like-for-like baseline there"]


def plot(result: Result, path) -> None:
    """rewritten/as-shipped vs N, one line per M, one panel per (bits, D)."""
    panels = {}
    for r in result.rows:
        if r["rewritten/as_shipped"] is not None:
            panels.setdefault(f"{r['bits']}-bit, D={r['D']}", {}).setdefault(f"M={r['M']}", []).append(
                (r["N"], r["rewritten/as_shipped"]))
    line_panels(panels, path, title=f"GQA quantized attention, rewritten / as shipped ({result.env.device_name})",
                xlabel="N (cache length)", ylabel="time ratio", hline=SPEEDUP_GOAL, logx=True)
