"""Both rules where the hazards bite: errors and times of as-shipped vs rewritten calls on the current device.

Run (GPU machine): python3 bench/gpu_rules.py OUT_DIR   -> OUT_DIR/gpu_rules.json, OUT_DIR/sdpa_gpu_trace.json
Times are medians of compiled calls measured side by side in one run; errors are max |out - reference|
against dequantize-then-float32 attention (and against mask=None for SDPA).
"""

from __future__ import annotations

import datetime
import json
import sys
import time

import mlx.core as mx

import mlxrewrite
from mlxrewrite.examples.gqa_quantized_attention import B, D, GROUP, N_KV, N_REP, attention as gqa
from mlxrewrite.core.rule import Rule
from mlxrewrite.rules import quantized_matmul_broadcast as qmm_rule


def timed(fn, *args, iters: int = 30) -> float:
    for _ in range(3):
        mx.eval(fn(*args))
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        mx.eval(fn(*args))
        samples.append(time.perf_counter() - start)
    return sorted(samples)[len(samples) // 2] * 1e6


def forced(rewrite: str) -> Rule:
    """The built-in rule with its choice of rewrite forced (to measure both)."""
    return qmm_rule.RULE.forcing(rewrite)


def run_or_error(fn, *args):
    try:
        out = fn(*args)
        mx.eval(out)
        return out, None
    except (RuntimeError, ValueError) as error:
        return None, str(error)[:200]


def qmm_cases(rows: list, dtype=mx.float16, capacity_pad: int = 0, ns=(512, 2048, 4096, 7358), ms=(1, 2, 4, 8)):
    for n in ns:
        for m in ms:
            mx.random.seed(0)
            cap = n + capacity_pad
            keys = mx.random.normal((B, N_KV, cap, D)).astype(dtype)
            values = mx.random.normal((B, N_KV, cap, D)).astype(dtype)
            k_q = [a[..., :n, :] for a in mx.quantize(keys, group_size=GROUP, bits=8)]  # a sliced cache when padded
            v_q = [a[..., :n, :] for a in mx.quantize(values, group_size=GROUP, bits=4)]
            queries = (mx.random.normal((B, N_KV * N_REP, m, D)) * D**-0.5).astype(dtype)
            args = (queries, *k_q, *v_q)
            mx.eval(args)
            kd = mx.dequantize(*k_q, group_size=GROUP, bits=8).astype(mx.float32)
            vd = mx.dequantize(*v_q, group_size=GROUP, bits=4).astype(mx.float32)
            q = queries.astype(mx.float32).reshape(B, N_KV, N_REP, m, D)
            scores = mx.softmax(q @ mx.expand_dims(kd, 2).swapaxes(-1, -2), axis=-1, precise=True)
            ref = (scores @ mx.expand_dims(vd, 2)).reshape(B, -1, m, D)
            row = {"N": n, "M": m, "sliced_cache": bool(capacity_pad)}
            variants = {"as_shipped": mx.compile(gqa), "rewritten": mlxrewrite.compile(gqa),
                        "fold": mlxrewrite.compile(gqa, rules=[forced("fold")]),
                        "copy": mlxrewrite.compile(gqa, rules=[forced("copy")])}
            for name, fn in variants.items():
                out, error = run_or_error(fn, *args)
                if error:
                    row[name] = {"error": error}
                    continue
                row[name] = {"max_err": round(mx.max(mx.abs(out.astype(mx.float32) - ref)).item(), 5),
                             "us": round(timed(fn, *args), 1)}
            row["rewrite_chosen"] = variants["rewritten"].explain().count("-> fold") and "fold" or "copy"
            print(json.dumps(row), flush=True)
            rows.append(row)


def sdpa(q, k, v, mask):
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5, mask=mask)


