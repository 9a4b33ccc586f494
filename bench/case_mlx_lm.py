"""Case mlx_lm: mlx-lm decode tokens/s with the model wrapped by `mlxrewrite.mlx_lm.wrap` vs unwrapped.

A random-weight mlx-lm Llama (float16 weights, or 4-bit quantized weights as most mlx-lm models ship)
decodes greedily (each step feeds back its own argmax) after a prompt prefill, with a float KV cache and
with mlx-lm's 8-bit quantized cache (`to_quantized` after prefill, as `kv_bits=8, quantized_kv_start=0`
does), at batch 1 and 4 (identical-length prompts). `wrap` rewrites in place, so two models sharing the
same weight arrays run side by side, one wrapped and one not. With a float cache no rule fires, so the
ratio is the wrapper's pure overhead; with the quantized cache the GQA rule fires (on CUDA the unwrapped
call is wrong or raises, see the gqa case). The unwrapped model runs mlx-lm's own code modules, which the
wrapped twin has instrumented: its attention calls pass through a dispatcher that finds no handler (about
half a microsecond each); its linear layers do not.

Two timings per configuration:
- steps: one decode step at a time, `mx.eval` after each, the models alternating step by step. Python
  time is fully exposed: the worst case for the wrapper.
- pipelined: rounds of `steps` tokens as `mlx_lm.generate` runs them (the next step is built while the
  device computes the current one, `mx.async_eval`), the models alternating round by round (ABBA).
  These are the tokens/s a user of `generate` sees.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn

from bench.common import FAILURES, Env, Goal, Result, Table, fmt, progress, rewrites_chosen, summarize_seconds
from bench.models import llama
from bench.plots import grouped_bars

FULL = {"hidden": 2048, "layers": 16, "heads": 32, "kv_heads": 8, "vocab": 32000, "prompt": 4096, "steps": 64,
        "rounds": 5, "batch": [1, 4], "cache": ["float", "q8"], "weights": ["float", "q4"]}  # Llama-3.2-1B-like
QUICK = {"hidden": 256, "layers": 4, "heads": 4, "kv_heads": 1, "vocab": 1024, "prompt": 256, "steps": 16,
         "rounds": 7, "batch": [1, 4], "cache": ["float", "q8"], "weights": ["float", "q4"]}
KV_BITS, KV_GROUP, PREFILL_CHUNK, WEIGHT_BITS = 8, 64, 1024, 4
PIPELINED_ROUNDS = 3  # x rounds: a pipelined round gives one sample per model, not one per step
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

    def _next(self, y: mx.array) -> mx.array:
        return mx.argmax(self.model(y, cache=self.cache)[:, -1:, :], axis=-1)

    def step(self) -> float:
        start = time.perf_counter()
        self.y = self._next(self.y)
        mx.eval(self.y)
        return time.perf_counter() - start

    def pipelined(self, steps: int) -> float:
        """Seconds per token over `steps` tokens decoded as mlx-lm's `generate_step` does."""
        start = time.perf_counter()
        y = self._next(self.y)
        mx.async_eval(y)
        for _ in range(steps - 1):
            following = self._next(y)
            mx.async_eval(following)
            y.tolist()  # generate_step hands this token out while `following` computes
            y = following
        y.tolist()
        return (time.perf_counter() - start) / steps

    def rewind(self) -> None:
        """Back to the prompt: trim this round's tokens from the cache."""
        for c in self.cache:
            c.trim(c.offset - self.offset)
        self.y = self.first


def measure_config(models: dict[str, nn.Module], batch: int, cache_kind: str, grid: dict) -> dict:
    """Per model: median seconds per decode step (steps), and per token in pipelined rounds."""
    mx.random.seed(1)
    prompt = mx.repeat(mx.random.randint(0, grid["vocab"], (1, grid["prompt"])), batch, axis=0)  # equal lengths
    decoders = {name: Decoder(model, prefill(model, prompt[:, :-1], cache_kind), prompt[:, -1:])
                for name, model in models.items()}
    row: dict = {"batch": batch, "cache": cache_kind, "context": grid["prompt"]}
    failed: dict[str, dict] = {}
    steps = _alternate(decoders, grid["rounds"], failed, Decoder.step, grid["steps"])
    pipelined = _alternate(decoders, PIPELINED_ROUNDS * grid["rounds"], failed,
                           lambda d: d.pipelined(grid["steps"]), 1)
    row.update(_summary(steps, failed, batch))
    row["pipelined"] = _summary(pipelined, failed, batch)
    return row


def _alternate(decoders: dict[str, Decoder], rounds: int, failed: dict[str, dict],
               timed: Callable[[Decoder], float], per_round: int) -> dict[str, list[float]]:
    """`per_round` samples of `timed(decoder)` per model and round, the models taking turns sample by
    sample (in ABBA order over rounds) so that load from other processes hits both alike. Round 0 is a
    warmup (it also lets the wrapper analyse its calls). A model that raises is recorded in `failed` and
    left out from then on. Each round ends by trimming the decoded tokens from the caches."""
    samples: dict[str, list[float]] = {name: [] for name in decoders}
    for round_ in range(rounds + 1):
        order = list(decoders) if round_ % 2 == 0 else list(decoders)[::-1]
        for _ in range(per_round):
            for name in [n for n in order if n not in failed]:
                try:
                    elapsed = timed(decoders[name])
                except FAILURES as error:
                    failed[name] = {"error": str(error).splitlines()[0][:160]}
                    continue
                if round_:
                    samples[name].append(elapsed)
        for decoder in decoders.values():
            decoder.rewind()
    return samples


