"""mlx-lm decode on the GPU with a quantized KV cache through the fused attention rule (issue 12's mlx_lm case).

Run (GPU machine): python3 bench/gpu_fused_decode.py OUT_DIR [--small] [--prompts=4096,32768] [--head-dim=128]
[--kv-heads=4,16]
For a 16-layer GQA Llama (16 q / 4 kv heads) and an MHA one (16 / 16), head_dim 128, fp16: prefill a float
cache, then decode STEPS teacher-forced tokens and one 4-token verification step with
- the float cache, unwrapped (the reference, and the speed to beat),
- the float cache converted to 8-bit and 4-bit (`to_quantized`, as mlx-lm does past quantized_kv_start),
  unwrapped (as shipped: raises on CUDA) and wrapped (the fused rule, the cache packed:
  mlxrewrite.mlx_lm.packed_cache), and kv8 wrapped keeping mlx-lm's six-buffer layout
  (`wrap(packed_cache=False)`).
Side by side in one process: median ms per decode step (synchronous) and tokens/s, ms per step pipelined as
mlx-lm's generate runs it (the next step built while this one runs), both again with every variant's cache
alive and the variants taking turns every few steps (`interleaved_*`: the ratios to trust on a host whose
speed drifts), max |logits - float-cache logits| and
argmax agreement, peak memory of the run (mx.get_peak_memory after a reset; also less the weights, the part
the cache decides), the Python time to build one
step's graph (model call until mx.eval), and the physical limit: bytes of weights plus the cache one step
reads, over the HBM copy bandwidth measured on this device (bench/results/ gives it).
"""

from __future__ import annotations

import datetime
import gc
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.models import llama
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache

import mlxrewrite.mlx_lm as mrl

SMALL = "--small" in sys.argv
HBM_COPY_TBS = 4.24  # H200, device-to-device copy counting read + write (../shared/anchors-h200.md)
STEPS, VERIFY = (4, 4) if SMALL else (32, 4)
DTYPE = mx.float32 if mx.default_device() == mx.cpu else mx.float16


def option(name: str, default: str) -> str:
    return next((a.split("=", 1)[1] for a in sys.argv if a.startswith(f"--{name}=")), default)


PROMPTS = [int(p) for p in option("prompts", "64" if SMALL else "4096,32768").split(",")]
HEAD_DIM = int(option("head-dim", "128"))
KV_HEADS = [int(h) for h in option("kv-heads", "4,16").split(",")]  # 4: GQA (16 q heads), 16: MHA


def config(kv_heads: int) -> dict:
    return dict(model_type="llama", hidden_size=256 if SMALL else 2048, num_hidden_layers=2 if SMALL else 16,
                intermediate_size=512 if SMALL else 8192, num_attention_heads=16, num_key_value_heads=kv_heads,
                head_dim=HEAD_DIM, rms_norm_eps=1e-5, vocab_size=1000 if SMALL else 32000, tie_word_embeddings=False)


def build(kv_heads: int) -> llama.Model:
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs(**config(kv_heads)))
    model.set_dtype(DTYPE)
    mx.eval(model.parameters())
    return model


def decode(model, tokens: mx.array, prompt: int, kv_bits: int | None) -> dict:
    """Prefill (float cache), optionally quantize the cache, then forced decode steps and a verification."""
    cache = make_prompt_cache(model)
    for start in range(0, prompt, 4096):  # chunked prefill, as mlx-lm's generate does
        mx.eval(model(tokens[:, start:min(prompt, start + 4096)], cache=cache))
    if kv_bits:
        cache = [c.to_quantized(group_size=64, bits=kv_bits) for c in cache]
    mx.eval([c.state for c in cache])
    gc.collect()  # an earlier variant's cache kept alive by a reference cycle (a failed run's traceback) goes now
    mx.reset_peak_memory()
    outs, step_ms, build_ms = [], [], []
    for t in range(prompt, prompt + STEPS):
        start = time.perf_counter()
        logits = model(tokens[:, t:t + 1], cache=cache)[:, -1].astype(mx.float32)
        built = time.perf_counter()
        mx.eval(logits)
        step_ms.append((time.perf_counter() - start) * 1e3)
        build_ms.append((built - start) * 1e3)
        outs.append(logits)
    verify = model(tokens[:, prompt + STEPS:prompt + STEPS + VERIFY], cache=cache)[0].astype(mx.float32)
    outs.append(verify)
    mx.eval(outs)
    pipelined_ms = _pipelined(model, tokens[:, prompt + STEPS + VERIFY:], cache)
    cache_bytes = sum(a.nbytes for c in cache for _, a in tree_flatten(c.state) if isinstance(a, mx.array))
    return {"logits": mx.concatenate(outs), "ms": _median(step_ms), "build_ms": _median(build_ms),
            "pipelined_ms": pipelined_ms,
            "peak_gb": mx.get_peak_memory() / 1e9, "cache_bytes": cache_bytes}


