"""Where MLX's Metal and CUDA backends send a quantized_matmul, and which of the kernels are wrong: facts shared by
the two quantized_matmul rules (quantized_matmul_broadcast, quantized_matmul_legalise) and their doctor probes.
Not a rule. This is the safe default, used wherever `mlxrewrite doctor` measured nothing (qmm_profile.py).

Metal (`QuantizedMatmul::eval_gpu`, v0.32.1): the vector kernels (qmv/qvm) run when M < `vector_limit`, which is 4
for transpose=False and `get_qmv_batch_limit(K, N, device)` for transpose=True (`_QMV_LIMITS`); they misread
stride-0 weight batches. CPU is correct for every M (measured).

CUDA source: MLX at the newest stored snapshot (commit 846d17622, the 0.32.2 version bump; `mlx/backend/cuda/
quantized/` is unchanged there since v0.32.1, and v0.32.4's tree is not stored), checked against what an H100
ran with MLX 0.32.4 (bench/results/). `QuantizedMatmul::eval_gpu` (quantized/quantized.cpp) asks each
kernel's `supports_*` (quantized/qmm/qmm.cu) and takes, in this order, the first that accepts:

- qmm_sm90: compute capability 9, N % 4 == 0 (TMA: N * 4 bytes of uint32 w % 16), K % 64 == 0, biases
  (affine), transpose, 4/8 bits, group_size >= K; qmv instead where M == B == 1 and N, K <= 16384.
- qmm_sm80: capability >= 8, N % 128 == 0, K % max(64, group_size) == 0, float16/bfloat16 x, transpose,
  4/8 bits; qmv instead where M * B < 8.
- qmm_naive: K % max(64, group_size) == 0 when transposed (any K when not); qmv instead where M * B < 8.
- qmv: transpose, K % 8 == 0 (fp_qmv too: capability >= 10, fp modes, M <= 8).
(x: the activations; K: x's last dim; N: the output's last dim; B: the output's batch count.)

Every kernel also needs w, scales and biases each with `flags().contiguous` and row-major last two dims
(`is_last_2_dims_row_contiguous`): a view with holes, such as mlx-lm's KV cache sliced to its offset
(`keys[..., :offset, :]` of a buffer grown in steps of 256 rows), is never copied; no kernel accepts it and
MLX raises "[quantized_matmul] No implementation for problem shape: MxNxKxB". With dense weights some kernel
always accepts: qmm_naive predicates M and N and handles a K residue (device/qmm_naive.cuh), so it takes every
untransposed call, and transposed weights are quantized along K (K % group_size == 0), so qmv takes the rest.
`GatherQMM::eval_gpu` (same file) asks qmm_sm80, qmm_naive and qmv with the same tests (no sm90 path): dense
expert weights always have a kernel there, and only qmm_sm80's over-read below applies (K under 3 tiles).
mlxrewrite does not intercept gather_qmm.

Two kernel defects (H100, MLX 0.32.4; docs/upstream-mlx-cuda-qmm.md): qmm_sm80's mainloop
(device/qmm_sm80.cuh, "Prefetch beginning tiles") fills its 3-stage pipeline without clamping to the K-tile
count, so for K under 3 tiles it reads up to 2 tiles past the end of x and w (compute-sanitizer; a process
died with "unspecified launch failure"); qmm_sm90 computes group_size >= K wrong for dense weights too.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Mapping

from mlxrewrite.backends.device import Backend

# get_qmv_batch_limit(K, N): (small: K,N <= 2048; mid: <= 4096; large), by (generation floor, 'd' class)
_QMV_LIMITS = [  # (min generation, size class test, (small, mid, large)), checked in this order
    (17, "not d", (33, 25, 13)),
    (15, "not d", (13, 15, 13)),
    (13, "d", (32, 18, 12)),
    (13, "any", (14, 10, 6)),
    (0, "d", (32, 18, 12)),
    (0, "any", (18, 12, 10)),
]
MAX_QMV_LIMIT = 33
QMV_SM90_LIMIT = 16384  # qmm_sm90 gives way to qmv for M == B == 1 only while N and K are at most this


def quantization(params: Mapping[str, Any]) -> tuple[str, int, int]:
    """(mode, bits, group_size) of a quantized call, with MLX's defaults filled in."""
    mode = params.get("mode") or "affine"
    bits = params.get("bits") or (8 if mode == "mxfp8" else 4)
    group_size = params.get("group_size") or {"affine": 64, "nvfp4": 16}.get(mode, 32)
    return mode, bits, group_size


