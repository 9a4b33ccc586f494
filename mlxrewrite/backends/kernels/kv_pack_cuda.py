"""CUDA kernel for `kv_pack`: new K/V rows quantized as `mx.quantize` does, written as packed cache rows
(kv_layout.Row: the words, then the scales and biases as T, then zeros to the row's width).

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

from .kv_layout import Row

THREADS = 256

_SOURCE = r"""
// one warp per group: lane l reads elements l, l + 32, ... for the min and max, then packs word l
@COUNT@const int64_t total = static_cast<int64_t>(k_shape[0]) * k_shape[1] * k_shape[2] * (GK + GV);
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
constexpr int WORDS = (GK + GV) * GS * BITS / 32;  // K's and V's words; then the scales and biases as T
@ROW_POINTER@
if (lane == 0) {
  T* sb_row = reinterpret_cast<T*>(w_row + WORDS);
  const int sb_at = is_v ? 2 * GK + gg : gg;
  sb_row[sb_at] = static_cast<T>(scale);
  sb_row[sb_at + (is_v ? GV : GK)] = static_cast<T>(bias);
}
if (g == 0 && lane < PAD) w_row[WIDTH - PAD + lane] = 0u;  // the row's padding, so that rows are deterministic
if (lane < GS / PER_WORD) {
  w_row += (is_v ? GK * GS * BITS / 32 : 0) + gg * GS * BITS / 32;
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

# Where a group's row goes: its own output (`rows`, contiguous), or, in place, row `at + n` of the cache's buffer
# `kv` (which the launch takes as an input and writes through its strides), the launch's one output being the
# row count after it (`count`, from the count before it, `at`)
_ROWS_OUT = "uint32_t* w_row = rows + row * WIDTH;"
_ROWS_IN_PLACE = ("uint32_t* w_row = const_cast<uint32_t*>(kv) + b * kv_strides[0] + h * kv_strides[1] + "
                  "(static_cast<int64_t>(at[0]) + n) * kv_strides[2];")
_COUNT = ("if (blockIdx.x == 0 && threadIdx.x == 0) count[0] = at[0] + k_shape[2];\n"
          "if (at[0] + k_shape[2] > kv_shape[2]) return;  // the caller grows the buffer first: never written past\n")
_NAMES = {False: (["k", "v"], ["rows"]), True: (["k", "v", "kv", "at"], ["count"])}

CUDA_TYPES = {mx.float16: "__half", mx.bfloat16: "__nv_bfloat16", mx.float32: "float"}


@lru_cache(maxsize=None)
def _kernel(dtype: mx.Dtype, bits: int, group_size: int, row: Row, in_place: bool = False) -> Any:
    constants = (f"using T = {CUDA_TYPES[dtype]};\nconstexpr int BITS = {bits}, GS = {group_size}, "
                 f"GK = {row.k_groups}, GV = {row.v_groups}, WIDTH = {row.width}, PAD = {row.pad};\n")
    tag = f"{row.dtype_name}_{bits}_{group_size}_{row.k_groups}_{row.v_groups}_{row.width}"
    source = _SOURCE.replace("@COUNT@", _COUNT if in_place else "").replace(
        "@ROW_POINTER@", _ROWS_IN_PLACE if in_place else _ROWS_OUT)
    inputs, outputs = _NAMES[in_place]
    return mx.fast.cuda_kernel(name=f"kv_pack{'_in_place' if in_place else ''}_{tag}", input_names=inputs,
                               output_names=outputs, source=constants + source, ensure_row_contiguous=False)


def plan(B: int, H: int, n: int, dk: int, dv: int, dtype: mx.Dtype, group_size: int, bits: int,
         in_place: bool = False) -> tuple:
    """The kernel and its launch arguments for one shape (kv_pack caches them per shape)."""
    row = Row.of(dk, dv, group_size, bits, dtype)
    threads = -(-B * H * n * (row.k_groups + row.v_groups) * 32 // THREADS) * THREADS  # a warp per group
    output = ((), mx.int32) if in_place else ((B, H, n, row.width), mx.uint32)
    launch_args = dict(output_shapes=[output[0]], output_dtypes=[output[1]], grid=(threads, 1, 1),
                       threadgroup=(THREADS, 1, 1))
    return _kernel(dtype, bits, group_size, row, in_place), launch_args


def launch(plan_: tuple, keys: mx.array, values: mx.array) -> mx.array:
    """The packed rows (kv_layout.Row) of keys and values (B, H, n, D)."""
    kernel, launch_args = plan_
    return kernel(inputs=[keys, values], **launch_args)[0]


def launch_in_place(plan_: tuple, keys: mx.array, values: mx.array, kv: mx.array, at: mx.array) -> mx.array:
    """Rows `at` .. `at` + n of the buffer `kv` (B, H, capacity, width) written in place (plan(in_place=True));
    returns the row count after them (int32, 0-d), the one array that orders the write before its readers."""
    kernel, launch_args = plan_
    return kernel(inputs=[keys, values, kv, at], **launch_args)[0]