def _summary(samples: dict[str, list[float]], failed: dict[str, dict], batch: int) -> dict:
    """Per model: median and IQR (us per token step), tokens/s, or the error; and wrapped/unwrapped."""
    out: dict = {}
    for name, values in samples.items():
        if name in failed:
            out[name] = failed[name]
        else:
            stats = summarize_seconds(values)
            out[name] = dict(stats, tokens_per_s=round(batch * 1e6 / stats["us"], 1))
    tps = [out[name].get("tokens_per_s") for name in samples]
    out["wrapped/unwrapped"] = round(tps[1] / tps[0], 3) if all(tps) else None
    return out


def model_pair(grid: dict, weights: str, dtype: mx.Dtype) -> tuple[nn.Module, nn.Module]:
    """Two identical Llamas sharing one set of weight arrays (float, or quantized as mlx-lm ships them)."""
    models = [llama(grid["hidden"], grid["layers"], grid["heads"], grid["kv_heads"], grid["vocab"], dtype)
              for _ in range(2)]
    if weights == "q4":
        for model in models:
            nn.quantize(model, group_size=KV_GROUP, bits=WEIGHT_BITS)
    models[1].update(models[0].parameters())  # the same weight arrays: identical models, no extra memory
    mx.eval(models[0].parameters())
    return models[0], models[1]


def run(env: Env, quick: bool) -> Result | None:
    try:
        import mlxrewrite.mlx_lm as mrl
    except ImportError:
        print("skipped: mlxrewrite.mlx_lm not available")
        return None
    grid = QUICK if quick else FULL
    rows = []
    for weights in grid["weights"]:
        unwrapped, wrapped = model_pair(grid, weights, env.mx_dtype)
        for cache_kind in grid["cache"]:
            for batch in grid["batch"]:
                mrl.wrap(wrapped, check_masks=False)  # a fresh wrapper per configuration: its explain() is this row's
                row = {"weights": weights, **measure_config({"unwrapped": unwrapped, "wrapped": wrapped}, batch,
                                                             cache_kind, grid)}
                row["rewrites"] = rewrites_chosen(mrl.explain(wrapped))
                mrl.unwrap(wrapped)
                progress("mlx_lm", row, ("weights", "cache", "batch", "rewrites", "wrapped/unwrapped"))
                rows.append(row)
    table = Table(["weights", "cache", "batch", "context", "unwrapped tok/s", "wrapped tok/s", "steps w/u",
                   "pipelined unwrapped tok/s", "pipelined wrapped tok/s", "pipelined w/u", "rewrites"],
                  [[r["weights"], r["cache"], r["batch"], r["context"], _tps(r["unwrapped"]), _tps(r["wrapped"]),
                    fmt(r["wrapped/unwrapped"], ".3f"), _tps(r["pipelined"]["unwrapped"]),
                    _tps(r["pipelined"]["wrapped"]), fmt(r["pipelined"]["wrapped/unwrapped"], ".3f"), r["rewrites"]]
                   for r in rows])
    return Result("mlx_lm", "mlx-lm greedy decode tokens/s, wrapped vs unwrapped", env, quick, grid, rows, table,
                  table, goals(rows))


def _tps(entry: dict) -> str:
    return "raises" if "error" in entry else f"{entry['tokens_per_s']:.1f}"


def goals(rows: list[dict]) -> list[Goal]:
    clean = [r for r in rows if r["rewrites"] == "none"]
    return [_no_rule_goal(clean, "pipelined, as mlx_lm.generate decodes", lambda r: r["pipelined"]),
            _no_rule_goal(clean, "one synchronised step at a time (all Python time exposed)", lambda r: r)]


def _no_rule_goal(rows: list[dict], how: str, timing) -> Goal:
    measured = [(r, timing(r)["wrapped/unwrapped"]) for r in rows if timing(r)["wrapped/unwrapped"] is not None]
    detail = ", ".join(f"{r['weights']} weights {r['cache']} cache b{r['batch']}: {value:.3f}" for r, value in measured)
    return Goal(f"wrapped >= {NO_RULE_GOAL}x unwrapped tokens/s where no rule fires, {how}",
                all(value >= NO_RULE_GOAL for _, value in measured) if measured else None, detail)


def plot(result: Result, path) -> None:
    groups = {f"{r['weights']} w, {r['cache']} kv, b{r['batch']}": {
        f"{name}{suffix}": timing[name]["tokens_per_s"] for suffix, timing in ((" (steps)", r), ("", r["pipelined"]))
        for name in ("unwrapped", "wrapped") if "tokens_per_s" in timing[name]} for r in result.rows}
    grouped_bars(groups, path, title=f"mlx-lm decode tokens/s ({result.env.device_name})", ylabel="tokens/s")