def qmm_mkn(x_shape: tuple, w_shape: tuple, params: Mapping[str, Any]) -> tuple[int, int, int]:
    """M, K, N of quantized_matmul(x, w, ...): w is (N, K) packed when transposed, else (K, N) packed."""
    bits = quantization(params)[1]
    n = w_shape[-2] if params["transpose"] else w_shape[-1] * 32 // bits
    return x_shape[-2], x_shape[-1], n


def metal_vector_limit(k: int, n: int, transpose: bool, arch: str) -> int:
    """MLX's Metal threshold: M below this runs the vector kernel (the one that misreads stride-0 batches)."""
    if not transpose:
        return 4
    size = 0 if k <= 2048 and n <= 2048 else 1 if k <= 4096 and n <= 4096 else 2
    match = re.search(r"g(\d+)([a-z])", arch)
    if not match:
        return MAX_QMV_LIMIT  # unknown chip: assume the largest limit MLX uses anywhere
    gen, size_class = int(match.group(1)), match.group(2)
    for min_gen, class_test, limits in _QMV_LIMITS:
        class_ok = class_test == "any" or (size_class == "d") == (class_test == "d")
        if gen >= min_gen and class_ok:
            return limits[size]
    return MAX_QMV_LIMIT


def qmm_hazard_applies(backend: Backend, m: int, k: int, n: int, transpose: bool) -> tuple[bool, str]:
    """Does MLX's kernel for this call read stride-0 weight batches wrongly? (answer, reason)."""
    if backend.kind == "metal":
        limit = metal_vector_limit(k, n, transpose, backend.arch)
        if m < limit:
            return True, f"Metal vector kernel runs for M={m} < {limit} (get_qmv_batch_limit)"
        return False, f"Metal matrix kernel runs for M={m} >= {limit}; it handles broadcast batches"
    if backend.kind == "cuda":
        return True, "CUDA kernels use matrix 0 for every batch of a broadcast weight (any M)"
    return True, "CPU is correct, but the rewrite keeps CPU and GPU graphs alike and is faster"


def dispatch_rows(n: int) -> int:
    """The smallest N that MLX's CUDA dispatch treats as it treats `n`: it reads N only as N % 4 == 0,
    N % 128 == 0 and N <= QMV_SM90_LIMIT. A decode loop's growing N thus maps onto a handful of values."""
    aligned = 128 if n % 128 == 0 else 4 if n % 4 == 0 else 1
    return aligned + (2 * QMV_SM90_LIMIT if n > QMV_SM90_LIMIT else 0)


def needs_dense_weights(backend: Backend) -> bool:
    """CUDA never copies quantized weights: they must be dense with row-major last two dims, or MLX raises
    "No implementation for problem shape" (a sliced KV cache is not dense). Metal and CPU copy them."""
    return backend.kind == "cuda"


