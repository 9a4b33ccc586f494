"""mlx-lm on the GPU: teacher-forced decode of a random GQA Llama with an 8-bit KV cache, as shipped vs wrapped.

Run (GPU machine): python3 bench/gpu_mlx_lm.py OUT_DIR [--small]
Model: 16 layers, 16 q / 4 kv heads, head_dim 128, fp16 (the issue's setting). For each prompt length
(aligned 2048 and unaligned 2049 / 2033), a float-cache run is the reference; the 8-bit cache runs as
shipped and wrapped. Each run prefills, then forces 32 decode steps and one 4-token verification step
(speculative decoding's M=4), recording max |logits - float-cache logits|, argmax agreement and the median
ms per decode step. A float-cache run wrapped shows the wrapper's cost where no rule fires, and a second
unwrapped float-cache run shows the GPU's run-to-run variation.
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.models import llama

import mlxrewrite.mlx_lm as mrl
from mlxrewrite.backends.device import Backend

SMALL = "--small" in sys.argv
CONFIG = dict(model_type="llama", hidden_size=256 if SMALL else 2048, num_hidden_layers=2 if SMALL else 16,
              intermediate_size=512 if SMALL else 8192, num_attention_heads=16, num_key_value_heads=4,
              head_dim=128, rms_norm_eps=1e-5, vocab_size=1000 if SMALL else 32000, tie_word_embeddings=False)
PROMPTS = [64, 65] if SMALL else [2048, 2049, 2033]
STEPS, VERIFY = (4, 4) if SMALL else (32, 4)
DTYPE = mx.float32 if mx.default_device() == mx.cpu else mx.float16


def build() -> llama.Model:
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs(**CONFIG))
    model.set_dtype(DTYPE)
    mx.eval(model.parameters())
    return model


def teacher_forced(model, tokens: mx.array, prompt: int, kv_bits: int | None) -> tuple[mx.array, float]:
    """Logits of every forced decode step and of the verification step; median ms per decode step."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    mx.eval(model(tokens[:, :prompt], cache=cache))
    if kv_bits:
        cache = [c.to_quantized(group_size=64, bits=kv_bits) for c in cache]
    outs, times = [], []
    for t in range(prompt, prompt + STEPS):
        start = time.perf_counter()
        logits = model(tokens[:, t:t + 1], cache=cache)[:, -1].astype(mx.float32)
        mx.eval(logits)
        times.append(time.perf_counter() - start)
        outs.append(logits)
    verify = model(tokens[:, prompt + STEPS:prompt + STEPS + VERIFY], cache=cache)[0].astype(mx.float32)
    outs.append(verify)
    mx.eval(outs)
    return mx.concatenate(outs), sorted(times)[len(times) // 2] * 1e3


def run(model, tokens, prompt, kv_bits, wrapped: bool) -> dict:
    if wrapped:
        mrl.wrap(model)
    try:
        logits, ms = teacher_forced(model, tokens, prompt, kv_bits)
        result = {"logits": logits, "ms_per_step": round(ms, 2)}
    except (RuntimeError, ValueError) as error:
        result = {"error": str(error)[:200]}
    if wrapped:
        result["calls"] = mrl.state(model).rewriter.calls
        mrl.unwrap(model)
    return result


def main() -> None:
    out_dir = Path(next((a for a in sys.argv[1:] if not a.startswith("--")), "."))
    out_dir.mkdir(parents=True, exist_ok=True)
    model = build()
    rows = []
    for prompt in PROMPTS:
        mx.random.seed(prompt)
        tokens = mx.random.randint(0, CONFIG["vocab_size"], (1, prompt + STEPS + VERIFY))
        reference = run(model, tokens, prompt, None, False)
        for label, kv_bits, wrapped in (("float cache, again", None, False), ("float cache, wrapped", None, True),
                                        ("kv8 as shipped", 8, False),
                                        ("kv8 wrapped", 8, True)):
            result = run(model, tokens, prompt, kv_bits, wrapped)
            row = {"prompt": prompt, "variant": label, "float_ms_per_step": reference["ms_per_step"],
                   "calls": result.get("calls")}
            if "error" in result:
                row["error"] = result["error"]
            else:
                diff = mx.abs(result["logits"] - reference["logits"])
                agree = mx.mean(mx.argmax(result["logits"], -1) == mx.argmax(reference["logits"], -1))
                row.update(max_logit_diff=round(mx.max(diff).item(), 4), argmax_agree=round(agree.item(), 3),
                           ms_per_step=result["ms_per_step"])
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = {"doctor_profile": Backend.current().profile is not None, "device": str(mx.default_device()), "device_info": _device_info(), "mlx": mx.__version__,
            "date": datetime.date.today().isoformat(), "config": CONFIG, "steps": STEPS, "verify_tokens": VERIFY,
            "dtype": str(DTYPE)}
    (out_dir / "gpu_mlx_lm.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out_dir / "gpu_mlx_lm.md").write_text(_markdown(meta, rows))


def _device_info() -> dict:
    try:
        return {k: v for k, v in mx.device_info().items() if isinstance(v, (str, int, float))}
    except (AttributeError, RuntimeError):
        return {}


def _markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# mlx-lm teacher-forced decode, {meta['device']} {meta['device_info'].get('device_name', '')}, "
             f"MLX {meta['mlx']}, {meta['date']}", "",
             f"A `mlxrewrite doctor` profile was {'active' if meta['doctor_profile'] else 'not present'}.", "",
             f"Random Llama ({meta['config']['num_hidden_layers']} layers, 16 q / 4 kv heads, head_dim 128, "
             f"{meta['dtype']}), {meta['steps']} forced decode steps + one {meta['verify_tokens']}-token "
             "verification step. Errors are max |logits - float-cache logits| over all of them.", "",
             "| prompt | variant | max logit diff | argmax agree | ms/step | float cache ms/step |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['prompt']} | {r['variant']} | raises: {r['error'][:70]} | | | {r['float_ms_per_step']} |")
        else:
            lines.append(f"| {r['prompt']} | {r['variant']} | {r['max_logit_diff']} | {r['argmax_agree']} | "
                         f"{r['ms_per_step']} | {r['float_ms_per_step']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