def sdpa_cases(rows: list, dtype=mx.float16, shapes=((64, 1, 16384), (128, 1, 4096), (128, 2, 16384), (256, 8, 4096))):
    for d, l, n in shapes:
        mx.random.seed(0)
        q = mx.random.normal((2, 16, l, d)).astype(dtype)
        k = mx.random.normal((2, 4, n, d)).astype(dtype)
        v = mx.random.normal((2, 4, n, d)).astype(dtype)
        mx.eval(q, k, v)

        def with_true_mask(q, k, v):
            return sdpa(q, k, v, mx.ones((2, 1, l, n), dtype=mx.bool_))

        def with_zero_mask(q, k, v):
            return sdpa(q, k, v, mx.zeros((2, 1, l, n), dtype=dtype))

        def no_mask(q, k, v):
            return sdpa(q, k, v, None)

        ref = mx.compile(no_mask)(q, k, v).astype(mx.float32)
        row = {"D": d, "L": l, "N": n}
        for name, fn in {"none": mx.compile(no_mask), "true_mask": mx.compile(with_true_mask),
                         "true_mask_rewritten": mlxrewrite.compile(with_true_mask),
                         "zero_mask": mx.compile(with_zero_mask),
                         "zero_mask_rewritten": mlxrewrite.compile(with_zero_mask)}.items():
            out = fn(q, k, v)
            row[name] = {"max_diff_vs_none": round(mx.max(mx.abs(out.astype(mx.float32) - ref)).item(), 6),
                         "us": round(timed(fn, q, k, v), 1)}
            if hasattr(fn, "explain"):
                row[name]["mask_dropped"] = "drop_mask" in fn.explain()
        print(json.dumps(row), flush=True)
        rows.append(row)


def sdpa_fixture(path: str) -> None:
    """The GPU export of SDPA with a constant all-True mask (a test fixture: GPU exports it as one primitive)."""
    # L=4, D=64, fp16: cuDNN takes array masks there, so CUDA exports the fused primitive
    q, k = mx.ones((1, 4, 4, 64), dtype=mx.float16), mx.ones((1, 2, 32, 64), dtype=mx.float16)
    events = []

    def fn(q, k):
        return sdpa(q, k, k, mx.ones((1, 1, 4, 32), dtype=mx.bool_))

    mx.export_function(events.append, fn, q, k)
    def enc(entry):
        return [entry[0], list(entry[1]), str(entry[2]).removeprefix("mlx.core.")]
    out = []
    for e in events:
        if e["type"] == "constants":
            out.append({"type": "constants", "constants": [
                {"name": n, "dtype": str(a.dtype).removeprefix("mlx.core."), "value": a.tolist()}
                for n, a in e["constants"]]})
        elif e["type"] == "primitive":
            out.append({"type": "primitive", "name": e["name"], "arguments": [str(x) if isinstance(x, mx.Dtype)
                        else x for x in e["arguments"]], "inputs": [enc(i) for i in e["inputs"]],
                        "outputs": [enc(o) for o in e["outputs"]]})
        elif e["type"] in ("inputs", "outputs"):
            out.append({"type": e["type"], e["type"]: [enc(i) for i in e[e["type"]]]})
        else:
            out.append({"type": e["type"], "keywords": [list(x) for x in e["keywords"]]})
    meta = {"device": str(mx.default_device()), "mlx": mx.__version__}
    with open(path, "w") as f:
        json.dump({"meta": meta, "events": out}, f, indent=1)


def main() -> None:
    out_dir = sys.argv[1] if len(sys.argv) > 1 else "."
    if "--fixture-only" in sys.argv:
        sdpa_fixture(f"{out_dir}/sdpa_gpu_trace.json")
        return
    info = {"mlx": mx.__version__, "device": str(mx.default_device()),
            "date": datetime.date.today().isoformat()}
    try:
        info["gpu"] = mx.cuda.device_info() if hasattr(mx, "cuda") else {}
    except Exception:  # device_info is best effort
        pass
    print(json.dumps(info), flush=True)
    qmm, qmm_sliced, attn = [], [], []
    qmm_cases(qmm)
    qmm_cases(qmm_sliced, capacity_pad=200)  # cache buffers longer than N: sliced views with holes
    sdpa_cases(attn)
    sdpa_fixture(f"{out_dir}/sdpa_gpu_trace.json")
    with open(f"{out_dir}/gpu_rules.json", "w") as f:
        json.dump({"info": info, "quantized_matmul": qmm, "quantized_matmul_sliced_cache": qmm_sliced,
                   "sdpa": attn}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
