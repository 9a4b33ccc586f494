"""Case mlx_lm: mlx-lm decode tokens/s with the model wrapped by `mlxrewrite.mlx_lm.wrap` vs unwrapped.

A random-weight mlx-lm Llama decodes greedily (each step feeds back its own argmax) after a
prompt prefill, with a float KV cache and with mlx-lm's 8-bit quantized cache (`to_quantized` after
prefill, as `kv_bits=8, quantized_kv_start=0` does), at batch 1 and 4 (identical-length prompts).
`wrap` rewrites in place, so two models sharing the same weight arrays run side by side, one wrapped
and one not, alternating single decode steps; each round decodes `steps` tokens, then trims them back.
With a float cache no rule fires, so the ratio is the wrapper's pure overhead; with the quantized cache
the GQA rule fires (on CUDA the unwrapped call is wrong or raises, see the gqa case).
"""

from __future__ import annotations

import time
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from bench.common import FAILURES, Env, Goal, Result, Table, fmt, progress, rewrites_chosen, summarize_seconds
from bench.models import llama
from bench.plots import grouped_bars

FULL = {"hidden": 2048, "layers": 16, "heads": 32, "kv_heads": 8, "vocab": 32000, "prompt": 4096, "steps": 64,
        "rounds": 5, "batch": [1, 4], "cache": ["float", "q8"]}  # Llama-3.2-1B-like shapes
QUICK = {"hidden": 256, "layers": 4, "heads": 4, "kv_heads": 1, "vocab": 1024, "prompt": 256, "steps": 16,
         "rounds": 7, "batch": [1, 4], "cache": ["float", "q8"]}
KV_BITS, KV_GROUP, PREFILL_CHUNK = 8, 64, 1024
NO_RULE_GOAL = 0.98


def prefill(model: nn.Module, prompt: mx.array, cache_kind: str) -> list[Any]:
    """A prompt cache filled with `prompt`, quantized afterwards for "q8" (as mlx-lm's generate does)."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    for start in range(0, prompt.shape[1], PREFILL_CHUNK):
        model(prompt[:, start:start + PREFILL_CHUNK], cache=cache)
        mx.eval([c.state for c in cache])
    if cache_kind == "q8":
        cache = [c.to_quantized(group_size=KV_GROUP, bits=KV_BITS) for c in cache]
    return cache


class Decoder:
    """One model on its own prefilled cache, decoding greedily one timed step at a time."""

    def __init__(self, model: nn.Module, cache: list[Any], first: mx.array):
        self.model, self.cache, self.first = model, cache, first
        self.offset = cache[0].offset
        self.y = first

    def step(self) -> float:
        start = time.perf_counter()
        self.y = mx.argmax(self.model(self.y, cache=self.cache)[:, -1:, :], axis=-1)
        mx.eval(self.y)
        return time.perf_counter() - start

    def rewind(self) -> None:
        """Back to the prompt: trim this round's tokens from the cache."""
        for c in self.cache:
            c.trim(c.offset - self.offset)
        self.y = self.first


def measure_config(models: dict[str, nn.Module], batch: int, cache_kind: str, grid: dict) -> dict:
    """Decode steps of the models in turn (step i of each, then step i+1), median seconds per step.

    Alternating single steps, not whole rounds, so load from other processes hits both models alike.
    Round 0 is a warmup (it also lets the wrapper analyse its calls); a model that raises is recorded.
    """
    mx.random.seed(1)
    prompt = mx.repeat(mx.random.randint(0, grid["vocab"], (1, grid["prompt"])), batch, axis=0)  # equal lengths
    decoders = {name: Decoder(model, prefill(model, prompt[:, :-1], cache_kind), prompt[:, -1:])
                for name, model in models.items()}
    row: dict = {"batch": batch, "cache": cache_kind, "context": grid["prompt"]}
    samples: dict[str, list[float]] = {name: [] for name in models}
    for round_ in range(grid["rounds"] + 1):
        for _ in range(grid["steps"]):
            for name in [n for n in decoders if n not in row]:
                try:
                    elapsed = decoders[name].step()
                except FAILURES as error:
                    row[name] = {"error": str(error).splitlines()[0][:160]}
                    continue
                if round_:
                    samples[name].append(elapsed)
        for decoder in decoders.values():
            decoder.rewind()
    for name, values in samples.items():
        if name not in row:
            stats = summarize_seconds(values)
            row[name] = dict(stats, tokens_per_s=round(batch * 1e6 / stats["us"], 1))
    tps = [row[name].get("tokens_per_s") for name in models]
    row["wrapped/unwrapped"] = round(tps[1] / tps[0], 3) if all(tps) else None
    return row


def run(env: Env, quick: bool) -> Result | None:
    try:
        import mlxrewrite.mlx_lm as mrl
    except ImportError:
        print("skipped: mlxrewrite.mlx_lm not available")
        return None
    grid = QUICK if quick else FULL
    unwrapped = llama(grid["hidden"], grid["layers"], grid["heads"], grid["kv_heads"], grid["vocab"], env.mx_dtype)
    wrapped = llama(grid["hidden"], grid["layers"], grid["heads"], grid["kv_heads"], grid["vocab"], env.mx_dtype)
    wrapped.update(unwrapped.parameters())  # the same weight arrays: identical models, no extra memory
    rows = []
    for cache_kind in grid["cache"]:
        for batch in grid["batch"]:
            mrl.wrap(wrapped, check_masks=False)  # a fresh wrapper per configuration: its explain() is this row's
            row = measure_config({"unwrapped": unwrapped, "wrapped": wrapped}, batch, cache_kind, grid)
            row["rewrites"] = rewrites_chosen(mrl.explain(wrapped))
            mrl.unwrap(wrapped)
            progress("mlx_lm", row, ("cache", "batch", "rewrites", "wrapped/unwrapped"))
            rows.append(row)
    table = Table(["cache", "batch", "context", "unwrapped tok/s", "wrapped tok/s", "wrapped/unwrapped",
                   "rewrites"], [[r["cache"], r["batch"], r["context"], _tps(r["unwrapped"]), _tps(r["wrapped"]),
                                  fmt(r["wrapped/unwrapped"], ".3f"), r["rewrites"]] for r in rows])
    return Result("mlx_lm", "mlx-lm greedy decode tokens/s, wrapped vs unwrapped", env, quick, grid, rows, table,
                  table, goals(rows))


def _tps(entry: dict) -> str:
    return "raises" if "error" in entry else f"{entry['tokens_per_s']:.1f}"


def goals(rows: list[dict]) -> list[Goal]:
    clean = [r for r in rows if r["rewrites"] == "none" and r["wrapped/unwrapped"] is not None]
    low = [r for r in clean if r["wrapped/unwrapped"] < NO_RULE_GOAL]
    detail = ", ".join(f"{r['cache']} b{r['batch']}: {r['wrapped/unwrapped']:.3f}" for r in clean)
    return [Goal(f"wrapped >= {NO_RULE_GOAL}x unwrapped tokens/s where no rule fires", (not low) if clean else None,
                 detail)]


def plot(result: Result, path) -> None:
    groups = {f"{r['cache']} cache, batch {r['batch']}": {name: r[name]["tokens_per_s"] for name in
                                                           ("unwrapped", "wrapped") if "tokens_per_s" in r[name]}
              for r in result.rows}
    grouped_bars(groups, path, title=f"mlx-lm decode tokens/s ({result.env.device_name})", ylabel="tokens/s")
