"""What one op costs the host on a GPU decode step: building it (Python), encoding it (MLX's eval), and the wait.

Run (GPU machine): python3 -m bench.gpu_host_cost OUT_DIR
At batch 1 decode is host-bound: a layer's attention is a handful of ops, each costing the host more than its
kernel costs the GPU. For each op of the float cache's and the packed cache's attention (at N=4096, 16 q /
4 kv heads, head dim 128, fp16), a graph of L and of 2L independent copies is built, `mx.async_eval`ed (which
returns once MLX has encoded every op) and waited for; the difference over L is the op's cost, in us:
build, encode, and build + encode + wait.
"""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path
from typing import Callable

import mlx.core as mx

from bench import record
from mlxrewrite.backends.kernels import kv_pack
from mlxrewrite.backends.kernels.quantized_sdpa import on_cuda, quantized_sdpa, quantized_sdpa_packed

L, ROUNDS = 16, 60
B, HQ, HKV, N, D, GS, BITS = 1, 16, 4, 4096, 128, 64, 8
DT = mx.float16


def _phases(make: Callable[[int], list[mx.array]], copies: int) -> tuple[float, float, float]:
    """Median (build, encode, total) seconds of a graph of `copies` ops."""
    samples = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        outs = make(copies)
        built = time.perf_counter()
        mx.async_eval(outs)
        encoded = time.perf_counter()
        mx.eval(outs)
        samples.append((built - start, encoded - built, time.perf_counter() - start))
    return tuple(sorted(s[i] for s in samples[5:])[len(samples[5:]) // 2] for i in range(3))


def per_op(make: Callable[[int], list[mx.array]]) -> dict[str, float]:
    one, two = _phases(make, L), _phases(make, 2 * L)
    return {name: round((b - a) / L * 1e6, 2) for name, a, b in zip(("build", "encode", "total"), one, two)}


def _trivial(inputs: int, header: str = "", tag: str = ""):
    names = [f"x{i}" for i in range(inputs)]
    return mx.fast.cuda_kernel(name=f"trivial{inputs}{tag}", input_names=names, output_names=["out"], header=header,
                               source="if (threadIdx.x == 0) out[0] = static_cast<float>(x0[0]);")


def _source_cases(q: mx.array, scratch: Path) -> dict:
    """The same trivial kernel with an 11 KB header in its source, and with that header #included by path."""
    from mlxrewrite.backends.kernels import quantized_sdpa_cuda
    header = quantized_sdpa_cuda._compact(quantized_sdpa_cuda.HEADER_PATH.read_text())
    scratch.mkdir(parents=True, exist_ok=True)
    path = (scratch / "qsdpa_probe.cuh").resolve()
    path.write_text(header + "\n")
    cases = {}
    for tag, text in (("inline", header), ("include", f'#include "{path}"\n')):
        kernel = _trivial(1, text, tag)
        cases[f"trivial cuda_kernel, 11 KB header {tag}d"] = lambda n, kernel=kernel: [kernel(
            inputs=[q], output_shapes=[(1,)], output_dtypes=[mx.float32], grid=(32, 1, 1),
            threadgroup=(32, 1, 1))[0] for _ in range(n)]
    return cases


def main() -> None:
    out_dir = Path(next((a for a in sys.argv[1:] if not a.startswith("--")), "."))
    mx.random.seed(0)
    cap = N + 256
    kf = [mx.random.normal((B, HKV, cap, D)).astype(DT) for _ in range(2 * L)]
    vf = [mx.random.normal((B, HKV, cap, D)).astype(DT) for _ in range(2 * L)]
    q = mx.random.normal((B, HQ, 1, D)).astype(DT)
    row = mx.random.normal((B, HKV, 1, D)).astype(DT)
    packed = [kv_pack.packed(k, v, GS, BITS, N) for k, v in zip(kf, vf)]
    kv = [p.kv for p in packed]
    mx.eval(kf, vf, kv, q, row)
    views = [p.parts() for p in packed]
    mx.eval(views)
    scale = D ** -0.5
    rows = itertools.cycle(range(N - 2047, N + 1))  # more row counts than the scalars cache holds

    def float_update(n: int) -> list[mx.array]:
        out = []
        for i in range(n):
            kf[i][..., N:N + 1, :] = row
            vf[i][..., N:N + 1, :] = row
            out += [kf[i], vf[i]]
        return out

    def packed_update(n: int) -> list[mx.array]:
        out = []
        for i in range(n):
            kv[i][..., N:N + 1, :] = kv_pack.kv_pack(row, row, GS, BITS)
            out.append(kv[i])
        return out

    cases = {
        "slice [..., :N, :] (no kernel)": lambda n: [kf[i][..., :N, :] for i in range(n)],
        "packed views: a slice, 2 splits and a dtype view": lambda n: [a for i in range(n) for p in packed[i].parts()
                                                                        for a in p],
        "float cache update: 2 slice updates": float_update,
        "kv_pack rows": lambda n: [kv_pack.kv_pack(row, row, GS, BITS) for _ in range(n)],
        "packed cache update: kv_pack + 1 slice update": packed_update,
        "float SDPA over 2 sliced views": lambda n: [mx.fast.scaled_dot_product_attention(
            q, kf[i][..., :N, :], vf[i][..., :N, :], scale=scale) for i in range(n)],
        "fused kernel over the 6 packed views": lambda n: [quantized_sdpa(
            q, views[i][0], views[i][1], scale=scale, group_size=GS, bits=BITS) for i in range(n)],
        "fused kernel over the packed buffer": lambda n: [quantized_sdpa_packed(
            q, packed[i], scale=scale, group_size=GS, bits=BITS) for i in range(n)],
        "fused kernel over the packed buffer, a new row count each call (a new scalars array)": lambda n: [
            quantized_sdpa_packed(q, packed[i]._replace(n=next(rows)), scale=scale, group_size=GS, bits=BITS)
            for i in range(n)],
        "mx.array of 4 floats (a kernel's scalars)": lambda n: [mx.array([0.5, -1.0, 256.0, float(i)]) for i in range(n)],
        "q * scale (one elementwise op)": lambda n: [q * scale for _ in range(n)],
        "mx.zeros (a fill)": lambda n: [mx.zeros((B, HQ, 1, D), DT) for _ in range(n)],
    }
    if on_cuda():
        for inputs in (1, 7):
            for init in (None, 0):
                kernel = _trivial(inputs)
                cases[f"trivial cuda_kernel, {inputs} inputs, init_value={init}"] = \
                    lambda n, kernel=kernel, inputs=inputs, init=init: [kernel(
                        inputs=[q] * inputs, output_shapes=[(1,)], output_dtypes=[mx.float32], grid=(32, 1, 1),
                        threadgroup=(32, 1, 1), init_value=init)[0] for _ in range(n)]
        try:
            cases.update(_source_cases(q, out_dir))
        except Exception as error:  # noqa: BLE001 - a probe: say what failed, time the rest
            print(f"source cases: {type(error).__name__}: {error}")
    results = {}
    for name, make in cases.items():
        try:
            results[name] = per_op(make)
        except Exception as error:  # noqa: BLE001 - a probe: record what failed
            results[name] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
    for name, row_ in results.items():
        print(f"{name:50s} {row_}")
    record.write_json(out_dir, "host_cost_n4096.json", {"shape": dict(B=B, Hq=HQ, Hkv=HKV, N=N, D=D, bits=BITS,
                                                                     group_size=GS, dtype=str(DT)),
                                                        "us_per_op": results})


if __name__ == "__main__":
    main()
