"""The fused kernel's latency in a decode step, by chunk size (keys per thread block), against MLX's float SDPA.

Run (GPU machine): python3 -m bench.gpu_chunk_latency OUT_DIR
A decode step runs one attention per layer, each waiting on the one before: what counts there is a call's
latency, not the throughput of many independent calls (bench/gpu_fused_attention.py). So the calls here
form a chain (each query is the previous call's output), at the decode benchmark's shape (B=1, 16 q /
4 kv heads, head dim 128, M=1, fp16, an 8-bit packed cache), for several N (1k-32k) and chunk sizes: small chunks
put more blocks on the GPU's 132 SMs at short N, at the cost of a longer merge. us per call =
(t(reps) - t(reps/4)) / (3 reps / 4), so the one evaluation's own overhead cancels. Each chunk size's
output is also checked against float32 attention over the dequantized cache (up to 128 chunks).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import mlx.core as mx

from bench import record
from bench.gpu_fused_attention import dense, per_call_seconds
from mlxrewrite.backends.kernels import chunk_size, kv_pack
from mlxrewrite.backends.kernels import quantized_sdpa

B, HQ, HKV, D, GS, BITS, DT = 1, 16, 4, 128, 64, 8, mx.float16
REPS = 64


def chain_us(call, M: int = 1) -> float:
    """us per call of a chain q -> call(q) -> call(...) of REPS calls in one graph (queries of M rows)."""
    def run(n: int) -> float:
        q = mx.random.normal((B, HQ, M, D)).astype(DT)
        mx.eval(q)
        for _ in range(n):
            q = call(q)
        start = time.perf_counter()
        mx.eval(q)
        return time.perf_counter() - start

    return round(per_call_seconds(run, REPS, rounds=5) * 1e6, 2)


def main() -> None:
    out_dir = Path(next((a for a in sys.argv[1:] if not a.startswith("--")), "."))
    rows = []
    for n in (1024, 4096, 8192, 16384, 32768):
        mx.random.seed(0)
        kf, vf = (mx.random.normal((B, HKV, n + 256, D)).astype(DT) for _ in range(2))
        packed = kv_pack.packed(kf, vf, GS, BITS, n)
        mx.eval(kf, vf, packed.kv)
        scale = D ** -0.5
        q0 = mx.random.normal((B, HQ, 1, D)).astype(DT)
        row = {"N": n, "default_chunk": chunk_size(n),
               "float_sdpa_us": chain_us(lambda q: mx.fast.scaled_dot_product_attention(
                   q, kf[..., :n, :], vf[..., :n, :], scale=scale))}
        for chunk in (128, 256, 512, 1024):
            if -(-n // chunk) > 128 or (chunk > n and chunk != 128):
                continue
            k, v = packed.parts()
            call = lambda q, chunk=chunk: quantized_sdpa(q, k, v, scale=scale, group_size=GS, bits=BITS,  # noqa: E731
                                                         split=chunk)
            row[f"fused_chunk_{chunk}_us"] = chain_us(call)
            ref = dense(q0, k, v, scale=scale, gs=GS, bits=BITS)
            err = mx.max(mx.abs(call(q0).astype(mx.float32) - ref)) / mx.max(mx.abs(ref))
            row[f"fused_chunk_{chunk}_rel_err"] = round(err.item(), 6)  # against float32 attention
        rows.append(row)
        print(row, flush=True)
    record.write_json(out_dir, "chunk_latency.json", {"shape": dict(B=B, Hq=HQ, Hkv=HKV, D=D, bits=BITS, group_size=GS,
                                                                   dtype=str(DT), M=1), "rows": rows})


if __name__ == "__main__":
    main()
