"""The Python cost of one call where a rule fires in eager mode (issue 12: goal <= 10 us per fired call).

Run: python -m bench.eager_call_cost [OUT_DIR]   (any machine; on CUDA the real kernel runs)
Host time per call, graph building only (no evaluation), of mlx-lm's `quantized_scaled_dot_product_attention`
on a decode-step query (B=1, 16 q / 4 kv heads, head dim 128, float16, an 8-bit cache of 4093 keys, sliced
from a larger buffer as mlx-lm's cache hands it over), calls interleaved over many rounds:
- `fused call`: the call inside an eager forward pass, where the fused rule fires;
- `kernel alone`: `quantized_sdpa` called directly with the same arguments (what the rewrite runs);
- `fused call, packed fetch` and `packed kernel alone`: the same with K and V as a packed cache's lazy
  fetch (mlxrewrite.mlx_lm.packed_cache: the kernel gets its buffer, through the launch the rule
  prepares once per analysis, `packed_attention`);
- `float SDPA`: `mx.fast.scaled_dot_product_attention` over a float16 cache of the same length (what a
  float cache's attention costs the host);
- `mlx-lm unfused` (CPU only; on CUDA it raises): the function as shipped.
Ours per fired call = fused call - kernel alone (and the same for the packed fetch). On CPU the rule is told it runs on CUDA and the kernel is
a stub returning a cached array (the CPU reference is many ops), so the difference is the dispatch alone.
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from pathlib import Path
from typing import Callable

import mlx.core as mx
from mlx_lm.models import base
from mlx_lm.models.cache import QuantizedKVCache

import mlxrewrite
from mlxrewrite.backends.device import Backend
from mlxrewrite.mlx_lm import packed_cache
from mlxrewrite.rules import fused_quantized_attention as fused

CALLS, ROUNDS = 50, 200
B, HQ, HKV, D, N, DTYPE = 1, 16, 4, 128, 4093, mx.float16


def _cache(bits: int = 8) -> tuple[tuple, tuple, mx.array, mx.array]:
    buffer = mx.random.normal((B, HKV, N + 3, D)).astype(DTYPE)
    k = tuple(a[..., :N, :] for a in mx.quantize(buffer, 64, bits))
    v = tuple(a[..., :N, :] for a in mx.quantize(buffer * 0.5, 64, bits))
    mx.eval(k, v)
    return k, v, buffer[..., :N, :], (buffer * 0.5)[..., :N, :]


def _repeated(fn: Callable[[], mx.array]) -> Callable[[], mx.array]:
    """CALLS calls of `fn` in a row, as the eager forward pass below makes them; the last result."""
    return lambda: [fn() for _ in range(CALLS)][-1]


def _per_call(run: Callable[[], mx.array]) -> Callable[[], float]:
    """A sample of host us per call of `run` (CALLS calls, graph building only; evaluated afterwards)."""
    def sample() -> float:
        start = time.perf_counter()
        out = run()
        elapsed = (time.perf_counter() - start) / CALLS * 1e6
        mx.eval(out)
        return elapsed
    return sample


def main() -> None:
    out_dir = Path(next((a for a in sys.argv[1:] if not a.startswith("--")), "."))
    on_cuda = mx.default_device() == mx.gpu and mx.cuda.is_available()
    if not on_cuda:  # the rule's dispatch alone: CUDA facts, a stub kernel
        Backend.current = classmethod(lambda cls: Backend("cuda", "sm_90"))
        outputs: dict = {}

        def stub(q: mx.array, k: tuple, v: tuple, **kwargs) -> mx.array:
            if (q.shape, q.dtype) not in outputs:
                outputs[q.shape, q.dtype] = mx.zeros(q.shape, q.dtype)
            return outputs[q.shape, q.dtype]

        fused.quantized_sdpa = stub
        fused.packed_attention = lambda *args, **kwargs: lambda q, packed, mask=None: stub(q, (), ())
    kernel = fused.quantized_sdpa
    k, v, kf, vf = _cache()
    q = mx.random.normal((B, HQ, 1, D)).astype(DTYPE)
    scale = D**-0.5

    def mlx_lm_attention(k=k, v=v) -> mx.array:
        return base.quantized_scaled_dot_product_attention(q, k, v, scale=scale, mask=None, group_size=64, bits=8)

    attention = mlxrewrite.eager(lambda q: _repeated(mlx_lm_attention)())  # CALLS region calls in one pass
    mx.eval(attention(q))
    pk, pv = packed_cache.pack(QuantizedKVCache(group_size=64, bits=8)).update_and_fetch(kf, vf)  # lazy fetch
    mx.eval(pk.packed.kv)
    packed_attention = mlxrewrite.eager(lambda q: _repeated(lambda: mlx_lm_attention(pk, pv))())
    mx.eval(packed_attention(q))
    prepared = fused.packed_attention(q.shape, q.dtype, pk.packed, scale=scale, group_size=64, bits=8)  # as the rule
    samples = {
        "fused call": _per_call(lambda: attention(q)),
        "kernel alone": _per_call(_repeated(lambda: kernel(q, k, v, scale=scale, group_size=64, bits=8, mask=None,
                                                           fill=None))),
        "fused call, packed fetch": _per_call(lambda: packed_attention(q)),
        "packed kernel alone": _per_call(_repeated(lambda: prepared(q, pk.packed, None))),
        "float SDPA": _per_call(_repeated(lambda: mx.fast.scaled_dot_product_attention(q, kf, vf, scale=scale,
                                                                                        mask=None))),
    }
    if not on_cuda:
        samples["mlx-lm unfused"] = _per_call(_repeated(mlx_lm_attention))
    times: dict[str, list[float]] = {name: [] for name in samples}
    for _ in range(ROUNDS):
        for name, sample in samples.items():
            times[name].append(sample())
    us = {name: round(sorted(t)[len(t) // 2], 2) for name, t in times.items()}
    for run in (attention, packed_attention):
        assert any("fused-quantized-attention -> fused" in key for key in run.rewriter.calls), run.rewriter.calls
    result = {"device": str(mx.default_device()), "kernel": "CUDA" if on_cuda else "stub", "mlx": mx.__version__,
              "date": datetime.date.today().isoformat(), "median_us_per_call": us,
              "ours_per_fired_call_us": round(us["fused call"] - us["kernel alone"], 2),
              "ours_per_fired_call_packed_fetch_us": round(us["fused call, packed fetch"] - us["packed kernel alone"], 2),
              "goal_us": 10,
              "shape": {"B": B, "Hq": HQ, "Hkv": HKV, "D": D, "N": N, "dtype": str(DTYPE)}}
    print(json.dumps(result))
    if "--explain" in sys.argv:
        print(attention.rewriter.explain())
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"eager_call_cost_{'cuda' if on_cuda else 'cpu'}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
