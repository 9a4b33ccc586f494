"""CUDA kernel for `kv_pack`: new K/V rows quantized as `mx.quantize` does, written as packed cache rows.

One warp per quantization group (K's groups, then V's, of one row of one head): a token's rows are a few
dozen groups, so the group's loads must be spread over lanes, not made one after another. Its arithmetic is MLX's
`affine_quantize` kernel's (mlx/backend/cuda/quantized/affine_quantize.cu), operation for operation in
float32 with IEEE division: min and max of the group (max starting at 0, as MLX's), the scale from the
range, the edge that must be exact, the bias, then `min(round((w - bias) / scale), 2^bits - 1)` packed
little-end first into uint32 words (lane l packs word l: group sizes up to 32 words). Min and max are
exact whatever the order, so the warp's shuffle reduction gives MLX's numbers. `kv_pack.verified` checks that bitwise against the
installed `mx.quantize` before the kernel is used.

K and V are read through their strides (mlx-lm hands over transposed views): no copy.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import mlx.core as mx

THREADS = 256

_SOURCE = r"""
// one warp per group: lane l reads elements l, l + 32, ... for the min and max, then packs word l
const int64_t total = static_cast<int64_t>(k_shape[0]) * k_shape[1] * k_shape[2] * (GK + GV);
const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
const int lane = threadIdx.x % 32;
if (i >= total) return;
const int g = i % (GK + GV);
const int64_t row = i / (GK + GV);
const int n = row % k_shape[2], h = (row / k_shape[2]) % k_shape[1], b = row / (static_cast<int64_t>(k_shape[2]) * k_shape[1]);
const bool is_v = g >= GK;
const int gg = is_v ? g - GK : g;
const T* src = is_v ? v : k;
const int64_t s3 = is_v ? v_strides[3] : k_strides[3];
const int64_t base = is_v ? b * v_strides[0] + h * v_strides[1] + n * v_strides[2] + gg * GS * s3
                          : b * k_strides[0] + h * k_strides[1] + n * k_strides[2] + gg * GS * s3;
constexpr float eps = 1e-7f;
constexpr float n_bins = (1 << BITS) - 1;
constexpr int PER_WORD = 32 / BITS;
float w_min = 3.402823466e+38f, w_max = 0.f;
#pragma unroll
for (int e = lane; e < GS; e += 32) {
  const float x = static_cast<float>(src[base + e * s3]);
  w_min = fminf(w_min, x);
  w_max = fmaxf(w_max, x);
}
#pragma unroll
for (int off = 16; off > 0; off >>= 1) {  // min and max are exact in any order: the warp's are the group's
  w_min = fminf(w_min, __shfl_xor_sync(0xffffffffu, w_min, off));
  w_max = fmaxf(w_max, __shfl_xor_sync(0xffffffffu, w_max, off));
}
float scale = fmaxf(__fdiv_rn(__fsub_rn(w_max, w_min), n_bins), eps);
const bool side = fabsf(w_min) > fabsf(w_max);
scale = side ? scale : -scale;
const float edge = side ? w_min : w_max;
const float q0 = roundf(__fdiv_rn(edge, scale));
const bool at_zero = q0 == 0.0f;
scale = at_zero ? scale : __fdiv_rn(edge, q0);
const float bias = at_zero ? 0.f : edge;
if (lane == 0) {
  T* sb_row = sb + row * (2 * (GK + GV));
  const int sb_at = is_v ? 2 * GK + gg : gg;
  sb_row[sb_at] = static_cast<T>(scale);
  sb_row[sb_at + (is_v ? GV : GK)] = static_cast<T>(bias);
}
if (lane < GS / PER_WORD) {
  uint32_t* w_row = words + row * ((GK + GV) * GS * BITS / 32) + (is_v ? GK * GS * BITS / 32 : 0) + gg * GS * BITS / 32;
  uint32_t word = 0;
#pragma unroll
  for (int e = 0; e < PER_WORD; ++e) {
    const float x = static_cast<float>(src[base + (lane * PER_WORD + e) * s3]);
    const uint8_t val = fminf(roundf(__fdiv_rn(__fsub_rn(x, bias), scale)), n_bins);
    word |= static_cast<uint32_t>(val) << (BITS * e);
  }
  w_row[lane] = word;
}
"""

CUDA_TYPES = {mx.float16: "__half", mx.bfloat16: "__nv_bfloat16", mx.float32: "float"}


@lru_cache(maxsize=None)
def _kernel(dtype: mx.Dtype, bits: int, group_size: int, groups_k: int, groups_v: int) -> Any:
    constants = (f"using T = {CUDA_TYPES[dtype]};\nconstexpr int BITS = {bits}, GS = {group_size}, "
                 f"GK = {groups_k}, GV = {groups_v};\n")
    tag = f"{str(dtype).rsplit('.', 1)[-1]}_{bits}_{group_size}_{groups_k}_{groups_v}"
    return mx.fast.cuda_kernel(name=f"kv_pack_{tag}", input_names=["k", "v"], output_names=["words", "sb"],
                               source=constants + _SOURCE, ensure_row_contiguous=False)


def plan(B: int, H: int, n: int, dk: int, dv: int, dtype: mx.Dtype, group_size: int, bits: int) -> tuple:
    """The kernel and its launch arguments for one shape (kv_pack caches them per shape)."""
    gk, gv = dk // group_size, dv // group_size
    rows = B * H * n
    threads = -(-rows * (gk + gv) * 32 // THREADS) * THREADS  # a warp per group
    launch_args = dict(output_shapes=[(B, H, n, (dk + dv) * bits // 32), (B, H, n, 2 * (gk + gv))],
                       output_dtypes=[mx.uint32, dtype], grid=(threads, 1, 1), threadgroup=(THREADS, 1, 1))
    return _kernel(dtype, bits, group_size, gk, gv), launch_args


def launch(plan_: tuple, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
    kernel, launch_args = plan_
    words, sb = kernel(inputs=[keys, values], **launch_args)
    return words, sb
