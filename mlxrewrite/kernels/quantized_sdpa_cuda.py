"""CUDA flash-decoding kernels for quantized-KV attention, run through `mx.fast.cuda_kernel`.

Two launches. `split`: one block per (chunk of N, kv head, row group, batch) streams its packed K/V tiles
from HBM once (16-byte loads, the next tile's loads in flight while the current one is computed) and serves
every query row of that kv head in the block; it writes float32 (max, sum, unnormalised output) per row and
chunk. `combine`: one block per query row merges the chunks in a fixed order and adds the sinks.

M-invariance: a block holds the rows of `MB` query positions x all `n_rep` heads, with `MB` fixed by n_rep
alone, and the chunk size depends on N alone, so every instruction that touches a row's numbers is the same
whatever M is (explicit fmaf everywhere, fixed reduction trees). A row decoded alone and the same row inside
a verification pass of M = 2..16 give bitwise equal outputs.

K/V arrive as strided views of mlx-lm's cache buffer (`ensure_row_contiguous=False`); only their last axis
must be contiguous, which the kernel checks (a violation writes NaN rather than a wrong number).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Sequence

import mlx.core as mx

THREADS = 256
ROWS_PER_BLOCK = 16  # n_rep * MB <= this: bounds the per-thread accumulators at 32 floats
_V_REGION = 8192  # floats: one tile of dequantized V, reused for the end-of-chunk reduction

HEADER = r"""
namespace qsdpa {

using Shape = mlx::core::cu::Shape;
using Strides = mlx::core::cu::Strides;

constexpr int THREADS = 256;
constexpr float NEG_INF = -cuda::std::numeric_limits<float>::infinity();

template <int D> struct Geo {
  static constexpr int NPART = D / 32;                    // 32-element parts of a row
  static constexpr int NPP = NPART <= 1 ? 1 : NPART <= 2 ? 2 : NPART <= 4 ? 4 : 8;  // lanes per key
  static constexpr int TK = THREADS / NPP;                // keys per tile
  static constexpr int QROW = 32 * NPP;                   // floats of one query row in shared memory
};

template <int D, int RB> struct PVGeo {
  static constexpr int RS = (RB + 7) / 8;                 // row subgroups
  static constexpr int RPT = (RB + RS - 1) / RS;          // rows per thread (<= 8)
  static constexpr int NDG = D / 4;                       // float4 column groups
  static constexpr int KS = THREADS / (NDG * RS);         // key subsets (fixed per D and RB, never per M)
  static constexpr int ACTIVE = KS * RS * NDG;
};

template <typename T> __device__ __forceinline__ float to_f(T x) { return static_cast<float>(x); }

// 32 packed elements of one row part: BITS words (16 or 32 bytes).
template <int BITS> struct Raw { uint4 w[BITS / 4]; };

template <int BITS>
__device__ __forceinline__ void load_raw(const uint32_t* row, int part, Raw<BITS>& r) {
  const uint4* src = reinterpret_cast<const uint4*>(row + part * BITS);
#pragma unroll
  for (int i = 0; i < BITS / 4; ++i) r.w[i] = __ldg(src + i);
}

template <int BITS>
__device__ __forceinline__ void dequant(const Raw<BITS>& r, float s, float b, float (&out)[32]) {
  constexpr int PER = 32 / BITS;             // elements per word
  constexpr uint32_t MASKV = (1u << BITS) - 1u;
#pragma unroll
  for (int i = 0; i < BITS / 4; ++i) {
    const uint32_t w4[4] = {r.w[i].x, r.w[i].y, r.w[i].z, r.w[i].w};
#pragma unroll
    for (int k = 0; k < 4; ++k)
#pragma unroll
      for (int e = 0; e < PER; ++e)
        out[(i * 4 + k) * PER + e] = fmaf(static_cast<float>((w4[k] >> (BITS * e)) & MASKV), s, b);
  }
}

__device__ __forceinline__ int64_t bidx(const Shape& sh, const Strides& st, int i, int d) {
  return sh[d] == 1 ? 0 : static_cast<int64_t>(i) * st[d];
}

// MASK: 0 none, 1 bool (false -> fill), 2 additive, 3 causal (key n allowed iff n <= N - M + m).
template <typename T, typename MT, int D, int BITS, int GS, int NREP, int MB, int MASK>
__device__ void split(
    const T* q, const Shape& q_shape, const Strides& q_st,
    const uint32_t* kw, const Shape& kw_shape, const Strides& kw_st,
    const T* ks, const Strides& ks_st, const T* kb, const Strides& kb_st,
    const uint32_t* vw, const Strides& vw_st,
    const T* vs, const Strides& vs_st, const T* vb, const Strides& vb_st,
    const MT* mask, const Shape& m_shape, const Strides& m_st,
    const float* params, float* po, float* pml) {
  using G = Geo<D>;
  constexpr int RB = NREP * MB;
  using P = PVGeo<D, RB>;
  constexpr int TK = G::TK, NPP = G::NPP, NPART = G::NPART;

  extern __shared__ float4 smem4[];
  float* vsm = reinterpret_cast<float*>(smem4);           // [TK][D], later [KS][RB][D]
  float* qsm = vsm + 8192;                                 // [RB][8][NPP][4]
  float* ssm = qsm + RB * G::QROW;                         // [RB][TK]
  float* m_sm = ssm + RB * TK;
  float* l_sm = m_sm + RB;
  float* a_sm = l_sm + RB;
  int64_t* mrow = reinterpret_cast<int64_t*>(a_sm + RB + (RB & 1));  // [RB] mask row offsets

  const int tid = threadIdx.x;
  const int Hq = q_shape[1], M = q_shape[2];
  const int Hkv = kw_shape[1], N = kw_shape[2];
  const int nrg = (M + MB - 1) / MB;
  const int c = blockIdx.x / nrg, rg = blockIdx.x % nrg;
  const int nc = gridDim.x / nrg;
  const int kvh = blockIdx.y, b = blockIdx.z;
  const float scale = params[0], fill = params[1];
  const int chunk = static_cast<int>(params[2]);
  const int n0 = c * chunk, n1 = min(N, n0 + chunk);
  const bool bad = kw_st[3] != 1 || vw_st[3] != 1 || ks_st[3] != 1 || kb_st[3] != 1 || vs_st[3] != 1 ||
                   vb_st[3] != 1 || q_st[3] != 1;

  // rows: r = rep * MB + mm -> query head kvh * NREP + rep, position rg * MB + mm
  auto row_pos = [&](int r) { return rg * MB + r % MB; };
  auto row_head = [&](int r) { return kvh * NREP + r / MB; };

  for (int i = tid; i < RB * G::QROW; i += THREADS) {
    const int r = i / G::QROW, rem = i % G::QROW;
    const int i4 = rem / (NPP * 4), p = (rem / 4) % NPP, e = rem % 4;
    const int d = p * 32 + i4 * 4 + e, m = row_pos(r);
    float x = 0.f;
    if (p < NPART && m < M)
      x = to_f(q[b * q_st[0] + row_head(r) * q_st[1] + static_cast<int64_t>(m) * q_st[2] + d]) * scale;
    qsm[i] = x;
  }
  if (tid < RB) {
    m_sm[tid] = NEG_INF; l_sm[tid] = 0.f; a_sm[tid] = 0.f;
    if constexpr (MASK == 1 || MASK == 2) {
      mrow[tid] = bidx(m_shape, m_st, b, 0) + bidx(m_shape, m_st, row_head(tid), 1) +
                  bidx(m_shape, m_st, min(row_pos(tid), M - 1), 2);
    }
  }

  // this thread's load slot: key j of the tile, part p
  const int j = tid / NPP, p = tid % NPP;
  const int g = (p * 32) / GS;
  const int64_t kbase = b * kw_st[0] + kvh * kw_st[1];
  const int64_t vbase = b * vw_st[0] + kvh * vw_st[1];
  Raw<BITS> kr, vr;
  float ksc = 0.f, kbi = 0.f, vsc = 0.f, vbi = 0.f;
  auto fetch = [&](int t0) {
    const int n = t0 + j;
    if (p < NPART && n < n1) {
      load_raw<BITS>(kw + kbase + n * kw_st[2], p, kr);
      load_raw<BITS>(vw + vbase + n * vw_st[2], p, vr);
      ksc = to_f(ks[b * ks_st[0] + kvh * ks_st[1] + n * ks_st[2] + g]);
      kbi = to_f(kb[b * kb_st[0] + kvh * kb_st[1] + n * kb_st[2] + g]);
      vsc = to_f(vs[b * vs_st[0] + kvh * vs_st[1] + n * vs_st[2] + g]);
      vbi = to_f(vb[b * vb_st[0] + kvh * vb_st[1] + n * vb_st[2] + g]);
    }
  };
  if (n0 < n1) fetch(n0);

  // PV slot
  const bool pv_on = tid < P::ACTIVE;
  const int pks = tid / (P::RS * P::NDG), prs = (tid / P::NDG) % P::RS, pdg = tid % P::NDG;
  float acc[P::RPT][4];
#pragma unroll
  for (int i = 0; i < P::RPT; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[i][e] = 0.f;

  const int nvalid = min(MB, M - rg * MB);  // positions of this row group that exist
  auto rvalid = [&](int r) { return r < RB && (r % MB) < nvalid; };

  for (int t0 = n0; t0 < n1; t0 += TK) {
    __syncthreads();  // previous tile's PV is done with vsm / ssm
    const int n = t0 + j;
    const bool kv_ok = p < NPART && n < n1;
    if (p < NPART) {  // V goes to shared memory (shared by all rows), K stays in registers
      float vf[32];
      if (kv_ok) {
        dequant<BITS>(vr, vsc, vbi, vf);
      } else {
#pragma unroll
        for (int e = 0; e < 32; ++e) vf[e] = 0.f;
      }
      float4* dst = reinterpret_cast<float4*>(vsm + j * D + p * 32);
#pragma unroll
      for (int e = 0; e < 8; ++e) dst[e] = make_float4(vf[4 * e], vf[4 * e + 1], vf[4 * e + 2], vf[4 * e + 3]);
    }
    float kf[32];
    if (kv_ok) {
      dequant<BITS>(kr, ksc, kbi, kf);
    } else {
#pragma unroll
      for (int e = 0; e < 32; ++e) kf[e] = 0.f;
    }
    if (t0 + TK < n1) fetch(t0 + TK);  // next tile's loads fly while this one is computed

    const float4* q4 = reinterpret_cast<const float4*>(qsm);
#pragma unroll 1
    for (int r = 0; r < RB; ++r) {
      if (!rvalid(r)) continue;  // uniform over the block
      float s = 0.f;
#pragma unroll
      for (int i4 = 0; i4 < 8; ++i4) {
        const float4 qv = q4[(r * 8 + i4) * NPP + p];
        s = fmaf(qv.x, kf[4 * i4], s);
        s = fmaf(qv.y, kf[4 * i4 + 1], s);
        s = fmaf(qv.z, kf[4 * i4 + 2], s);
        s = fmaf(qv.w, kf[4 * i4 + 3], s);
      }
#pragma unroll
      for (int off = 1; off < NPP; off <<= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
      if (p == 0) {
        if (n >= n1) {
          s = NEG_INF;
        } else if constexpr (MASK == 1) {
          if (!mask[mrow[r] + bidx(m_shape, m_st, n, 3)]) s = fill;
        } else if constexpr (MASK == 2) {
          s += to_f(mask[mrow[r] + bidx(m_shape, m_st, n, 3)]);
        } else if constexpr (MASK == 3) {
          if (n > N - M + row_pos(r)) s = fill;
        }
        ssm[r * TK + j] = s;
      }
    }
    __syncthreads();

    // online softmax: one warp per row, fixed reduction tree
    const int warp = tid / 32, lane = tid % 32;
    for (int r = warp; r < RB; r += THREADS / 32) {
      if (!rvalid(r)) continue;
      constexpr int PL = TK / 32;
      float sv[PL], tmax = NEG_INF;
#pragma unroll
      for (int k = 0; k < PL; ++k) { sv[k] = ssm[r * TK + lane + 32 * k]; tmax = fmaxf(tmax, sv[k]); }
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, off));
      const float mold = m_sm[r], mnew = fmaxf(mold, tmax);
      float alpha = 1.f, psum = 0.f;
      if (mnew != NEG_INF) {
        alpha = expf(mold - mnew);
#pragma unroll
        for (int k = 0; k < PL; ++k) { const float e = expf(sv[k] - mnew); ssm[r * TK + lane + 32 * k] = e; psum += e; }
      } else {
#pragma unroll
        for (int k = 0; k < PL; ++k) ssm[r * TK + lane + 32 * k] = 0.f;
      }
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) psum += __shfl_xor_sync(0xffffffffu, psum, off);
      __syncwarp();
      if (lane == 0) { m_sm[r] = mnew; l_sm[r] = fmaf(l_sm[r], alpha, psum); a_sm[r] = alpha; }
    }
    __syncthreads();

    if (pv_on) {
#pragma unroll
      for (int i = 0; i < P::RPT; ++i) {
        const int r = prs + i * P::RS;
        const float a = rvalid(r) ? a_sm[r] : 0.f;
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][e] *= a;
      }
      const float4* v4 = reinterpret_cast<const float4*>(vsm);
      for (int jj = pks; jj < TK; jj += P::KS) {
        const float4 v = v4[jj * P::NDG + pdg];
#pragma unroll
        for (int i = 0; i < P::RPT; ++i) {
          const int r = prs + i * P::RS;
          if (rvalid(r)) {
            const float pj = ssm[r * TK + jj];
            acc[i][0] = fmaf(pj, v.x, acc[i][0]);
            acc[i][1] = fmaf(pj, v.y, acc[i][1]);
            acc[i][2] = fmaf(pj, v.z, acc[i][2]);
            acc[i][3] = fmaf(pj, v.w, acc[i][3]);
          }
        }
      }
    }
  }

  // reduce the key subsets in a fixed order, then write this chunk's partials
  __syncthreads();
  if (pv_on) {
#pragma unroll
    for (int i = 0; i < P::RPT; ++i) {
      const int r = prs + i * P::RS;
      if (r < RB)
        reinterpret_cast<float4*>(vsm)[(pks * RB + r) * P::NDG + pdg] =
            make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
    }
  }
  __syncthreads();
  for (int i = tid; i < RB * D; i += THREADS) {
    const int r = i / D, d = i % D;
    if (!rvalid(r)) continue;
    float o = 0.f;
    for (int k = 0; k < P::KS; ++k) o += vsm[(k * RB + r) * D + d];
    const int64_t row = (static_cast<int64_t>(b) * Hq + row_head(r)) * M + row_pos(r);
    po[(row * nc + c) * D + d] = bad ? __int_as_float(0x7fc00000) : o;
  }
  if (tid < RB && rvalid(tid)) {
    const int64_t row = (static_cast<int64_t>(b) * Hq + row_head(tid)) * M + row_pos(tid);
    pml[(row * nc + c) * 2] = m_sm[tid];
    pml[(row * nc + c) * 2 + 1] = l_sm[tid];
  }
}

