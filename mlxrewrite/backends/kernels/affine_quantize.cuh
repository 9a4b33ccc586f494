// One group of MLX's affine quantization, as `mx.quantize` computes it (kv_pack_cuda.py's docstring says how
// it was matched): by one thread (`group`, the packed cache's row kernel kv_pack) or by a warp (`group_warp`,
// the fused attention kernel's new rows). Both run the same arithmetic; min and max are exact in any order.
namespace affine_quantize {

// The group's scale and bias from its min and max (max taken from 0, as MLX's).
__device__ __forceinline__ void scale_bias(float w_min, float w_max, float n_bins, float& scale, float& bias) {
  constexpr float eps = 1e-7f;
  scale = fmaxf(__fdiv_rn(__fsub_rn(w_max, w_min), n_bins), eps);
  const bool side = fabsf(w_min) > fabsf(w_max);
  scale = side ? scale : -scale;
  const float edge = side ? w_min : w_max;
  const float q0 = roundf(__fdiv_rn(edge, scale));
  const bool at_zero = q0 == 0.0f;
  scale = at_zero ? scale : __fdiv_rn(edge, q0);
  bias = at_zero ? 0.f : edge;
}

// Word `wi` of the group: its 32 / BITS elements packed little-end first.
template <typename T, int BITS>
__device__ __forceinline__ uint32_t word(const T* src, int64_t s3, int wi, float scale, float bias) {
  constexpr float n_bins = (1 << BITS) - 1;
  constexpr int PER_WORD = 32 / BITS;
  uint32_t w = 0;
  for (int e = 0; e < PER_WORD; ++e) {
    const float x = static_cast<float>(src[(wi * PER_WORD + e) * s3]);
    const uint8_t val = fminf(roundf(__fdiv_rn(__fsub_rn(x, bias), scale)), n_bins);
    w |= static_cast<uint32_t>(val) << (BITS * e);
  }
  return w;
}

// The GS elements src[0], src[s3], ... as BITS-bit integers in GS * BITS / 32 words at `words`, their scale
// and bias at `scale_out` and `bias_out`.
template <typename T, int BITS, int GS, typename W, typename S>
__device__ __forceinline__ void group(const T* src, int64_t s3, W* words, S* scale_out, S* bias_out) {
  float w_min = 3.402823466e+38f, w_max = 0.f;
  for (int e = 0; e < GS; ++e) {
    const float x = static_cast<float>(src[e * s3]);
    w_min = fminf(w_min, x);
    w_max = fmaxf(w_max, x);
  }
  float scale, bias;
  scale_bias(w_min, w_max, (1 << BITS) - 1, scale, bias);
  *scale_out = static_cast<T>(scale);
  *bias_out = static_cast<T>(bias);
  for (int wi = 0; wi < GS * BITS / 32; ++wi) words[wi] = word<T, BITS>(src, s3, wi, scale, bias);
}

// `group` by the 32 lanes of a warp (all of them call it): lane l takes elements l, l + 32, ... for the min
// and max, then word l.
template <typename T, int BITS, int GS, typename W, typename S>
__device__ __forceinline__ void group_warp(const T* src, int64_t s3, W* words, S* scale_out, S* bias_out, int lane) {
  float w_min = 3.402823466e+38f, w_max = 0.f;
  for (int e = lane; e < GS; e += 32) {
    const float x = static_cast<float>(src[e * s3]);
    w_min = fminf(w_min, x);
    w_max = fmaxf(w_max, x);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    w_min = fminf(w_min, __shfl_xor_sync(0xffffffffu, w_min, off));
    w_max = fmaxf(w_max, __shfl_xor_sync(0xffffffffu, w_max, off));
  }
  float scale, bias;
  scale_bias(w_min, w_max, (1 << BITS) - 1, scale, bias);
  if (lane == 0) {
    *scale_out = static_cast<T>(scale);
    *bias_out = static_cast<T>(bias);
  }
  if (lane < GS * BITS / 32) words[lane] = word<T, BITS>(src, s3, lane, scale, bias);
}

}  // namespace affine_quantize