def _pipelined(model, tokens: mx.array, cache) -> float:
    """ms per step as mlx-lm's generate runs it: step t+1's graph is built while step t runs (async_eval)."""
    logits = model(tokens[:, :1], cache=cache)
    mx.async_eval(logits)
    start = time.perf_counter()
    for t in range(1, tokens.shape[1]):
        following = model(tokens[:, t:t + 1], cache=cache)
        mx.async_eval(following)
        mx.eval(logits)
        logits = following
    mx.eval(logits)
    return (time.perf_counter() - start) / (tokens.shape[1] - 1) * 1e3


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def run(model, tokens, prompt, kv_bits, wrapped, options) -> dict:
    if wrapped:
        mrl.wrap(model, **options)
    try:
        return decode(model, tokens, prompt, kv_bits)
    except (RuntimeError, ValueError) as error:
        return {"error": str(error)[:160]}
    finally:
        if wrapped:
            calls = mrl.state(model).rewriter.calls
            mrl.unwrap(model)
            print(json.dumps({"calls": calls}), flush=True)


MLX_LM_LAYOUT = "kv8 wrapped, mlx-lm's cache layout"
INTERLEAVED = [("float cache", None, {}), ("kv8 wrapped", 8, {}), ("kv4 wrapped", 4, {}),
               (MLX_LM_LAYOUT, 8, {"packed_cache": False})]
ROUNDS, BLOCK = (2, 2) if SMALL else (6, 8)


def interleaved(kv_heads: int, tokens: mx.array, prompt: int) -> dict[str, dict]:
    """ms per step of every variant measured side by side: all their caches alive at once, the variants
    taking turns every BLOCK steps (synchronous, then pipelined), so drift of the host's speed over the run
    falls on all of them alike. One model object per variant (the same weights: the same seed)."""
    models, caches = {}, {}
    for label, bits, options in INTERLEAVED:
        model = build(kv_heads)
        cache = make_prompt_cache(model)
        for start in range(0, prompt, 4096):
            mx.eval(model(tokens[:, start:min(prompt, start + 4096)], cache=cache))
        caches[label] = [c.to_quantized(group_size=64, bits=bits) for c in cache] if bits else cache
        mx.eval([c.state for c in caches[label]])
        models[label] = mrl.wrap(model, **options) if bits else model
    sync: dict[str, list[float]] = {label: [] for label in models}
    piped: dict[str, list[float]] = {label: [] for label in models}
    t = prompt
    for _ in range(ROUNDS):
        for label, model in models.items():
            for step in range(BLOCK):
                start = time.perf_counter()
                mx.eval(model(tokens[:, t + step:t + step + 1], cache=caches[label]))
                sync[label].append((time.perf_counter() - start) * 1e3)
        t += BLOCK
        for label, model in models.items():
            piped[label].append(_pipelined(model, tokens[:, t:t + BLOCK + 1], caches[label]))
        t += BLOCK + 1
    for label, model in models.items():
        if mrl.is_wrapped(model):
            mrl.unwrap(model)
    return {label: {"ms": _median(sync[label]), "pipelined_ms": _median(piped[label])} for label in models}