def cuda_qmm_kernel(backend: Backend, dtype: str, rows: int, k: int, params: Mapping[str, Any],
                    n: int | None = None) -> str | None:
    """The kernel MLX's CUDA dispatch runs for a call with dense weights ("qmm_sm90", "qmm_sm80", "qmm_naive" or
    "qmv"), or None where it raises "No implementation" (or the backend is not CUDA). `rows` is M times the
    batch count B (a fold keeps it); `n` is N, or None where unknown: then the N alignments are taken to hold,
    which picks qmm_sm90 and qmm_sm80 wherever they could run, the cautious answer for the defects (the
    broadcast rule keeps one decision per KV-length bucket). An unknown architecture counts as sm_90, whose
    kernel is the wrong one."""
    if backend.kind != "cuda":
        return None
    mode, bits, group_size = quantization(params)
    transpose = bool(params["transpose"])
    major = _compute_capability(backend.arch)
    tiled = transpose and bits in (4, 8)
    if (tiled and major in (9, None) and mode == "affine" and group_size >= k and k % 64 == 0
            and (n is None or n % 4 == 0)):
        small = n is None or n <= QMV_SM90_LIMIT
        return "qmv" if rows == 1 and small and k <= QMV_SM90_LIMIT else "qmm_sm90"
    tile = max(64, group_size)
    qmv = transpose and k % 8 == 0
    if (tiled and (major is None or major >= 8) and dtype in ("float16", "bfloat16") and k % tile == 0
            and (n is None or n % 128 == 0)):
        return "qmv" if qmv and rows < 8 else "qmm_sm80"
    if not transpose or k % tile == 0:
        return "qmv" if qmv and rows < 8 else "qmm_naive"
    return "qmv" if qmv else None


def cuda_qmm_wrong(backend: Backend, dtype: str, rows: int, k: int, params: Mapping[str, Any],
                   n: int | None = None) -> str | None:
    """Why MLX's CUDA kernel computes this call wrong whatever its weights' layout, or None.

    `qmm_sm90` (compute capability 9: H100, H200) runs transposed 4/8-bit affine calls whose group spans all
    of K (group_size >= K: the scores call at head dim 64 with group 64, or 128 with group 128). On an
    H100 with MLX 0.32.4 it gave errors the size of the result, or NaN, for dense unbatched weights too, at
    every M and batch count but M = B = 1, where MLX runs qmv (bench/results/cuda-nvidia-h100-80gb-hbm3/
    qmm_sm90_short_k.log). Every rewrite that keeps N runs the same kernel."""
    if cuda_qmm_kernel(backend, dtype, rows, k, params, n) != "qmm_sm90":
        return None
    return f"CUDA qmm_sm90 computes K={k} with group_size {quantization(params)[2]} >= K wrong (H100, MLX 0.32.4)"


def cuda_qmm_overreads(backend: Backend, dtype: str, rows: int, k: int, params: Mapping[str, Any],
                       n: int | None = None) -> str | None:
    """Why MLX's CUDA `qmm_sm80` kernel may read past the end of x and w in this call, or None.

    Its mainloop (device/qmm_sm80.cuh) fills a 3-stage pipeline: it fetches K-tiles 0, 1 and then 2 without
    clamping to the tile count, so for K under 3 tiles (a tile is max(64, group_size) columns: the scores
    call at head dim 64 or 128) it reads up to 2 tiles past the last row of x and of w. The values are never
    used, but past the end of a buffer nothing may be mapped: compute-sanitizer reports the reads, and on an
    H100 (D=128, N=4096, 4 bits) the process died with "unspecified launch failure"."""
    tile = max(64, quantization(params)[2])
    if cuda_qmm_kernel(backend, dtype, rows, k, params, n) != "qmm_sm80" or k // tile >= 3:
        return None
    return (f"CUDA qmm_sm80 reads up to {3 - k // tile} K-tile(s) of {tile} columns past the last rows of x "
            f"and w when K={k} spans fewer than 3 tiles")


@functools.lru_cache(maxsize=None)  # eager mode's derived facts ask per call, with one arch string per process
def _compute_capability(arch: str) -> int | None:
    """The major compute capability in MLX's CUDA architecture string ("sm_90" -> 9); None if unknown."""
    match = re.fullmatch(r"sm_(\d+?)(\d)a?", arch)
    return int(match.group(1)) if match else None