// One block per query row (b, h, m); thread d. Chunks merged in index order.
template <typename T, typename ST, int D, bool SINKS>
__device__ void combine(const float* po, const Shape& po_shape, const float* pml, const ST* sinks, T* out) {
  const int Hq = po_shape[1], M = po_shape[2], nc = po_shape[3];
  const int64_t row = blockIdx.x;
  const int d = threadIdx.x;
  const float* ml = pml + row * nc * 2;
  float mx = NEG_INF;
  for (int c = 0; c < nc; ++c) mx = fmaxf(mx, ml[2 * c]);
  float sink = NEG_INF;
  if constexpr (SINKS) { sink = to_f(sinks[(row / M) % Hq]); mx = fmaxf(mx, sink); }
  float l = 0.f, o = 0.f;
  const float* pr = po + row * nc * D + d;
  for (int c = 0; c < nc; ++c) {
    const float w = expf(ml[2 * c] - mx);
    l = fmaf(w, ml[2 * c + 1], l);
    o = fmaf(w, pr[c * D], o);
  }
  if constexpr (SINKS) l += expf(sink - mx);
  out[row * D + d] = static_cast<T>(o / l);
}

}  // namespace qsdpa
"""

_KV_ARGS = "kw, kw_shape, kw_strides, ks, ks_strides, kb, kb_strides, vw, vw_strides, vs, vs_strides, vb, vb_strides"
_SPLIT_CALL = "qsdpa::split<T, MT, D, BITS, GS, NREP, MB, MASK>(q, q_shape, q_strides, " + _KV_ARGS + ", {mask}, params, po, pml);"
_ARRAY_MASK = "mask, mask_shape, mask_strides"
_NO_MASK = "static_cast<const MT*>(nullptr), q_shape, q_strides"  # unused when MASK is 0 or 3
_KV_NAMES = ["kw", "ks", "kb", "vw", "vs", "vb"]

MASK_NONE, MASK_BOOL, MASK_ADD, MASK_CAUSAL = 0, 1, 2, 3


@lru_cache(maxsize=None)
def _split_kernel(array_mask: bool, shared_memory: int) -> Any:
    """One kernel object per (mask input present, dynamic shared memory size): built on first CUDA use."""
    names = ["q"] + _KV_NAMES + (["mask"] if array_mask else []) + ["params"]
    return mx.fast.cuda_kernel(
        name="qsdpa_split", input_names=names, output_names=["po", "pml"],
        source=_SPLIT_CALL.format(mask=_ARRAY_MASK if array_mask else _NO_MASK),
        header=HEADER, ensure_row_contiguous=False, shared_memory=shared_memory)


@lru_cache(maxsize=None)
def _combine_kernel(sinks: bool) -> Any:
    names = ["po", "pml"] + (["sinks"] if sinks else [])
    arg = "sinks" if sinks else "static_cast<const ST*>(nullptr)"
    return mx.fast.cuda_kernel(
        name="qsdpa_combine", input_names=names, output_names=["out"],
        source=f"qsdpa::combine<T, ST, D, SINKS>(po, po_shape, pml, {arg}, out);",
        header=HEADER, ensure_row_contiguous=False)


def geometry(D: int, n_rep: int) -> tuple[int, int]:
    """(keys per tile, query positions per block) for a head dim and GQA factor; MB never depends on M."""
    nparts = D // 32
    npp = 1 if nparts <= 1 else 2 if nparts <= 2 else 4 if nparts <= 4 else 8
    return THREADS // npp, max(1, ROWS_PER_BLOCK // n_rep)


def shared_bytes(D: int, n_rep: int) -> int:
    tk, mb = geometry(D, n_rep)
    rb = n_rep * mb
    npp = THREADS // tk
    floats = _V_REGION + rb * 32 * npp + rb * tk + 3 * rb + (rb & 1)
    return 4 * floats + 8 * rb


@lru_cache(maxsize=4096)
def plan(B: int, Hq: int, Hkv: int, M: int, D: int, N: int, chunk: int, bits: int, group_size: int,
         dtype: mx.Dtype, mask_kind: int, mask_dtype: mx.Dtype | None, sinks_dtype: mx.Dtype | None) -> tuple:
    """Everything about a launch that depends only on shapes and dtypes, computed once per shape."""
    n_rep = Hq // Hkv
    _, mb = geometry(D, n_rep)
    nc = -(-N // chunk)
    nrg = -(-M // mb)
    split = dict(
        output_shapes=[(B, Hq, M, nc, D), (B, Hq, M, nc, 2)], output_dtypes=[mx.float32, mx.float32],
        grid=(nrg * nc * THREADS, Hkv, B), threadgroup=(THREADS, 1, 1),
        template=[("T", dtype), ("MT", mask_dtype or dtype), ("D", D), ("BITS", bits), ("GS", group_size),
                  ("NREP", n_rep), ("MB", mb), ("MASK", mask_kind)])
    combine = dict(
        output_shapes=[(B, Hq, M, D)], output_dtypes=[dtype], grid=(B * Hq * M * D, 1, 1), threadgroup=(D, 1, 1),
        template=[("T", dtype), ("ST", sinks_dtype or dtype), ("D", D), ("SINKS", sinks_dtype is not None)])
    k_split = _split_kernel(mask_kind in (MASK_BOOL, MASK_ADD), shared_bytes(D, n_rep))
    k_combine = _combine_kernel(sinks_dtype is not None)
    return k_split, split, k_combine, combine


def launch(plan_: tuple, q: mx.array, k: Sequence[mx.array], v: Sequence[mx.array], mask: mx.array | None,
           params: mx.array, sinks: mx.array | None) -> mx.array:
    """Two launches; K/V, q and mask are passed as the views they are (no copies)."""
    k_split, split, k_combine, combine = plan_
    inputs = [q, *k, *v] + ([mask] if mask is not None else []) + [params]
    po, pml = k_split(inputs=inputs, **split)
    return k_combine(inputs=[po, pml] + ([sinks] if sinks is not None else []), **combine)[0]
