"""Would the fused kernel run faster with fewer registers? An experiment with `__launch_bounds__`.

Run (GPU machine): python3 -m bench.gpu_launch_bounds OUT_DIR
ncu (results/cuda-nvidia-h200/ncu_qsdpa_packed_n32768.txt) has the kernel at 122 registers a thread, so 2
blocks of 256 threads per SM, and latency-bound. MLX writes the kernel's signature itself, so bounds can
only come from a declaration before it, written here the way MLX writes the definition. For min blocks
per SM of 2 (today's), 3 and 4: whether it compiles, the output bitwise against today's kernel, and us
per call in a decode chain (bench.gpu_chunk_latency) at 4096 and 32768 keys.
"""

from __future__ import annotations

import sys
from pathlib import Path

import mlx.core as mx

from bench import record
from bench.gpu_chunk_latency import chain_us
from mlxrewrite.backends.kernels import clear_caches, kv_pack, quantized_sdpa_packed
from mlxrewrite.backends.kernels import quantized_sdpa_cuda as cuda

_REAL_KERNEL = cuda.mx.fast.cuda_kernel


def _declaration(name: str, inputs: list[tuple[str, str, bool, bool]], outputs: list[tuple[str, str]],
                 min_blocks: int) -> str:
    params = []
    for arg, ctype, shape, strides in inputs:
        params.append(f"const {ctype}* {arg}")
        if shape:
            params.append(f"const __grid_constant__ Shape {arg}_shape")
        if strides:
            params.append(f"const __grid_constant__ Strides {arg}_strides")
    params += [f"{ctype}* {arg}" for arg, ctype in outputs]
    return (f"namespace mlx::core::cu {{ __global__ void __launch_bounds__({cuda.THREADS}, {min_blocks}) "
            f"custom_kernel_{name}({', '.join(params)}); }}\n")


def _bounded(min_blocks: int):
    """cuda_kernel, but the header gets a declaration of the packed f16 kernel with launch bounds."""
    def make(*, name, input_names, output_names, source, header, **kw):
        inputs = [("q", "__half", True, True), ("kv", "uint32_t", False, True), ("params", "float", False, False)]
        assert input_names == [i[0] for i in inputs], input_names
        decl = _declaration(name, inputs, [("out", "__half"), ("work", "float")], min_blocks)
        return _REAL_KERNEL(name=f"{name}", input_names=input_names, output_names=output_names, source=source,
                            header=header + decl + f"// min blocks {min_blocks}\n", **kw)
    return make


def main() -> None:
    out_dir = Path(next((a for a in sys.argv[1:] if not a.startswith("--")), "."))
    rows = []
    for n in (4096, 32768):
        mx.random.seed(0)
        packed = kv_pack.packed(*(mx.random.normal((1, 4, n, 128)).astype(mx.float16) for _ in range(2)), 64, 8)
        q = mx.random.normal((1, 16, 1, 128)).astype(mx.float16)
        mx.eval(packed.kv, q)
        call = lambda x: quantized_sdpa_packed(x, packed, scale=128 ** -0.5, group_size=64, bits=8)  # noqa: E731
        cuda.mx.fast.cuda_kernel = _REAL_KERNEL
        clear_caches()
        want = call(q)
        row = {"N": n, "today_us": chain_us(call)}
        for blocks in (2, 3, 4):
            cuda.mx.fast.cuda_kernel = _bounded(blocks)
            clear_caches()
            try:
                got = call(q)
                row[f"min_blocks_{blocks}"] = {"bitwise": mx.array_equal(got, want).item(), "us": chain_us(call)}
            except Exception as error:  # noqa: BLE001 - the experiment's result
                row[f"min_blocks_{blocks}"] = {"error": f"{type(error).__name__}: {str(error)[:400]}"}
        cuda.mx.fast.cuda_kernel = _REAL_KERNEL
        rows.append(row)
        print(row, flush=True)
    record.write_json(out_dir, "launch_bounds.json", {"shape": "B=1, 16 q / 4 kv heads, D=128, M=1, fp16, 8-bit",
                                                      "rows": rows})


if __name__ == "__main__":
    main()
