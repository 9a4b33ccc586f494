"""mlx-lm with a quantized KV cache on the GPU, MHA and GQA: as shipped vs wrapped (issue 14, the CUDA legalisation).

Run (GPU machine): python -m bench.gpu_legalise [OUT_DIR] [--quick] [--budget-s S] [--prompts 4093]
[--no-kernel-rows]   (OUT_DIR defaults to $OUT)
Models: random Llamas, 16 layers, hidden 2048, 16 q heads with 16 (MHA) or 4 (GQA) kv heads, head dims 64 and
128, float16 (float32 on CPU). Each prompt (aligned 4096, unaligned 4093) is prefilled in chunks of 2048 as
`mlx_lm.generate` does with `kv_bits` and `quantized_kv_start=0` (the cache is quantized after the first chunk,
so later chunks go into the quantized cache), then 16 teacher-forced decode steps and one 4-token verification
step (speculative decoding's M = 4) run. A float-cache run is the reference; the 4- and 8-bit caches run as
shipped, wrapped, and wrapped with the legalisation forced to dequantize (to compare its rewrites with
dequantize by measurement). Each case records max |logits - float-cache logits|, argmax agreement, decode
tokens/s (median step) and the rewrites that ran, or the exception it raised. First, single attention calls on a
sliced cache (`kernel_rows`) check the kernels the rewrites pick against the dequantize-then-float reference.
One JSON line per case on stdout, all of them in OUT_DIR/legalise.json. Model cases not started within
--budget-s (default 240) are recorded skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import mlx.core as mx

import mlxrewrite
import mlxrewrite.mlx_lm as mrl
from bench.common import Env, forced, max_abs_err
from bench.models import llama
from mlxrewrite.backends.device import Backend
from mlxrewrite.rules.fused_quantized_attention import NAME as FUSED
from mlxrewrite.rules.quantized_matmul_legalise import RULE as LEGALISE

FULL = {"hidden": 2048, "layers": 16, "heads": 16, "kv_heads": [16, 4], "head_dims": [64, 128], "vocab": 32000,
        "prompts": [4096, 4093], "bits": [4, 8], "chunk": 2048, "steps": 16, "verify": 4}
QUICK = {"hidden": 256, "layers": 2, "heads": 16, "kv_heads": [16, 4], "head_dims": [64, 128], "vocab": 512,
         "prompts": [256, 253], "bits": [4, 8], "chunk": 128, "steps": 4, "verify": 4}
GROUP = 64
VARIANTS = ("as shipped", "wrapped", "wrapped, dequantize forced")


def teacher_forced(model, tokens: mx.array, grid: dict, kv_bits: int | None) -> tuple[mx.array, float]:
    """Logits of the prefill's last position, each forced decode step and the verification step; median s/step."""
    from mlx_lm.generate import maybe_quantize_kv_cache
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    prompt = tokens.shape[1] - grid["steps"] - grid["verify"]
    for start in range(0, prompt, grid["chunk"]):
        logits = model(tokens[:, start:min(prompt, start + grid["chunk"])], cache=cache)
        maybe_quantize_kv_cache(cache, 0, GROUP, kv_bits)  # what generate_step does after each chunk
        mx.eval([c.state for c in cache])
    outs, times = [logits[0, -1:].astype(mx.float32)], []
    for t in range(prompt, prompt + grid["steps"]):
        start = time.perf_counter()
        logits = model(tokens[:, t:t + 1], cache=cache)[0].astype(mx.float32)
        mx.eval(logits)
        times.append(time.perf_counter() - start)
        outs.append(logits)
    outs.append(model(tokens[:, prompt + grid["steps"]:], cache=cache)[0].astype(mx.float32))
    mx.eval(outs)
    return mx.concatenate(outs), sorted(times)[len(times) // 2]


def run_variant(model, tokens: mx.array, grid: dict, kv_bits: int | None, variant: str) -> dict[str, Any]:
    """One run; the exception it raised, if any, instead of its logits."""
    wrapped = variant != "as shipped"
    if wrapped:
        mrl.wrap(model, rules=[forced("dequantize", LEGALISE)] if "forced" in variant else None,
                 disable=FUSED)  # the safety net alone: the fused attention would take the decode steps
    try:
        logits, seconds = teacher_forced(model, tokens, grid, kv_bits)
        result: dict[str, Any] = {"logits": logits, "tokens_per_s": round(1 / seconds, 1)}
    except Exception as error:  # anything a case raises is its result
        result = {"error": f"{type(error).__name__}: {str(error)[:240]}"}
    if wrapped:
        result["calls"] = mrl.state(model).rewriter.calls
        mrl.unwrap(model)
    return result


def compare(result: dict, reference: dict) -> dict:
    if "error" in result:
        return {"error": result["error"]}
    diff = mx.max(mx.abs(result["logits"] - reference["logits"])).item()
    agree = mx.mean(mx.argmax(result["logits"], -1) == mx.argmax(reference["logits"], -1)).item()
    return {"max_logit_diff": round(diff, 5), "argmax_agree": round(agree, 3), "tokens_per_s": result["tokens_per_s"]}


def kernel_rows(grid: dict, dtype: mx.Dtype) -> list[dict]:
    """One MHA attention call at a time on a sliced cache (16 heads, the first prompt's KV length and one more),
    through `mlxrewrite.eager`: max error relative to the dequantize-then-float32 reference, and the rewrite
    that ran. Isolates the kernels the legalisation picks from a model's quantization noise."""
    rows = []
    n0 = grid["prompts"][0]
    for d, bits, n, m, transpose in itertools.product(grid["head_dims"], grid["bits"], (n0, n0 + 1), (1, 4),
                                                      (True, False)):
        mx.random.seed(n)
        buffer = mx.quantize(mx.random.normal((1, grid["heads"], n + 256, d)).astype(dtype), group_size=GROUP,
                             bits=bits)
        view = [a[..., :n, :] for a in buffer]  # as mlx-lm's QuantizedKVCache returns it
        deq = mx.dequantize(*view, group_size=GROUP, bits=bits).astype(mx.float32)
        x = mx.random.normal((1, grid["heads"], m, d if transpose else n)).astype(dtype)
        reference = x.astype(mx.float32) @ (mx.swapaxes(deq, -1, -2) if transpose else deq)

        def qmm(x, *q, t=transpose, b=bits):  # mx.quantized_matmul looked up per call, so intercepted
            return mx.quantized_matmul(x, *q, transpose=t, group_size=GROUP, bits=b)

        call = mlxrewrite.eager(qmm)
        row = {"check": "kernel", "head_dim": d, "kv_bits": bits, "N": n, "M": m, "transpose": transpose}
        try:
            out = call(x, *view)
            row["rel_err"] = round(max_abs_err(out, reference) / mx.max(mx.abs(reference)).item(), 6)
        except Exception as error:  # anything a case raises is its result
            row["error"] = f"{type(error).__name__}: {str(error)[:240]}"
        rows.append({**row, "calls": call.rewriter.calls})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def run(grid: dict, dtype: mx.Dtype, budget_s: float) -> list[dict]:
    rows, began = [], time.perf_counter()
    for kv_heads in grid["kv_heads"]:
        for head_dim in grid["head_dims"]:
            model = llama(grid["hidden"], grid["layers"], grid["heads"], kv_heads, grid["vocab"], dtype, head_dim)
            for prompt in grid["prompts"]:
                mx.random.seed(prompt)
                tokens = mx.random.randint(0, grid["vocab"], (1, prompt + grid["steps"] + grid["verify"]))
                case = {"attention": "MHA" if kv_heads == grid["heads"] else "GQA", "kv_heads": kv_heads,
                        "head_dim": head_dim, "prompt": prompt}
                if time.perf_counter() - began > budget_s:
                    rows += [{**case, "kv_bits": b, "variant": v, "skipped": "time budget"} for b in grid["bits"]
                             for v in VARIANTS]
                    continue
                reference = run_variant(model, tokens, grid, None, "as shipped")
                if "error" in reference:
                    rows.append({**case, "variant": "float cache", "error": reference["error"]})
                    continue
                for bits in grid["bits"]:
                    for variant in VARIANTS:
                        result = run_variant(model, tokens, grid, bits, variant)
                        row = {**case, "kv_bits": bits, "variant": variant, **compare(result, reference),
                               "float_tokens_per_s": reference["tokens_per_s"], "calls": result.get("calls")}
                        rows.append(row)
                        print(json.dumps(row), flush=True)
            del model
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=os.environ.get("OUT"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a CPU smoke test)")
    parser.add_argument("--budget-s", type=float, default=240.0)
    parser.add_argument("--prompts", help="comma-separated prompt lengths instead of the grid's")
    parser.add_argument("--no-kernel-rows", action="store_true", help="skip the per-call checks (run before)")
    args = parser.parse_args(argv)
    if not args.out:
        print("gpu_legalise: give OUT_DIR or set $OUT", file=sys.stderr)
        return 2
    grid, env = QUICK if args.quick else FULL, Env.detect()
    if args.prompts:
        grid = {**grid, "prompts": [int(p) for p in args.prompts.split(",")]}
    rows = ([] if args.no_kernel_rows else kernel_rows(grid, env.mx_dtype)) + run(grid, env.mx_dtype, args.budget_s)
    meta = {**dataclasses.asdict(env), "grid": grid, "group_size": GROUP,
            "doctor_profile": Backend.current().profile is not None}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "legalise.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
