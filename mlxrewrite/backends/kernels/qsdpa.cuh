// The fused quantized-KV attention kernel (quantized_sdpa_cuda.py launches it; read that module's docstring).
namespace qsdpa {

using Shape = mlx::core::cu::Shape;
using Strides = mlx::core::cu::Strides;

constexpr int THREADS = 256;
constexpr float NEG_INF = -cuda::std::numeric_limits<float>::infinity();
constexpr float MAGIC = 8388608.f;  // 2^23: 0x4B000000 | u is the float 2^23 + u for u < 2^23
constexpr int CHAIN_SLOTS = 16;  // counters per (batch, kv head) of a chained launch: one per row group

template <int D> struct Geo {
  static constexpr int NPART = D / 32;                    // 32-element parts of a row
  static constexpr int NPP = NPART <= 1 ? 1 : NPART <= 2 ? 2 : NPART <= 4 ? 4 : 8;  // lanes per key
  static constexpr int TK = THREADS / NPP;                // keys per tile
  static constexpr int QROW = 32 * NPP;                   // floats of one query row in shared memory
  static constexpr int VROW = 36 * NPART;                 // floats of one V row: parts padded to 36 (banks)
};

// P.V: thread (ks, dg) owns DPT columns of every row over KPT consecutive keys of each tile. All of it
// depends on D and RBMAX (n_rep), never on M, so a row's summation order is the same whatever M is.
template <int D, int RBMAX> struct PVGeo {
  static constexpr int KPT = RBMAX <= 8 ? 8 : 16;
  static constexpr int DPT = RBMAX <= 8 ? 4 : 2;
  static constexpr int KS = Geo<D>::TK / KPT;
  static constexpr int NDG = D / DPT;
  static constexpr int ACTIVE = KS * NDG;
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

// The 32 quantized integers as exact floats: one PRMT/LOP3 and one FADD each.
template <int BITS>
__device__ __forceinline__ void unpack(const Raw<BITS>& r, float (&out)[32]) {
#pragma unroll
  for (int i = 0; i < BITS / 4; ++i) {
    const uint32_t w4[4] = {r.w[i].x, r.w[i].y, r.w[i].z, r.w[i].w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if constexpr (BITS == 8) {
#pragma unroll
        for (int e = 0; e < 4; ++e)
          out[(i * 4 + k) * 4 + e] = __int_as_float(__byte_perm(w4[k], 0x4B000000u, 0x7540 + e)) - MAGIC;
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e)
          out[(i * 4 + k) * 8 + e] = __int_as_float(((w4[k] >> (4 * e)) & 0xFu) | 0x4B000000u) - MAGIC;
      }
    }
  }
}

__device__ __forceinline__ int64_t bidx(const Shape& sh, const Strides& st, int i, int d) {
  return sh[d] == 1 ? 0 : static_cast<int64_t>(i) * st[d];
}

// MASK: 0 none, 1 bool (false -> fill), 2 additive, 3 causal (key n allowed iff n <= N - M + m).
// Rows of a block: r = mm * NREP + rep for MBE query positions (MBE = min(M, MBMAX)), all n_rep heads.
template <typename T, typename MT, typename ST, int D, int BITS, int GS, int NREP, int MBMAX, int MBE, int MASK,
          bool SINKS>
__device__ void split(
    const T* q, const Shape& q_shape, const Strides& q_st, const int N,
    const uint32_t* kw, const Strides& kw_st,
    const T* ks, const Strides& ks_st, const T* kb, const Strides& kb_st,
    const uint32_t* vw, const Strides& vw_st,
    const T* vs, const Strides& vs_st, const T* vb, const Strides& vb_st,
    const MT* mask, const Shape& m_shape, const Strides& m_st, const ST* sinks,
    const float* params, T* out, float* work, int* done = nullptr, int* next = nullptr) {
  using G = Geo<D>;
  constexpr int RB = NREP * MBE;
  using P = PVGeo<D, NREP * MBMAX>;
  constexpr int TK = G::TK, NPP = G::NPP, NPART = G::NPART;

  extern __shared__ float4 smem4[];
  float* vsm = reinterpret_cast<float*>(smem4);           // [TK][VROW] dequantized V, later [KS][RB][D]
  float* qsm = vsm + 9216;                                 // [RB][8][NPP][4] scaled q
  float* ssm = qsm + RB * G::QROW;                         // [RB][TK] scores, then probabilities
  float* qsum = ssm + RB * TK;                             // [RB][NPP] sum of q over each part
  float* m_sm = qsum + RB * NPP;
  float* l_sm = m_sm + RB;
  float* a_sm = l_sm + RB;
  int64_t* mrow = reinterpret_cast<int64_t*>(a_sm + RB + (RB & 1));  // [RB] mask row offsets

  const int tid = threadIdx.x;
  const int Hq = q_shape[1], M = q_shape[2];
  const int nrg = (M + MBE - 1) / MBE;
  const int c = blockIdx.x / nrg, rg = blockIdx.x % nrg;
  const int nc = gridDim.x / nrg;
  const int kvh = blockIdx.y, b = blockIdx.z;
  // work: per row and chunk (max, sum), then the unnormalised outputs (all written before they are read),
  // then the row groups' counters, zeroed by MLX -- or, chained (`done` given), the counters are the previous
  // launch's `next`, zeroed by it, and this launch zeroes its own `next` for the one after it
  const int64_t rows_nc = static_cast<int64_t>(q_shape[0]) * Hq * M * nc;
  float* pml = work;
  float* po = work + 2 * rows_nc;
  const int slots = done ? CHAIN_SLOTS : nrg;
  if (!done) done = reinterpret_cast<int*>(po + rows_nc * D);
  if (next && c == 0 && rg == 0 && tid < CHAIN_SLOTS) next[(b * gridDim.y + kvh) * CHAIN_SLOTS + tid] = 0;
  const float scale = to_f(static_cast<T>(params[0])), fill = params[1];  // the scale in T, as mlx-lm's
  const int chunk = static_cast<int>(params[2]);
  const int n0 = c * chunk, n1 = min(N, n0 + chunk);
  const bool bad = kw_st[3] != 1 || vw_st[3] != 1 || ks_st[3] != 1 || kb_st[3] != 1 || vs_st[3] != 1 ||
                   vb_st[3] != 1 || q_st[3] != 1;
  const int rv = min(MBE, M - rg * MBE) * NREP;           // rows of this block that exist
  auto row_pos = [&](int r) { return rg * MBE + r / NREP; };
  auto row_head = [&](int r) { return kvh * NREP + r % NREP; };

  for (int i = tid; i < RB * G::QROW; i += THREADS) {
    const int r = i / G::QROW, rem = i % G::QROW;
    const int i4 = rem / (NPP * 4), p = (rem / 4) % NPP, e = rem % 4;
    float x = 0.f;
    if (p < NPART && r < rv)
      x = to_f(static_cast<T>(to_f(q[b * q_st[0] + row_head(r) * q_st[1] + static_cast<int64_t>(row_pos(r)) * q_st[2] +
                                   p * 32 + i4 * 4 + e]) * scale));  // exact product, rounded once in T
    qsm[i] = x;
  }
  __syncthreads();
  if (tid < RB * NPP) {
    const int r = tid / NPP, p = tid % NPP;
    float t = 0.f;
    for (int i = 0; i < 32; ++i) t += qsm[r * G::QROW + ((i / 4) * NPP + p) * 4 + i % 4];
    qsum[tid] = t;
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
  const int pks = tid / P::NDG, pdg = tid % P::NDG;
  float acc[RB][P::DPT];
#pragma unroll
  for (int i = 0; i < RB; ++i)
#pragma unroll
    for (int e = 0; e < P::DPT; ++e) acc[i][e] = 0.f;

  for (int t0 = n0; t0 < n1; t0 += TK) {
    __syncthreads();  // previous tile's PV is done with vsm / ssm
    const int n = t0 + j;
    const bool kv_ok = p < NPART && n < n1;
    float kf[32];
    if (p < NPART) {  // V goes to shared memory (shared by all rows), K stays in registers
      float4* dst = reinterpret_cast<float4*>(vsm + j * G::VROW + p * 36);
      if (kv_ok) {
        unpack<BITS>(vr, kf);
#pragma unroll
        for (int e = 0; e < 8; ++e)
          dst[e] = make_float4(fmaf(kf[4 * e], vsc, vbi), fmaf(kf[4 * e + 1], vsc, vbi),
                               fmaf(kf[4 * e + 2], vsc, vbi), fmaf(kf[4 * e + 3], vsc, vbi));
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) dst[e] = make_float4(0.f, 0.f, 0.f, 0.f);
      }
    }
    if (kv_ok) {
      unpack<BITS>(kr, kf);
    } else {
#pragma unroll
      for (int e = 0; e < 32; ++e) kf[e] = 0.f;
    }
    const float kscale = ksc, kbias = kbi;
    if (t0 + TK < n1) fetch(t0 + TK);  // next tile's loads fly while this one is computed

    // scores: q . (s w + b) = s (q . w) + b sum(q), per 32-element part, then a fixed shuffle tree.
    // Two rows per pass: two independent FMA chains, each row's own sequence unchanged.
    const float4* q4 = reinterpret_cast<const float4*>(qsm);
    auto emit = [&](int r, float s) {
      s = fmaf(kbias, qsum[r * NPP + p], s * kscale);
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
    };
#pragma unroll 1
    for (int r = 0; r < rv; r += 2) {  // rv is uniform over the block
      const int r1 = r + 1 < rv ? r + 1 : r;
      float s0 = 0.f, s1 = 0.f;
#pragma unroll
      for (int i4 = 0; i4 < 8; ++i4) {
        const float4 qa = q4[(r * 8 + i4) * NPP + p], qb = q4[(r1 * 8 + i4) * NPP + p];
        s0 = fmaf(qa.x, kf[4 * i4], s0);
        s1 = fmaf(qb.x, kf[4 * i4], s1);
        s0 = fmaf(qa.y, kf[4 * i4 + 1], s0);
        s1 = fmaf(qb.y, kf[4 * i4 + 1], s1);
        s0 = fmaf(qa.z, kf[4 * i4 + 2], s0);
        s1 = fmaf(qb.z, kf[4 * i4 + 2], s1);
        s0 = fmaf(qa.w, kf[4 * i4 + 3], s0);
        s1 = fmaf(qb.w, kf[4 * i4 + 3], s1);
      }
      emit(r, s0);
      if (r1 != r) emit(r1, s1);
    }
    __syncthreads();

    // online softmax: one warp per row, fixed reduction tree
    const int warp = tid / 32, lane = tid % 32;
    for (int r = warp; r < rv; r += THREADS / 32) {
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
      for (int r = 0; r < RB; ++r) {
        const float a = r < rv ? a_sm[r] : 0.f;
#pragma unroll
        for (int e = 0; e < P::DPT; ++e) acc[r][e] *= a;
      }
      const int j0 = pks * P::KPT;
#pragma unroll
      for (int jq = 0; jq < P::KPT; jq += 4) {
        float4 pr[P::DPT == 4 ? RB : 1];
        if constexpr (P::DPT == 4) {
#pragma unroll
          for (int r = 0; r < RB; ++r)
            pr[r] = r < rv ? *reinterpret_cast<const float4*>(ssm + r * TK + j0 + jq) : make_float4(0.f, 0.f, 0.f, 0.f);
        }
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          float v[P::DPT];
          const int d0 = pdg * P::DPT;
          const float* vp = vsm + (j0 + jq + k) * G::VROW + (d0 / 32) * 36 + d0 % 32;
          if constexpr (P::DPT == 4) {
            const float4 t = *reinterpret_cast<const float4*>(vp);
            v[0] = t.x; v[1] = t.y; v[2] = t.z; v[3] = t.w;
          } else {
            const float2 t = *reinterpret_cast<const float2*>(vp);
            v[0] = t.x; v[1] = t.y;
          }
#pragma unroll
          for (int r = 0; r < RB; ++r) {
            float pj;
            if constexpr (P::DPT == 4) {
              pj = k == 0 ? pr[r].x : k == 1 ? pr[r].y : k == 2 ? pr[r].z : pr[r].w;
            } else {
              pj = r < rv ? ssm[r * TK + j0 + jq + k] : 0.f;
            }
#pragma unroll
            for (int e = 0; e < P::DPT; ++e) acc[r][e] = fmaf(pj, v[e], acc[r][e]);
          }
        }
      }
    }
  }

