"""A few launches of the fused kernel at one decode shape, for a profiler (ncu) to look at one of them.

Run (GPU machine): ncu --clock-control none -k regex:qsdpa --launch-skip 3 --launch-count 1 \
    --section LaunchStats --section Occupancy --section WarpStateStats --section SpeedOfLight \
    python3 -m bench.gpu_qsdpa_one [N] [--chunk=KEYS]
B=1, 16 q / 4 kv heads, head dim 128, M=1, fp16, an 8-bit packed cache of N keys (default 32768); `--chunk`
replaces the default chunk size (a multiple of 128) to time others.
"""

import importlib
import sys

import mlx.core as mx

from mlxrewrite.backends.kernels import kv_pack, quantized_sdpa_packed

chunk = next((int(a.split("=")[1]) for a in sys.argv if a.startswith("--chunk=")), None)
if chunk:
    importlib.import_module("mlxrewrite.backends.kernels.quantized_sdpa").chunk_size = lambda n: chunk
n = int(next((a for a in sys.argv[1:] if not a.startswith("--")), 32768))
packed = kv_pack.packed(*(mx.random.normal((1, 4, n, 128)).astype(mx.float16) for _ in range(2)), 64, 8)
q = mx.random.normal((1, 16, 1, 128)).astype(mx.float16)
mx.eval(packed.kv, q)
for _ in range(6):
    mx.eval(quantized_sdpa_packed(q, packed, scale=128 ** -0.5, group_size=64, bits=8))
print("ok", n)
