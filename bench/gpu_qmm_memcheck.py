"""The GQA quantized-KV calls, one after another in one process, each checked against dequantize-then-float
matmul. Meant to run under compute-sanitizer, which names any kernel that reads outside its buffers; with
`--padding N` it puts N unallocated bytes after every allocation, so a read past the end of a buffer is
reported wherever the allocator placed it. The printed `== step` lines attribute its reports to a call.

    compute-sanitizer --tool memcheck --padding 1024 python3 -m bench.gpu_qmm_memcheck --d 128 \\
        fold:scores:16 rw-fold:scores:16

A step is ROUTE:CALL:M. Plain MLX routes: `shipped` (mlx-lm's `expand_dims(-3)` broadcast), `fold` (the
broadcast dim moved into M: x is (1, n_kv, n_rep*M, .), w is the un-broadcast cache), `copy` (the cache
concatenated n_rep times). mlxrewrite routes: `rw` (`mlxrewrite.compile` of the shipped call: the policy's
choice), `rw-fold`, `rw-copy`, `rw-dequantize` (that rewrite forced). CALL: `scores` (q @ K^T,
transpose=True) or `values` (probabilities @ V, transpose=False).
"""

from __future__ import annotations

import argparse

import mlx.core as mx

import mlxrewrite
from bench.common import forced

N_KV, N_REP, GROUP = 8, 4, 64


def operands(route: str, call: str, m: int, n: int, d: int, bits: int, dtype: mx.Dtype):
    """(x, w, scales, biases, transpose, reference output as float32) for one step, evaluated."""
    mx.random.seed(m * 7 + n)
    cache = mx.random.normal((1, N_KV, n, d)).astype(dtype)
    w, scales, biases = mx.quantize(cache, group_size=GROUP, bits=bits)
    dense = mx.dequantize(w, scales, biases, group_size=GROUP, bits=bits).astype(mx.float32)
    transpose = call == "scores"
    inner = d if transpose else n
    x = (mx.random.normal((1, N_KV, N_REP, m, inner)) * inner**-0.5).astype(dtype)
    reference = x.astype(mx.float32) @ mx.expand_dims(mx.swapaxes(dense, -1, -2) if transpose else dense, -3)
    weights = (w, scales, biases)
    if route == "shipped" or route.startswith("rw"):
        weights = tuple(mx.expand_dims(a, -3) for a in weights)
    elif route == "fold":
        x = x.reshape(1, N_KV, N_REP * m, inner)
    elif route == "copy":
        weights = tuple(mx.concatenate([mx.expand_dims(a, -3)] * N_REP, axis=-3) for a in weights)
    else:
        raise SystemExit(f"unknown route {route!r}: shipped, fold, copy, rw or rw-REWRITE")
    mx.eval(x, weights, reference)
    return x, weights, transpose, reference


def kernel(route: str, transpose: bool, bits: int):
    """The quantized matmul as a function of (x, w, scales, biases): MLX's, or mlxrewrite's for `rw` routes."""
    def qmm(x, w, scales, biases):
        return mx.quantized_matmul(x, w, scales, biases, transpose=transpose, group_size=GROUP, bits=bits)
    if route == "rw":
        return mlxrewrite.compile(qmm)
    if route.startswith("rw-"):
        return mlxrewrite.compile(qmm, rules=[forced(route.removeprefix("rw-"))])
    return qmm


def step(spec: str, n: int, d: int, bits: int, dtype: mx.Dtype) -> None:
    route, call, m = spec.split(":")
    x, (w, scales, biases), transpose, reference = operands(route, call, int(m), n, d, bits, dtype)
    sizes = ", ".join(f"{name} {a.shape} {a.nbytes} B" for name, a in (("x", x), ("w", w), ("scales", scales)))
    print(f"== {spec} N={n} D={d} bits={bits}: {sizes}", flush=True)
    try:
        out = kernel(route, transpose, bits)(x, w, scales, biases)
        out = out.reshape(reference.shape).astype(mx.float32)
        error = mx.abs(out - reference).max().item()
        print(f"   max |out - reference| = {error:.4g}", flush=True)
    except Exception as e:  # noqa: BLE001 - MLX's message is the result
        print(f"   raised: {str(e)[:200]}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("steps", nargs="+", metavar="ROUTE:CALL:M")
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--dtype", default="float16")
    args = parser.parse_args()
    print("mlx", mx.__version__, mx.default_device(), mx.device_info().get("device_name"), flush=True)
    for spec in args.steps:
        step(spec, args.n, args.d, args.bits, getattr(mx, args.dtype))
        mx.synchronize()
    print("done", flush=True)


if __name__ == "__main__":
    main()
