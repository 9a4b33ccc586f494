"""Case overhead: what mlxrewrite.compile costs where no rule fires (a 16-layer float model forward).

Steady state: per-call time against plain `mx.compile`, all variants interleaved over many calls, plus
an A/A control (a second `mx.compile(model)`) whose ratio is the run's noise floor. Two ways in:
`mlxrewrite.compile(model)` captures the module as `inputs=`/`outputs=` state (the tree is checked in
a few C-level passes per call, `signature.StateTree`), and `mlxrewrite.compile(fn)` on a function that
closes over the model. `mx.compile(model, inputs=state, outputs=state)` is the like-for-like baseline for
the first. Dispatch: host time per call without evaluation, what each way in adds free of device noise.
First call: trace + rules + `mx.compile` against `mx.compile`'s own first call, each on fresh function
objects so no compile cache is reused.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

import mlxrewrite
from bench.common import Env, Goal, Result, Table, fmt, max_abs_err, measure, ratio, summarize_seconds
from bench.models import llama
from bench.plots import grouped_bars

FULL = {"hidden": 512, "layers": 16, "heads": 8, "kv_heads": 2, "vocab": 4096, "tokens": 16, "iters": 1500,
        "dispatch_rounds": 200, "first_call_reps": 5}
QUICK = {"hidden": 256, "layers": 16, "heads": 8, "kv_heads": 2, "vocab": 1024, "tokens": 1, "iters": 60,
         "dispatch_rounds": 30, "first_call_reps": 3}
BASELINE = "mx.compile(model)"
CONTROL = "mx.compile(model) again"  # A/A: the same thing compiled twice differs only by noise
LIKE_FOR_LIKE = {"mlxrewrite.compile(model)": "mx.compile(model, inputs=state)"}  # the same state handling
STEADY_GOAL = 1.02
DISPATCH_CALLS = 10  # calls per dispatch sample


def variants(model: nn.Module) -> dict[str, Callable[[], Callable]]:
    """Each variant as a factory of a fresh compiled callable (fresh closures: no shared compile cache)."""
    def closure() -> Callable:
        return lambda tokens: model(tokens)
    return {
        BASELINE: lambda: mx.compile(closure()),
        CONTROL: lambda: mx.compile(closure()),
        "mx.compile(model, inputs=state)": lambda: mx.compile(closure(), inputs=model.state, outputs=model.state),
        "mlxrewrite.compile(model)": lambda: mlxrewrite.compile(model),
        "mlxrewrite.compile(fn)": lambda: mlxrewrite.compile(closure()),
    }


def first_calls(factories: dict[str, Callable[[], Callable]], tokens: mx.array, reps: int) -> dict[str, dict]:
    """Time of the first call (trace, compile, run) of fresh objects, variants interleaved per repetition.

    One untimed round first: MLX's CPU backend JIT-compiles fused kernels once per process, which would
    otherwise be charged to whichever variant happens to run first.
    """
    samples: dict[str, list[float]] = {name: [] for name in factories}
    for rep in range(reps + 1):
        for name, make in factories.items():
            fn = make()
            start = time.perf_counter()
            mx.eval(fn(tokens))
            if rep:
                samples[name].append(time.perf_counter() - start)
    return {name: summarize_seconds(values) for name, values in samples.items()}


def dispatch(fns: dict[str, Callable], tokens: mx.array, rounds: int) -> dict[str, dict]:
    """Host time per call without evaluating it (graph building and every Python layer), variants interleaved.

    Free of the device's time and noise, this is what a way in adds per call; steady-state times bury a few
    microseconds under a forward pass's spread.
    """
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(DISPATCH_CALLS):
                out = fn(tokens)
            samples[name].append((time.perf_counter() - start) / DISPATCH_CALLS)
            mx.eval(out)
    return {name: summarize_seconds(values) for name, values in samples.items()}


def run(env: Env, quick: bool) -> Result:
    grid = QUICK if quick else FULL
    model = llama(grid["hidden"], grid["layers"], grid["heads"], grid["kv_heads"], grid["vocab"], env.mx_dtype)
    tokens = mx.random.randint(0, grid["vocab"], (1, grid["tokens"]))
    factories = variants(model)
    fns = {name: make() for name, make in factories.items()}
    steady, outputs = measure({name: (lambda f=fn: f(tokens)) for name, fn in fns.items()}, grid["iters"], warmup=5)
    host = dispatch(fns, tokens, grid["dispatch_rounds"])
    first = first_calls(factories, tokens, grid["first_call_reps"])
    rows = [_row(name, steady, host, first, outputs) for name in fns]
    return Result("overhead", "per-call and first-call overhead of mlxrewrite.compile, 16-layer float forward",
                  env, quick, grid, rows, table(rows, with_spread=True), table(rows, with_spread=False), goals(rows),
                  [_model_note(model)])


def table(rows: list[dict], with_spread: bool) -> Table:
    """One line per variant; `with_spread` adds the IQR and bitwise check (the printed table)."""
    base, base_host = rows[0]["steady"]["us"], rows[0]["dispatch"]["us"]
    columns = ["variant", "steady us", "+us vs mx.compile", "steady ratio", "dispatch us", "+dispatch us",
               "first call ms", "first ratio"]
    cells = [[r["variant"], f"{r['steady']['us']:.0f}", f"{r['steady']['us'] - base:+.0f}",
              fmt(r["steady_ratio"], ".3f"), f"{r['dispatch']['us']:.0f}", f"{r['dispatch']['us'] - base_host:+.0f}",
              f"{r['first_call']['us'] / 1e3:.1f}", fmt(r["first_call_ratio"])] for r in rows]
    if with_spread:
        columns += ["IQR us", "max diff"]
        for row, r in zip(cells, rows):
            row += [f"{r['steady']['iqr_us']:.0f}", f"{r['max_diff']:.1e}"]
    return Table(columns, cells)


def _row(name: str, steady: dict, host: dict, first: dict, outputs: dict[str, Any]) -> dict:
    return {"variant": name, "steady": steady[name], "dispatch": host[name], "first_call": first[name],
            "steady_ratio": ratio(steady, name, BASELINE), "first_call_ratio": ratio(first, name, BASELINE),
            "max_diff": max_abs_err(outputs[name], outputs[BASELINE])}


def _model_note(model: nn.Module) -> str:
    params = sum(v.size for _, v in tree_flatten(model.parameters()))
    return f"model: mlx-lm Llama, {len(model.layers)} layers, {params / 1e6:.1f}M parameters, called without cache"


def goals(rows: list[dict]) -> list[Goal]:
    by_name = {r["variant"]: r for r in rows}
    noise = f"noise floor {abs(by_name[CONTROL]['steady_ratio'] - 1):.1%} (A/A control)"
    out = []
    for name in ("mlxrewrite.compile(fn)", "mlxrewrite.compile(model)"):
        r = by_name[name]["steady_ratio"]
        out.append(Goal(f"steady state {name} <= {STEADY_GOAL}x {BASELINE}", r is not None and r <= STEADY_GOAL,
                        f"{r:.3f}x; {noise}"))
    for name, twin in LIKE_FOR_LIKE.items():
        r = round(by_name[name]["steady"]["us"] / by_name[twin]["steady"]["us"], 3)
        extra = by_name[name]["dispatch"]["us"] - by_name[twin]["dispatch"]["us"]
        out.append(Goal(f"steady state {name} <= {STEADY_GOAL}x {twin} (like for like)", r <= STEADY_GOAL,
                        f"{r:.3f}x; {noise}; host time per call {extra:+.0f} us"))
    exact = all(r["max_diff"] == 0 for r in rows)
    out.append(Goal("no rule fires: output bitwise equal to mx.compile", exact,
                    "" if exact else f"max diff {max(r['max_diff'] for r in rows):.1e}"))
    return out


def plot(result: Result, path) -> None:
    """Per-call and first-call time of each variant, relative to mx.compile(model)."""
    groups = {"steady state": {r["variant"]: r["steady_ratio"] for r in result.rows},
              "first call": {r["variant"]: r["first_call_ratio"] for r in result.rows}}
    grouped_bars(groups, path, title=f"mlxrewrite.compile overhead vs mx.compile ({result.env.device_name})",
                 ylabel="time / mx.compile(model) time")