  // reduce the key subsets in a fixed order, then write this chunk's partials
  __syncthreads();
  if (pv_on) {
#pragma unroll
    for (int r = 0; r < RB; ++r)
#pragma unroll
      for (int e = 0; e < P::DPT; ++e) vsm[(pks * RB + r) * D + pdg * P::DPT + e] = acc[r][e];
  }
  __syncthreads();
  for (int i = tid; i < rv * D; i += THREADS) {
    const int r = i / D, d = i % D;
    float o = 0.f;
    for (int k = 0; k < P::KS; ++k) o += vsm[(k * RB + r) * D + d];
    const int64_t row = (static_cast<int64_t>(b) * Hq + row_head(r)) * M + row_pos(r);
    po[(row * nc + c) * D + d] = bad ? __int_as_float(0x7fc00000) : o;
  }
  if (tid < rv) {
    const int64_t row = (static_cast<int64_t>(b) * Hq + row_head(tid)) * M + row_pos(tid);
    pml[(row * nc + c) * 2] = m_sm[tid];
    pml[(row * nc + c) * 2 + 1] = l_sm[tid];
  }

  // the last chunk of this row group to finish merges all of them, in chunk order
  __shared__ int last;
  __threadfence();
  __syncthreads();
  if (tid == 0) {
    int* count = done + (static_cast<int64_t>(b) * gridDim.y + kvh) * slots + rg;
    last = atomicAdd(count, 1) == nc - 1;
    // every block has counted: back to zero, so counters used again (mx.compile keeps one array) start from 0
    if (last) *count = 0;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  // The chunks' (max, sum) of this block's rows come to shared memory in one parallel pass (the V region is
  // free now: the plan allows at most 128 chunks and 16 rows). A warp per row takes the top and the chunk
  // weights across its lanes, its lane 0 the denominator; then each output element sums its chunks' partials
  // with up to 32 loads in flight. Every sum runs over the chunks in index order, as one fmaf chain.
  float* ml_sm = vsm;                   // [rv][nc][2]
  float* w_sm = vsm + rv * nc * 2;      // [rv][nc]
  float* den_sm = w_sm + rv * nc;       // [rv]
  for (int i = tid; i < rv * nc * 2; i += THREADS) {
    const int r = i / (2 * nc), k2 = i % (2 * nc);
    const int64_t row = (static_cast<int64_t>(b) * Hq + row_head(r)) * M + row_pos(r);
    ml_sm[i] = __ldcg(pml + row * nc * 2 + k2);
  }
  __syncthreads();
  {
    const int warp = tid / 32, lane = tid % 32;
    for (int r = warp; r < rv; r += THREADS / 32) {
      const float* ml = ml_sm + r * nc * 2;
      float top = NEG_INF;
      for (int k = lane; k < nc; k += 32) top = fmaxf(top, ml[2 * k]);
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, off));
      float sink = NEG_INF;
      if constexpr (SINKS) { sink = to_f(sinks[row_head(r)]); top = fmaxf(top, sink); }
      for (int k = lane; k < nc; k += 32) w_sm[r * nc + k] = expf(ml[2 * k] - top);
      __syncwarp();
      if (lane == 0) {
        float l = 0.f;
        for (int k = 0; k < nc; ++k) l = fmaf(w_sm[r * nc + k], ml[2 * k + 1], l);
        if constexpr (SINKS) l += expf(sink - top);
        den_sm[r] = l;
      }
    }
  }
  __syncthreads();
  constexpr int FLY = 32;
  for (int i = tid; i < rv * D; i += THREADS) {
    const int r = i / D, d = i % D;
    const int64_t row = (static_cast<int64_t>(b) * Hq + row_head(r)) * M + row_pos(r);
    const float* pr = po + row * nc * D + d;
    const float* w = w_sm + r * nc;
    float o = 0.f;
    for (int k0 = 0; k0 < nc; k0 += FLY) {
      float part[FLY];
#pragma unroll
      for (int u = 0; u < FLY; ++u) part[u] = k0 + u < nc ? __ldcg(pr + (k0 + u) * D) : 0.f;
#pragma unroll
      for (int u = 0; u < FLY; ++u)
        if (k0 + u < nc) o = fmaf(w[k0 + u], part[u], o);
    }
    out[row * D + d] = static_cast<T>(o / den_sm[r]);
  }
}