def main() -> None:
    out_dir = Path(next((a for a in sys.argv[1:] if not a.startswith("--")), "."))
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for kv_heads in KV_HEADS:
        model = build(kv_heads)
        weight_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
        for prompt in PROMPTS:
            mx.random.seed(prompt)
            tokens = mx.random.randint(0, 1000, (1, prompt + max(2 * STEPS + VERIFY + 1, ROUNDS * (2 * BLOCK + 1))))
            reference = run(model, tokens, prompt, None, False, {})
            results = {}
            for label, bits, wrapped, options in (("float cache", None, False, {}), ("kv8 as shipped", 8, False, {}),
                                                  ("kv8 wrapped", 8, True, {}), ("kv4 wrapped", 4, True, {}),
                                                  (MLX_LM_LAYOUT, 8, True, {"packed_cache": False})):
                result = reference if label == "float cache" else run(model, tokens, prompt, bits, wrapped, options)
                results[label] = result
                row = {"kv_heads": kv_heads, "prompt": prompt, "variant": label}
                if "error" in result:
                    row["error"] = result["error"]
                else:
                    diff = mx.max(mx.abs(result["logits"] - reference["logits"])).item()
                    agree = mx.mean(mx.argmax(result["logits"], -1) == mx.argmax(reference["logits"], -1)).item()
                    floor_ms = (weight_bytes + result["cache_bytes"]) / (HBM_COPY_TBS * 1e12) * 1e3
                    row.update(ms=round(result["ms"], 3), tok_s=round(1e3 / result["ms"], 1),
                               vs_float=round(reference["ms"] / result["ms"], 3),
                               pipelined_ms=round(result["pipelined_ms"], 3),
                               pipelined_tok_s=round(1e3 / result["pipelined_ms"], 1),
                               pipelined_vs_float=round(reference["pipelined_ms"] / result["pipelined_ms"], 3),
                               max_logit_diff=round(diff, 4),
                               argmax_agree=round(agree, 3), peak_gb=round(result["peak_gb"], 2),
                               peak_vs_float=round(result["peak_gb"] / reference["peak_gb"], 3),
                               peak_over_weights_vs_float=round((result["peak_gb"] - weight_bytes / 1e9)
                                                                / (reference["peak_gb"] - weight_bytes / 1e9), 3),
                               build_ms=round(result["build_ms"], 3), floor_ms=round(floor_ms, 3),
                               cache_gb=round(result["cache_bytes"] / 1e9, 3))
                rows.append(row)
            packed, unpacked = results["kv8 wrapped"], results[MLX_LM_LAYOUT]
            if "logits" in packed and "logits" in unpacked:  # the packed cache changes no number
                rows[-3]["logits_bitwise_vs_mlx_lm_layout"] = mx.array_equal(packed["logits"], unpacked["logits"]).item()
            side_by_side = interleaved(kv_heads, tokens, prompt)
            base = side_by_side["float cache"]
            for row in (r for r in rows if (r["kv_heads"], r["prompt"]) == (kv_heads, prompt)):
                timed = side_by_side.get(row["variant"])
                if timed:
                    row.update(interleaved_ms=round(timed["ms"], 3), interleaved_vs_float=round(base["ms"] / timed["ms"], 3),
                               interleaved_pipelined_ms=round(timed["pipelined_ms"], 3),
                               interleaved_pipelined_vs_float=round(base["pipelined_ms"] / timed["pipelined_ms"], 3))
                print(json.dumps(row), flush=True)
        del model
    meta = {"device": str(mx.default_device()), "device_info": _device_info(), "mlx": mx.__version__,
            "date": datetime.date.today().isoformat(), "steps": STEPS, "verify_tokens": VERIFY, "dtype": str(DTYPE),
            "config": config(4), "hbm_copy_tbs": HBM_COPY_TBS}
    suffix = "" if PROMPTS == [4096, 32768] and KV_HEADS == [4, 16] else \
        f"_n{'-'.join(map(str, PROMPTS))}_kv{'-'.join(map(str, KV_HEADS))}"
    (out_dir / f"gpu_fused_decode_d{HEAD_DIM}{suffix}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


def _device_info() -> dict:
    try:
        return {k: v for k, v in mx.device_info().items() if isinstance(v, (str, int, float))}
    except (AttributeError, RuntimeError):
        return {}


if __name__ == "__main__":
    main()
