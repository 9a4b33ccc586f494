"""Where one decode step's host time goes, per layer: the float cache against kv8 wrapped (packed cache).

Run (GPU machine): python3 -m bench.gpu_step_profile OUT_DIR [--prompt=4096] [--cprofile]
For the 16-layer GQA llama of gpu_fused_decode (16 q / 4 kv heads, head_dim 128, fp16), after a prefill,
median us per layer of: the cache's update_and_fetch, the attention call (mlx-lm's dispatch function,
which the wrapper's region sits under), the rest of the step's graph building, and the evaluation, split
into encoding (`mx.async_eval` returns once MLX has encoded every op: host time) and the wait for the GPU;
and the share of kv_pack and the fused kernel's own Python inside them. The two variants take turns every
few steps, so the host's drift falls on both. Timers wrap the functions (a few
hundred ns each), so the parts add up to slightly more than the step. `--cprofile` also prints (and writes) the kv8
steps' top functions by own time (the profiler slows those steps: such a run's numbers are not a record).
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import time
from collections import defaultdict
from pathlib import Path

import mlx.core as mx
from mlx_lm.models import llama
from mlx_lm.models.cache import KVCache, make_prompt_cache

import mlxrewrite.mlx_lm as mrl
from bench import record
from mlxrewrite.backends.kernels import kv_pack as kv_pack_module
from mlxrewrite.backends.kernels.quantized_sdpa import PackedAttention
from mlxrewrite.mlx_lm import packed_cache
from mlxrewrite.rules import fused_quantized_attention as fused

PROMPT = int(next((a.split("=")[1] for a in sys.argv if a.startswith("--prompt=")), 4096))
SMALL = "--small" in sys.argv
STEPS, BLOCK, LAYERS = 60, 5, 16
SPENT: dict[str, float] = defaultdict(float)


def timed(owner, name: str, label: str) -> None:
    real = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            SPENT[label] += time.perf_counter() - start

    setattr(owner, name, wrapper)


def _prepared(bits: int | None) -> tuple:
    """(model, cache, tokens) after the prefill: the float cache, or it quantized to `bits` and the model wrapped."""
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs(model_type="llama", hidden_size=256 if SMALL else 2048, num_hidden_layers=LAYERS,
                                        intermediate_size=512 if SMALL else 8192, num_attention_heads=16, num_key_value_heads=4,
                                        head_dim=128, rms_norm_eps=1e-5, vocab_size=1000 if SMALL else 32000))
    model.set_dtype(mx.float16)
    mx.eval(model.parameters())
    tokens = mx.random.randint(0, 1000, (1, PROMPT + STEPS))
    cache = make_prompt_cache(model)
    mx.eval(model(tokens[:, :PROMPT], cache=cache))
    if bits:
        cache = [c.to_quantized(group_size=64, bits=bits) for c in cache]
        model = mrl.wrap(model)
    mx.eval([c.state for c in cache])
    return model, cache, tokens


def main() -> None:
    out_dir = Path(next((a for a in sys.argv[1:] if not a.startswith("--")), "."))
    timed(KVCache, "update_and_fetch", "cache update")
    timed(packed_cache.QuantizedKVCache, "update_and_fetch", "cache update")
    timed(llama, "scaled_dot_product_attention", "attention")
    timed(fused, "quantized_sdpa", "  of which the fused kernel's call")
    timed(PackedAttention, "__call__", "  of which the fused kernel's call")
    timed(kv_pack_module.cuda, "launch", "  of which kv_pack's kernel call")
    runs = {variant: _prepared(bits) for variant, bits in (("float cache", None), ("kv8 wrapped, packed", 8))}
    samples = {variant: defaultdict(list) for variant in runs}
    profile = cProfile.Profile() if "--cprofile" in sys.argv else None
    t = PROMPT
    for block in range(STEPS // BLOCK):  # the variants take turns, so the host's drift falls on both
        for variant, (model, cache, tokens) in runs.items():
            for step in range(BLOCK):
                profiled = profile is not None and block > 0 and variant != "float cache"
                if profiled:
                    profile.enable()
                SPENT.clear()
                start = time.perf_counter()
                logits = model(tokens[:, t + step:t + step + 1], cache=cache)
                built = time.perf_counter()
                mx.async_eval(logits)  # returns once MLX has encoded every op of the step
                encoded = time.perf_counter()
                mx.eval(logits)
                done = time.perf_counter()
                if profiled:
                    profile.disable()
                parts = dict(SPENT)
                parts["build, total"] = built - start
                parts["rest of the build"] = parts["build, total"] - parts.get("cache update", 0) - parts.get("attention", 0)
                parts["eval: encode"] = encoded - built
                parts["eval: wait"] = done - encoded
                parts["step"] = done - start
                if block > 0:
                    for name, seconds in parts.items():
                        samples[variant][name].append(seconds * 1e6 / LAYERS)
        t += BLOCK
    if profile is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / f"step_profile_n{PROMPT}_cprofile.txt", "w") as text:
            pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(25)
        print((out_dir / f"step_profile_n{PROMPT}_cprofile.txt").read_text())
    results = {variant: {name: round(sorted(v)[len(v) // 2], 2) for name, v in sorted(parts.items())}
               for variant, parts in samples.items()}
    for variant, (model, _, _) in runs.items():
        if mrl.is_wrapped(model):
            mrl.unwrap(model)
    record.write_json(out_dir, f"step_profile_n{PROMPT}.json", {"prompt": PROMPT, "us_per_layer": results})


if __name__ == "__main__":
    main()
