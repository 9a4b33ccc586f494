"""The packed cache's row kernel on the GPU: bitwise `mx.quantize` over the grid mlx-lm's models use, and its cost.

Run (GPU machine): python3 -m bench.gpu_kv_pack OUT_DIR
- verified: `kv_pack.verified` (the battery the kernel must pass before it is used, its in-place form too)
  for float16, bfloat16 and float32 rows, bits 4 and 8, group sizes 32/64/128, head dims 64/96/128/256 (and K 192 over V 128);
- a decode-sized and a prompt-sized comparison with `reference` (two mx.quantize), bitwise;
- host us to build, and us to build and evaluate, one decode step's rows: the kernel against the two
  mx.quantize calls plus mlx-lm's six slice updates it replaces, and the kernel plus one slice update against
  the kernel writing the rows in place (`kv_pack.in_place_writer`, what a packed cache does on CUDA).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import mlx.core as mx

from bench import record
from mlxrewrite.backends.kernels import kv_layout
from mlxrewrite.backends.kernels import kv_pack as kp

DTYPES = (mx.float16, mx.bfloat16, mx.float32)


def _us(fn, rounds: int = 300) -> tuple[float, float]:
    """(median host us to build, median us to build and evaluate)."""
    build, total = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        out = fn()
        built = time.perf_counter()
        mx.eval(out)
        build.append((built - start) * 1e6)
        total.append((time.perf_counter() - start) * 1e6)
    return sorted(build)[rounds // 2], sorted(total)[rounds // 2]


def main() -> None:
    out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    grid = [(dt, bits, gs, d, d) for dt in DTYPES for bits in (4, 8) for gs in (32, 64, 128)
            for d in (64, 96, 128, 256) if d % gs == 0] + [(mx.float16, 8, 64, 192, 128)]
    failed = [f"{dt} bits {b} group {g} dims {dk}/{dv}" for dt, b, g, dk, dv in grid if not kp.verified(dt, b, g, dk, dv)]
    compared = {}
    for name, shape in (("decode", (1, 8, 1, 128)), ("prompt", (2, 8, 1000, 128))):
        keys = (mx.random.normal(shape) * 3).astype(mx.float16)
        values = mx.random.normal((shape[0], shape[2], shape[1], shape[3])).astype(mx.float16).swapaxes(1, 2)
        got, want = kp.kv_pack(keys, values, 64, 8), kp.reference(keys, values, 64, 8)
        compared[name] = mx.array_equal(got, want).item()
    keys = mx.random.normal((1, 8, 1, 128)).astype(mx.float16)
    values = mx.random.normal((1, 1, 8, 128)).astype(mx.float16).swapaxes(1, 2)
    mx.eval(keys, values)
    buffers = [mx.zeros((1, 8, 4096, w)) for w in (32, 2, 2, 32, 2, 2)]
    mx.eval(buffers)

    def mlx_lm_update():
        k, v = mx.quantize(keys, 64, 8), mx.quantize(values, 64, 8)
        for i in range(3):
            buffers[i][..., 100:101, :] = k[i]
            buffers[3 + i][..., 100:101, :] = v[i]
        return buffers

    row = kv_layout.Row.of(128, 128, 64, 8, mx.float16)
    kv = mx.zeros((1, 8, 4096, row.width), mx.uint32)
    write, at = kp.in_place_writer(keys, values, 64, 8, row), mx.array(100, dtype=mx.int32)

    def packed_update():
        kv[..., 100:101, :] = kp.kv_pack(keys, values, 64, 8)
        return kv

    timing = {}
    for name, fn in (("kv_pack kernel", lambda: kp.kv_pack(keys, values, 64, 8)),
                     ("two mx.quantize", lambda: [mx.quantize(keys, 64, 8), mx.quantize(values, 64, 8)]),
                     ("packed cache update (kernel + 1 slice update)", packed_update),
                     ("mlx-lm's update (2 quantize + 6 slice updates)", mlx_lm_update),
                     *[("packed cache update in place (kernel)", lambda: write(keys, values, kv, at))] * bool(write)):
        build, total = _us(fn)
        timing[name] = {"build_us": round(build, 2), "build_and_eval_us": round(total, 2)}
    record.write_json(out_dir, "kv_pack.json", {
        "verified": f"{len(grid) - len(failed)} of {len(grid)}", "failed": failed,
        "why": {str(k): v for k, v in list(kp.NOT_VERIFIED.items())[:5]}, "bitwise_vs_mx_quantize": compared,
        "in_place_served": write is not None, "host_us": timing})


if __name__ == "__main__":
    main()
