"""Which CUDA quantized_matmul calls are wrong at a short K, in plain MLX and with dense weights (no broadcast)?

    python3 -m bench.gpu_qmm_short_k > bench/results/<device>/qmm_sm90_short_k.log

Each cell is max |out - ref| / max |ref| against dequantize-then-float32-matmul, for x of shape (B, M, .) and
a quantized (B, N=2048, K) cache: T=1 reduces over K (the GQA scores call, K = head dim), T=0 over N (the
values call). On an H100 (MLX 0.32.4) every T=1 cell with group_size >= K was wrong but M1B1, which MLX
sends to qmv rather than qmm_sm90 (`qmm_dispatch.cuda_qmm_wrong`); float16 rounding alone gives about 1e-3.
"""

import itertools

import mlx.core as mx

N = 2048
CONFIGS = [(4, 64, 64), (8, 64, 64), (4, 128, 128), (4, 64, 128)]  # (bits, group_size, K)


def relative_error(bits: int, group: int, k: int, m: int, b: int, transpose: bool) -> str:
    mx.random.seed(1)
    q = mx.quantize(mx.random.normal((b, N, k)).astype(mx.float16), group_size=group, bits=bits)
    deq = mx.dequantize(*q, group_size=group, bits=bits).astype(mx.float32)
    x = mx.random.normal((b, m, k if transpose else N)).astype(mx.float16)
    ref = x.astype(mx.float32) @ (mx.swapaxes(deq, -1, -2) if transpose else deq)
    try:
        out = mx.quantized_matmul(x, *q, transpose=transpose, group_size=group, bits=bits).astype(mx.float32)
    except Exception as e:  # noqa: BLE001 - MLX's message is the result
        return "raises " + str(e)[:60]
    nan = " NaN" if mx.isnan(out).any().item() else ""
    return f"{mx.abs(out - ref).max().item() / mx.abs(ref).max().item():.1e}{nan}"


def main() -> None:
    info = mx.device_info()
    print("mlx", mx.__version__, info.get("device_name"), info.get("architecture"), flush=True)
    for transpose in (True, False):
        for bits, group, k in CONFIGS:
            cells = (f"M{m}B{b}:{relative_error(bits, group, k, m, b, transpose)}"
                     for m, b in itertools.product((1, 4, 16, 64), (1, 8)))
            print(f"T={int(transpose)} bits={bits} g={group} K={k}: " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
