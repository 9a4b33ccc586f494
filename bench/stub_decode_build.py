"""The host's share of a decode step, on any machine: graph building per layer, float cache against kv8 wrapped.

Run: python -m bench.stub_decode_build [OUT_DIR] [--cprofile]
At batch 1 a GPU decode step is host-bound, and the wrapper's own Python is part of what the host spends
(bench/results/cuda-nvidia-h200/step_profile_*.json). This measures that part without a GPU: a 16-layer GQA
llama (16 q / 4 kv heads, head dim 128, fp16, small hidden size), a 512-token prompt, then decode steps,
the float cache unwrapped against an 8-bit cache wrapped as on CUDA (packed, the fused rule firing). The
CUDA kernels are stubbed (`mx.fast.cuda_kernel` returns arrays of the output shapes, no op), so the rule
runs its CUDA path's Python; the logits are evaluated after each step, not the cache's state (as mlx-lm's
generate decodes: a state read makes a packed cache write its next rows by ops, bench/README.md). The two take turns
step by step; reported: median and minimum us per layer of the model call (graph building only).
"""

from __future__ import annotations

import cProfile
import importlib
import pstats
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.models import llama
from mlx_lm.models.cache import make_prompt_cache

from bench import record

PROMPT, STEPS, WARM, LAYERS = 512, 200, 20, 16


def _stub_kernels() -> None:
    """CUDA as far as the rules and kernels' Python can tell; each kernel call gives fresh array objects of
    its outputs' shapes (made once per shape), so no op is built where a kernel would be."""
    from mlxrewrite.backends.device import Backend

    made: dict = {}

    def kernel(**_):
        def call(inputs, output_shapes, output_dtypes, **__):
            key = (tuple(map(tuple, output_shapes)), tuple(output_dtypes))
            if key not in made:
                made[key] = [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes)]
                mx.eval(made[key])
            return [a.__copy__() for a in made[key]]
        return call

    mx.fast.cuda_kernel = kernel
    for name in ("quantized_sdpa", "kv_pack"):
        importlib.import_module(f"mlxrewrite.backends.kernels.{name}").on_cuda = lambda: True
    importlib.import_module("mlxrewrite.backends.kernels.kv_pack").verified = lambda *_: True
    Backend.current = classmethod(lambda cls: Backend("cuda", "sm_90"))


def _model() -> llama.Model:
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs(model_type="llama", hidden_size=256, num_hidden_layers=LAYERS,
                                        intermediate_size=512, num_attention_heads=16, num_key_value_heads=4,
                                        head_dim=128, rms_norm_eps=1e-5, vocab_size=1000))
    model.set_dtype(mx.float16)
    mx.eval(model.parameters())
    return model


def main() -> None:
    out_dir = Path(next((a for a in sys.argv[1:] if not a.startswith("--")), "."))
    _stub_kernels()
    import mlxrewrite.mlx_lm as mrl

    tokens = mx.random.randint(0, 1000, (1, PROMPT + STEPS))
    runs = {}
    for label, bits in (("float cache", None), ("kv8 wrapped, packed", 8)):
        model = _model()
        cache = make_prompt_cache(model)
        mx.eval(model(tokens[:, :PROMPT], cache=cache))
        if bits:
            cache = [c.to_quantized(group_size=64, bits=bits) for c in cache]
            model = mrl.wrap(model, packed_cache=True)
        runs[label] = (model, cache, [])
    profile = cProfile.Profile() if "--cprofile" in sys.argv else None
    for t in range(PROMPT, PROMPT + STEPS):
        for label, (model, cache, samples) in runs.items():
            profiled = profile is not None and label != "float cache" and t >= PROMPT + WARM
            if profiled:
                profile.enable()
            start = time.perf_counter()
            logits = model(tokens[:, t:t + 1], cache=cache)
            samples.append((time.perf_counter() - start) * 1e6 / LAYERS)
            if profiled:
                profile.disable()
            mx.eval(logits)
    if profile is not None:
        pstats.Stats(profile, stream=sys.stdout).sort_stats("tottime").print_stats(25)
    results = {}
    for label, (model, _, samples) in runs.items():
        kept = sorted(samples[WARM:])
        results[label] = {"median": round(kept[len(kept) // 2], 1), "min": round(kept[0], 1)}
        if mrl.is_wrapped(model):
            fired = mrl.state(model).rewriter.calls
            assert any("fused-quantized-attention -> fused" in k for k in fired), fired
            mrl.unwrap(model)
    record.write_json(out_dir, "stub_decode_build.json", {"prompt": PROMPT, "steps": STEPS - WARM, "layers": LAYERS,
                                                          "kernels": "stubbed", "us_per_layer": results})


if __name__ == "__main__":
    main()
