"""Where the host time of a decode step's fused attention and cache update goes (GPU machine), layer by layer.

Run: python3 -m bench.gpu_launch_cost OUT_DIR. Median host us per call, graph building only (CALLS calls in
a row, then evaluated), over an 8-bit packed cache of 4096 rows (B=1, 16 q / 4 kv heads, head dim 128, fp16):
- attention: `PackedAttention` (what the fused rule's direct form calls), `launch_chained` under it, the
  bare `mx.fast.cuda_kernel` call with that plan's arguments, and the row count's scalar against an array of
  4 floats (made one per step: MLX takes arrays of up to 8 bytes from a pool, larger ones it allocates);
- cache update: the packed cache's `update_and_fetch`, `kv_pack` under it, its bare kernel call, the slice
  update;
- for scale: MLX's float SDPA, a float cache's slice update, and a trivial `cuda_kernel` with 1 or 4 inputs
  and 1 or 3 outputs (what each operand of a kernel call costs MLX to build).
The region's own cost (the dispatcher, binder and key) is bench.eager_call_cost's.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable

import mlx.core as mx
from mlx_lm.models.cache import QuantizedKVCache

from bench import record
from mlxrewrite.backends.kernels import kv_pack, packed_attention
from mlxrewrite.backends.kernels import quantized_sdpa_cuda as cuda
from mlxrewrite.core import regions
from mlxrewrite.mlx_lm import packed_cache

CALLS, ROUNDS = 64, 80
B, HQ, HKV, D, N, GS, BITS, DT = 1, 16, 4, 128, 4096, 64, 8, mx.float16


def per_call(fn: Callable[[], object]) -> float:
    """Median host us per call of `fn` over ROUNDS rounds of CALLS calls (what they built is evaluated after
    each round)."""
    samples = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        outs = [fn() for _ in range(CALLS)]
        samples.append((time.perf_counter() - start) / CALLS * 1e6)
        mx.eval(outs)
    return round(sorted(samples)[len(samples) // 2], 2)


def _trivial(inputs: int, outputs: int) -> Callable[[list], list]:
    kernel = mx.fast.cuda_kernel(name=f"trivial_{inputs}_{outputs}", input_names=[f"x{i}" for i in range(inputs)],
                                 output_names=[f"y{i}" for i in range(outputs)], ensure_row_contiguous=False,
                                 source="".join(f"if (threadIdx.x == 0) y{i}[0] = 1.f;" for i in range(outputs)))
    args = dict(output_shapes=[(1,)] * outputs, output_dtypes=[mx.float32] * outputs, grid=(32, 1, 1),
                threadgroup=(32, 1, 1))
    return lambda operands: kernel(inputs=operands[:inputs], **args)


def main() -> None:
    out_dir = Path(next((a for a in sys.argv[1:] if not a.startswith("--")), "."))
    mx.random.seed(0)
    keys, values = (mx.random.normal((B, HKV, N - 1, D)).astype(DT) for _ in range(2))
    row = mx.random.normal((B, HKV, 1, D)).astype(DT)
    q = mx.random.normal((B, HQ, 1, D)).astype(DT)
    regions.installed = lambda path: path == packed_cache.ATTENTION  # fetches as under the wrapper: lazy
    cache = packed_cache.pack(QuantizedKVCache(group_size=GS, bits=BITS))
    cache.update_and_fetch(keys, values)
    fetched = cache.update_and_fetch(row, row)[0]
    packed = fetched.packed
    kf = mx.zeros((B, HKV, N + 256, D), DT)
    mx.eval(packed.kv, q, row, kf)
    attend = packed_attention(q.shape, q.dtype, packed, scale=D ** -0.5, group_size=GS, bits=BITS)
    attend(q, packed)
    _, plan, params, count = attend.rows
    kernel, launch_args = plan
    counters = cuda.chain_counters(B, HKV)
    pack = kv_pack._launcher(row.shape, row.shape, DT, DT, GS, BITS)
    pack_kernel, pack_args = pack.args[0]
    operands = [q, packed.kv, params, count, counters]
    trivial = {(i, o): _trivial(i, o) for i in (1, 4) for o in (1, 3)}
    kv = packed.kv

    def slice_update() -> mx.array:
        kv[..., N - 1:N, :] = pack(row, row)
        return kv

    def float_update() -> mx.array:
        kf[..., N:N + 1, :] = row
        return kf

    def update() -> mx.array:
        cache.offset = N - 1  # the same row again: the buffer keeps its size
        return cache.update_and_fetch(row, row)[0].packed.kv

    rows = {
        "attention: PackedAttention call": per_call(lambda: attend(q, packed)),
        "attention: launch_chained": per_call(lambda: cuda.launch_chained(plan, q, (kv,), None, None, params, count,
                                                                          counters)[0]),
        "attention: bare cuda_kernel call (5 inputs, 3 outputs)": per_call(lambda: kernel(inputs=operands,
                                                                                          **launch_args)[0]),
        "attention: a new row count scalar (4 bytes)": per_call(lambda: mx.array(N, dtype=mx.int32)),
        "attention: a new array of 4 floats (16 bytes)": per_call(lambda: mx.array([0.5, -1.0, 256.0, N])),
        "update: packed cache update_and_fetch": per_call(update),
        "update: kv_pack": per_call(lambda: kv_pack.kv_pack(row, row, GS, BITS, packed.row)),
        "update: bare kv_pack kernel call (2 inputs, 1 output)": per_call(lambda: pack_kernel(inputs=[row, row],
                                                                                              **pack_args)[0]),
        "update: kv_pack kernel and its slice update": per_call(slice_update),
        "float: SDPA": per_call(lambda: mx.fast.scaled_dot_product_attention(q, kf[..., :N, :], kf[..., :N, :],
                                                                             scale=D ** -0.5)),
        "float: a cache's slice update": per_call(float_update),
        **{f"trivial cuda_kernel, {i} inputs, {o} outputs": per_call(lambda fn=fn: fn(operands)[0])
           for (i, o), fn in trivial.items()},
    }
    for name, us in rows.items():
        print(f"{name:60s} {us}")
    record.write_json(out_dir, "launch_cost.json", {"shape": dict(B=B, Hq=HQ, Hkv=HKV, N=N, D=D, bits=BITS,
                                                                  group_size=GS, dtype=str(DT)),
                                                     "host_us_per_call": rows})


if __name__ == "__main__":
    main()