// A packed cache (kv_layout.Row): a row of `kv` is K's words, V's, then K scales, K biases, V scales, V biases
// as T, over rows [0, rows[0]) of a buffer that may be longer; the six parts are column offsets of it.
template <typename T, typename MT, typename ST, int D, int BITS, int GS, int NREP, int MBMAX, int MBE, int MASK,
          bool SINKS>
__device__ void split_packed(
    const T* q, const Shape& q_shape, const Strides& q_st, const uint32_t* kv, const Strides& kv_st,
    const MT* mask, const Shape& m_shape, const Strides& m_st, const ST* sinks,
    const float* params, const int* rows, T* out, float* work, int* done = nullptr, int* next = nullptr) {
  constexpr int KW = D * BITS / 32, KG = D / GS, PER_WORD = 4 / sizeof(T);
  Strides sb_st = kv_st;  // the scales' strides in T: the rows' in words, times T values per word
  for (int i = 0; i < 3; ++i) sb_st[i] *= PER_WORD;
  const T* sb = reinterpret_cast<const T*>(kv + 2 * KW);
  split<T, MT, ST, D, BITS, GS, NREP, MBMAX, MBE, MASK, SINKS>(
      q, q_shape, q_st, rows[0], kv, kv_st, sb, sb_st, sb + KG, sb_st, kv + KW, kv_st,
      sb + 2 * KG, sb_st, sb + 3 * KG, sb_st, mask, m_shape, m_st, sinks, params, out, work, done, next);
}

}  // namespace qsdpa
