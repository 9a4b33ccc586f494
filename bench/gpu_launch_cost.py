"""Where the host time of one fused-kernel call goes (GPU machine): each layer of `quantized_sdpa` alone.

Run: python3 bench/gpu_launch_cost.py OUT_DIR. Median host us per call, graph building only, of: the plan
lookup (`_cuda_plan`), the scalar array, the `mx.fast.cuda_kernel` call with the plan's arguments, the
whole `quantized_sdpa`, and for scale MLX's float SDPA and a one-op `mx.fast.cuda_kernel` of a tiny source.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import mlx.core as mx

import importlib

qs = importlib.import_module("mlxrewrite.backends.kernels.quantized_sdpa")
cuda = importlib.import_module("mlxrewrite.backends.kernels.quantized_sdpa_cuda")

CALLS, ROUNDS = 100, 60


def per_call(fn) -> float:
    samples = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for _ in range(CALLS):
            out = fn()
        samples.append((time.perf_counter() - start) / CALLS * 1e6)
        if isinstance(out, (mx.array, list)):  # the lookups return plans and scalars: nothing to evaluate
            mx.eval(out)
    return round(sorted(samples)[len(samples) // 2], 2)


def main() -> None:
    out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    B, Hq, Hkv, D, N = 1, 16, 4, 128, 4093
    buf = mx.random.normal((B, Hkv, N + 3, D)).astype(mx.float16)
    k = tuple(a[..., :N, :] for a in mx.quantize(buf, 64, 8))
    v = tuple(a[..., :N, :] for a in mx.quantize(buf, 64, 8))
    q = mx.random.normal((B, Hq, 1, D)).astype(mx.float16)
    kf = buf[..., :N, :]
    mx.eval(k, v, q, kf)
    plan_args = (q.shape, k[0].shape, v[0].shape, q.dtype, 64, 8, None, cuda.MASK_NONE, None, None, None, None)
    plan, chunk = qs._cuda_plan(*plan_args)
    params = qs._params(0.088, -65504.0, chunk)
    kernel, launch_args = plan
    inputs = [q, *k, *v, params]
    tiny = mx.fast.cuda_kernel(name="tiny", input_names=["x"], output_names=["y"],
                               source="y[0] = x[0];", ensure_row_contiguous=False)
    one = mx.zeros((1,))
    rows = {
        "plan lookup": per_call(lambda: qs._cuda_plan(*plan_args)),
        "scalar array lookup": per_call(lambda: qs._params(0.088, -65504.0, chunk)),
        "cuda_kernel call, plan's arguments": per_call(lambda: kernel(inputs=inputs, **launch_args)),
        "quantized_sdpa": per_call(lambda: qs.quantized_sdpa(q, k, v, scale=0.088, group_size=64, bits=8)),
        "float SDPA": per_call(lambda: mx.fast.scaled_dot_product_attention(q, kf, kf, scale=0.088)),
        "tiny cuda_kernel": per_call(lambda: tiny(inputs=[one], output_shapes=[(1,)], output_dtypes=[mx.float32],
                                                  grid=(1, 1, 1), threadgroup=(1, 1, 1))),
    }

    def evaluated(make) -> float:
        """Host us per call of building and evaluating CALLS independent calls in one graph."""
        samples = []
        for _ in range(15):
            start = time.perf_counter()
            mx.eval([make() for _ in range(CALLS)])
            samples.append((time.perf_counter() - start) / CALLS * 1e6)
        return round(sorted(samples)[7], 2)

    def tiny_kernel(header: str = "", init: bool = False, ins: int = 1, outs: int = 1):
        kernel = mx.fast.cuda_kernel(name=f"tiny{len(header)}_{ins}_{outs}", input_names=[f"x{i}" for i in range(ins)],
                                     output_names=[f"y{i}" for i in range(outs)], header=header,
                                     source="".join(f"y{i}[0] = 1.f;" for i in range(outs)), ensure_row_contiguous=False)
        args = dict(output_shapes=[(1,)] * outs, output_dtypes=[mx.float32] * outs, grid=(1, 1, 1),
                    threadgroup=(1, 1, 1), **({"init_value": 0} if init else {}))
        operands = [one] if ins == 1 else inputs[:ins]
        return lambda: kernel(inputs=operands, **args)[0]

    rows.update({
        "eval: fused call": evaluated(lambda: qs.quantized_sdpa(q, k, v, scale=0.088, group_size=64, bits=8)),
        "eval: float SDPA": evaluated(lambda: mx.fast.scaled_dot_product_attention(q, kf, kf, scale=0.088)),
        "eval: tiny kernel": evaluated(tiny_kernel()),
        "eval: tiny kernel, init_value": evaluated(tiny_kernel(init=True)),
        "eval: tiny kernel, init_value, 4 outputs": evaluated(tiny_kernel(init=True, outs=4)),
        "eval: tiny kernel, 4 outputs": evaluated(tiny_kernel(outs=4)),
        "eval: tiny kernel, our header": evaluated(tiny_kernel(header=cuda._HEADER)),
        "eval: tiny kernel, 8 strided inputs": evaluated(tiny_kernel(ins=8)),
        "eval: one multiply": evaluated(lambda: q * 0.5),
    })
    result = {"device": mx.device_info().get("device_name"), "mlx": mx.__version__,
              "date": time.strftime("%Y-%m-%d"), "host_us_per_call": rows}
    print(json.dumps(result))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_launch_cost.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
