"""How many query rows one thread block serves: the kernel's ROWS_PER_BLOCK, 8 (today) against 16.

Run (GPU machine): python3 -m bench.gpu_rows_per_block OUT_DIR
A block serves n_rep heads x MBE query positions; past that, another row group's blocks read the same K/V
chunk again, so a verification step of M=16 over 4 kv heads at n_rep 4 reads its cache 8 times
(bench/results/cuda-nvidia-h200/fused_attention_v4.json: 2.5% of HBM). Rows per block bound the
accumulators (RB x DPT floats a thread, DPT 4 up to 8 rows, 2 above), so 16 halves the re-reads at the
same register budget. Per setting: us per call in a decode chain (bench.gpu_chunk_latency) at M 1, 4 and
16, N 4096 and 32768; M-invariance (bench.gpu_fused_attention.m_invariance, bitwise); and the packed
grid's points against float32 attention (bench.gpu_packed_attention).
"""

from __future__ import annotations

import sys
from pathlib import Path

import mlx.core as mx

from bench import record
from bench.gpu_chunk_latency import chain_us
from bench.gpu_fused_attention import m_invariance
from bench.gpu_packed_attention import GRID, point
from mlxrewrite.backends.kernels import clear_caches, kv_pack, quantized_sdpa_packed
from mlxrewrite.backends.kernels import quantized_sdpa_cuda as cuda

def main() -> None:
    out_dir = Path(next((a for a in sys.argv[1:] if not a.startswith("--")), "."))
    caches = {}
    for n in (4096, 32768):
        mx.random.seed(0)
        caches[n] = kv_pack.packed(*(mx.random.normal((1, 4, n, 128)).astype(mx.float16) for _ in range(2)), 64, 8)
        mx.eval(caches[n].kv)
    result = {}
    for rows in (8, 16):
        cuda.ROWS_PER_BLOCK = rows
        clear_caches()
        timing = {f"N{n}_M{M}": chain_us(lambda q, p=caches[n]: quantized_sdpa_packed(
            q, p, scale=128 ** -0.5, group_size=64, bits=8), M) for n in caches for M in (1, 4, 16)}
        entry = {"chain_us": timing}
        if rows != 8:
            entry["m_invariance"] = m_invariance()
            entry["grid"] = [point(*args) for args in GRID[6:]]
        result[f"rows_per_block_{rows}"] = entry
        print(rows, entry, flush=True)
    cuda.ROWS_PER_BLOCK = 8
    record.write_json(out_dir, "rows_per_block.json", result)


if __name__ == "__main__":
    main()
