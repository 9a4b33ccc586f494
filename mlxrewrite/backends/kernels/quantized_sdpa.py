"""Fused attention over a quantized KV cache: `quantized_sdpa`, and the same algorithm in MLX ops.

Semantics are those of mlx-lm's `quantized_scaled_dot_product_attention` (q * scale in q's dtype, as mlx-lm
scales it; scores = that . dequant(k); a bool mask sets `fill`, an additive mask is added; softmax;
p . dequant(v)) with every intermediate after the scaling in float32, plus attention sinks. The algorithm is flash-decoding: N is cut into chunks whose size depends on
N alone, each chunk gets a float32 (max, sum, unnormalised output) per query row, and the chunks are merged
in index order. `reference` writes that algorithm in MLX ops so the CPU tests can check it; the CUDA kernel
(quantized_sdpa_cuda) runs it on the GPU.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import mlx.core as mx

from . import kv_layout
from . import quantized_sdpa_cuda as cuda

Quantized = Sequence[mx.array]  # (packed uint32 weights, scales, biases)
Mask = mx.array | str | None
Shape = tuple[int, ...]

_TARGET_CHUNKS = 64
_CHUNK_QUANTUM = 256  # default chunks are whole multiples of this
_SPLIT_MULTIPLE = 128  # a chunk the CUDA kernel takes: whole tiles from head dim 64 up (a tile is 64 keys at
#                        head dim 128, 128 at 64); at 32 a tile is 256 keys and the rest of it is masked
_MAX_CHUNKS = 128  # the CUDA kernel merges a row's chunks in shared memory ...
_MAX_REP = 16  # ... and holds at most 16 query heads of a kv head in one block


def chunk_size(N: int) -> int:
    """Keys per chunk: about 64 chunks (enough blocks for 132 SMs at 8 kv heads), a function of N only."""
    per = -(-N // _TARGET_CHUNKS)
    return max(_CHUNK_QUANTUM, -(-per // _CHUNK_QUANTUM) * _CHUNK_QUANTUM)


@lru_cache(maxsize=1)
def _cuda_available() -> bool:
    return mx.cuda.is_available()


def on_cuda() -> bool:
    """Whether custom CUDA kernels run here: a CUDA build of MLX, the GPU the default device."""
    return _cuda_available() and mx.default_device() == mx.gpu


@lru_cache(maxsize=8)
def _lowest(dtype: mx.Dtype) -> float:
    """mlx-lm's fill for masked scores: the dtype's finite minimum (a fully masked row averages V)."""
    return float(mx.finfo(dtype).min)


@lru_cache(maxsize=16)
def _params(scale: float, fill: float, chunk: int) -> mx.array:
    """The kernel's float scalars, one cached array per distinct value set (a decode loop makes a new one
    when the chunk size changes: every 16k keys). An array MLX makes from Python data is host-visible
    memory: above 8 bytes it costs 145-180 us to allocate on an H200 host unless a freed one of its size is
    reused (bench/results/cuda-nvidia-h200/step_profile_n4096_cprofile*.txt), so a packed cache's row
    count, new each token, comes in its own 4-byte array (`_rows_scalar`), which MLX takes from its pool
    of small buffers."""
    return mx.array([scale, fill, float(chunk)], dtype=mx.float32)


def _rows_scalar(n: int) -> mx.array:
    """A packed cache's row count for the kernel: a 4-byte array (MLX's pool of small buffers)."""
    return mx.array(n, dtype=mx.int32)


def clear_caches() -> None:
    """Forget every kernel object, launch plan and scalars array made so far, kv_pack's too (tests and kernel
    experiments: the next call builds them anew, with whatever `mx.fast.cuda_kernel` and device code are
    current)."""
    from . import kv_pack  # it imports this module

    for cached in (cuda._kernel, _cuda_plan, _prepared_packed, _params, kv_pack.cuda._kernel, kv_pack._launcher):
        cached.cache_clear()


def _check(q: Shape, k: Shape, v: Shape, group_size: int, bits: int, mask: Shape | None = None,
           sinks: Shape | None = None) -> None:
    """Shapes the algorithm (and the kernel's indexing) relies on; raises ValueError otherwise."""
    D = q[-1]
    if bits not in (4, 8) or group_size not in (32, 64, 128) or D % group_size or D % 32:
        raise ValueError(f"quantized_sdpa: unsupported bits={bits}, group_size={group_size}, head dim {D}")
    if len(q) != 4 or len(k) != 4 or k != v or k[-1] * 32 // bits != D or q[1] % k[1] or q[0] != k[0]:
        raise ValueError(f"quantized_sdpa: shapes q {q}, k {k}, v {v} do not fit bits={bits}")
    full = (q[0], q[1], q[2], k[2])
    if mask is not None and (len(mask) != 4 or any(m not in (1, f) for m, f in zip(mask, full))):
        raise ValueError(f"quantized_sdpa: mask of shape {mask} does not broadcast to {full}")
    if sinks is not None and sinks != (q[1],):
        raise ValueError(f"quantized_sdpa: sinks of shape {sinks}, expected ({q[1]},)")


@lru_cache(maxsize=4096)
def _cuda_plan(q: Shape, k: Shape, v: Shape, dtype: mx.Dtype, group_size: int, bits: int, split: int | None,
               kind: int, mask: Shape | None, mask_dtype: mx.Dtype | None, sinks: Shape | None,
               sinks_dtype: mx.Dtype | None, packed: bool = False, chained: bool = False) -> tuple[tuple, int]:
    """Validation and launch parameters, once per shape: a decode step then costs one kernel call."""
    _check(q, k, v, group_size, bits, mask, sinks)
    chunk = split or chunk_size(k[2])
    if chunk % _SPLIT_MULTIPLE:
        raise ValueError(f"quantized_sdpa: split must be a multiple of {_SPLIT_MULTIPLE} on CUDA, not {chunk}")
    if -(-k[2] // chunk) > _MAX_CHUNKS:
        raise ValueError(f"quantized_sdpa: split {chunk} cuts {k[2]} keys into more than {_MAX_CHUNKS} chunks")
    if q[1] // k[1] > _MAX_REP:
        raise ValueError(f"quantized_sdpa: {q[1] // k[1]} query heads per kv head; the CUDA kernel takes at most "
                         f"{_MAX_REP}")
    B, Hq, M, D = q
    return cuda.plan(B, Hq, k[1], M, D, k[2], chunk, bits, group_size, dtype, kind, mask_dtype, sinks_dtype,
                     packed, chained), chunk


def _as_4d(mask: mx.array) -> mx.array:
    """A view with 4 axes (leading size-1 axes), so the kernel indexes it by strides; never a copy."""
    return mask if mask.ndim == 4 else mx.expand_dims(mask, tuple(range(4 - mask.ndim)))


def _resolve(impl: str) -> str:
    if impl == "auto":
        return "cuda" if on_cuda() else "reference"
    if impl not in ("cuda", "reference"):
        raise ValueError(f"quantized_sdpa: impl must be 'auto', 'cuda' or 'reference', not {impl!r}")
    return impl


def _shape_dtype(a: mx.array | None) -> tuple[Shape | None, mx.Dtype | None]:
    """What a launch plan depends on of an optional operand (mask, sinks)."""
    return (None, None) if a is None else (a.shape, a.dtype)


def _cuda_mask(mask: Mask) -> tuple[int, mx.array | None]:
    """The kernel's mask kind and array."""
    if mask is None:
        return cuda.MASK_NONE, None
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"quantized_sdpa: unknown mask {mask!r}")
        return cuda.MASK_CAUSAL, None
    mask = _as_4d(mask)
    return (cuda.MASK_BOOL if mask.dtype == mx.bool_ else cuda.MASK_ADD), mask


def quantized_sdpa(q: mx.array, k: Quantized, v: Quantized, *, scale: float, group_size: int, bits: int,
                   mask: Mask = None, fill: float | None = None, sinks: mx.array | None = None,
                   split: int | None = None, impl: str = "auto") -> mx.array:
    """Attention of q (B, Hq, M, D) over affine-quantized k, v (B, Hkv, N, .); returns (B, Hq, M, D) in q's dtype.

    mask: None, "causal", a bool array (False -> `fill`, default the finite minimum of q's dtype, as mlx-lm)
    or an additive float array, broadcastable to (B, Hq, M, N). sinks: (Hq,) logits joining the softmax
    denominator. split: keys per chunk (default `chunk_size(N)`; a multiple of 128 on CUDA).
    impl: "auto" (the CUDA kernel on a CUDA GPU, else the reference), "cuda" or "reference".
    """
    impl = _resolve(impl)
    if fill is None:
        fill = _lowest(q.dtype)
    if impl == "reference":
        mshape = None if mask is None or isinstance(mask, str) else _as_4d(mask).shape
        _check(q.shape, k[0].shape, v[0].shape, group_size, bits, mshape, None if sinks is None else sinks.shape)
        return reference(q, k, v, scale=scale, group_size=group_size, bits=bits, mask=mask, fill=fill,
                         sinks=sinks, chunk=split or chunk_size(k[0].shape[2]))
    kind, mask_arr = _cuda_mask(mask)
    plan, chunk = _cuda_plan(q.shape, k[0].shape, v[0].shape, q.dtype, group_size, bits, split, kind,
                             *_shape_dtype(mask_arr), *_shape_dtype(sinks))
    return cuda.launch(plan, q, (*k, *v), mask_arr, sinks, _params(float(scale), float(fill), chunk))


def quantized_sdpa_packed(q: mx.array, packed: kv_layout.Packed, *, scale: float, group_size: int, bits: int,
                          mask: Mask = None, fill: float | None = None, sinks: mx.array | None = None,
                          impl: str = "auto") -> mx.array:
    """`quantized_sdpa` over rows [:n] of a packed cache's buffer (kv_layout), read where it is.

    The same kernel and numbers as over the six parts `kv_layout.Row.split` makes of it, without making them:
    a decode step then builds no view of the cache (on CUDA; the reference takes the parts).
    """
    return packed_attention(q.shape, q.dtype, packed, scale=scale, group_size=group_size, bits=bits, mask=mask,
                            fill=fill, sinks=sinks, impl=impl)(q, packed, mask, sinks)


def packed_attention(q_shape: Shape, dtype: mx.Dtype, packed: kv_layout.Packed, *, scale: float, group_size: int,
                     bits: int, mask: Mask = None, fill: float | None = None, sinks: mx.array | None = None,
                     impl: str = "auto") -> "PackedAttention":
    """`quantized_sdpa_packed` prepared for queries of `q_shape` and `dtype` over caches laid out as `packed`
    (any row count), with a mask and sinks like those given (an array mask: any last axis, n or 1): the
    object to call once per decode step (a rule's direct form holds one per analysis)."""
    kind, mask = _cuda_mask(mask)
    mask_shape, mask_dtype = _shape_dtype(mask)
    kv = packed.kv.shape
    return _prepared_packed(tuple(q_shape), dtype, kv[:2] + kv[3:], packed.row, group_size, bits, kind,
                            mask_shape and mask_shape[:3], mask_dtype, *_shape_dtype(sinks), packed.chain is not None,
                            float(scale), float(_lowest(dtype) if fill is None else fill), _resolve(impl))


class PackedAttention:
    """Attention over a packed cache's rows [:n], everything but n decided once (`packed_attention`): the
    shapes checked, the mask kind, whether launches are chained. A call then costs a few checks and the
    kernel call: the launch plan (`_cuda_plan`, which checks what the kernel takes) and the scalars are
    looked up once per row count, which a decode step's layers share."""

    __slots__ = ("args", "scale", "fill", "impl", "mask_kind", "chained", "counters_size", "rows")

    def __init__(self, q: Shape, dtype: mx.Dtype, kv: Shape, row: kv_layout.Row, group_size: int, bits: int,
                 mask_kind: int, mask: Shape | None, mask_dtype: mx.Dtype | None, sinks: Shape | None,
                 sinks_dtype: mx.Dtype | None, chain: bool, scale: float, fill: float, impl: str):
        B, H, width = kv
        part = _packed_rows(B, H, width, row, dtype, group_size, bits)
        _check(q, part, part, group_size, bits, None if mask is None else (*mask, 1), sinks)
        self.mask_kind = mask_kind
        self.chained = chain and cuda.row_groups(q[3], q[1] // H, q[2]) <= cuda.CHAIN_SLOTS
        self.args = (q, part, dtype, group_size, bits, mask, mask_dtype, sinks, sinks_dtype)
        self.scale, self.fill, self.impl = scale, fill, impl
        self.counters_size = B * H * cuda.CHAIN_SLOTS
        self.rows: tuple = (-1, None, None, None)  # the last row count's (n, plan, scalars, row count scalar)

    def __call__(self, q: mx.array, packed: kv_layout.Packed, mask: Mask = None,
                 sinks: mx.array | None = None) -> mx.array:
        """q, mask and sinks as prepared (an array mask: any last axis, n or 1); `packed` of the prepared layout,
        with any row count."""
        n, kv = packed.n, packed.kv
        if n > kv.shape[2]:
            raise ValueError(f"quantized_sdpa_packed: {n} rows asked of a buffer of {kv.shape[2]}")
        if type(mask) is mx.array:
            if mask.ndim != 4:
                mask = _as_4d(mask)
            if mask.shape[3] not in (1, n):
                raise ValueError(f"quantized_sdpa_packed: a mask over {mask.shape[3]} keys for {n} rows")
        else:
            mask = None  # None, or the mode prepared ("causal")
        if self.impl == "reference":
            k, v = packed.parts()
            mode = "causal" if self.mask_kind == cuda.MASK_CAUSAL else mask
            return quantized_sdpa(q, k, v, scale=self.scale, group_size=self.args[3], bits=self.args[4], mask=mode,
                                  fill=self.fill, sinks=sinks, impl="reference")
        rows = self.rows
        if rows[0] != n:  # the row count changes once per token, and a step's layers share it
            rows = self.rows = self._rows(n)
        _, plan, params, count = rows
        if packed.count is not None:  # the row count an in-place write of the rows left: read after it
            count = packed.count
        if not self.chained:
            return cuda.launch(plan, q, (kv,), mask, sinks, params, count)
        chain = packed.chain
        if chain is None:
            raise ValueError("quantized_sdpa_packed: prepared for a cache with a kernel chain, given one without")
        counters = chain.counters
        if counters is None or counters.size != self.counters_size:
            counters = cuda.chain_counters(*kv.shape[:2])
        out, chain.counters = cuda.launch_chained(plan, q, (kv,), mask, sinks, params, count, counters)
        return out

    def _rows(self, n: int) -> tuple[int, tuple, mx.array, mx.array]:
        """(n, the launch plan for n rows, the scalars, n as a scalar): a launch depends on the row count only
        through the count of chunks, as n itself comes in its scalar, so it is planned for whole chunks."""
        chunk = chunk_size(n)
        q, part, dtype, group_size, bits, mask, mask_dtype, sinks, sinks_dtype = self.args
        rows = (*part[:2], -(-n // chunk) * chunk, part[3])
        plan, _ = _cuda_plan(q, rows, rows, dtype, group_size, bits, chunk, self.mask_kind,
                             None if mask is None else (*mask, 1), mask_dtype, sinks, sinks_dtype, True, self.chained)
        return n, plan, _params(self.scale, self.fill, chunk), _rows_scalar(n)


_prepared_packed = lru_cache(maxsize=256)(PackedAttention)


def _packed_rows(B: int, H: int, width: int, row: kv_layout.Row, dtype: mx.Dtype, group_size: int,
                 bits: int) -> Shape:
    """The shape of K's (and V's) words over no rows; ValueError where the buffer's rows are not K and V of one
    shape, quantized with `group_size` and `bits`, with scales of the query's dtype, 16-byte aligned, as the
    kernel reads them."""
    if width != row.width or row.v_words != row.k_words or row.v_groups != row.k_groups or row.dtype != dtype \
            or row.k_words * 32 != bits * group_size * row.k_groups or width % 4 or row.words % 4:
        raise ValueError(f"quantized_sdpa_packed: a buffer of rows of {width} words laid out as {row} is not K and "
                         f"V of one shape with {dtype} scales")
    return (B, H, 0, row.k_words)


def _causal(M: int, N: int) -> mx.array:
    return mx.arange(N - M, N)[:, None] >= mx.arange(N)[None]


def reference(q: mx.array, k: Quantized, v: Quantized, *, scale: float, group_size: int, bits: int,
              mask: Mask, fill: float, sinks: mx.array | None, chunk: int) -> mx.array:
    """The kernel's algorithm in MLX ops: per-chunk float32 softmax statistics, merged in chunk order.

    Dot products are elementwise products reduced over one axis (not matmuls, whose blocking may change
    with M), so each query row's arithmetic is the same whatever M is.
    """
    B, Hq, M, D = q.shape
    Hkv, N = k[0].shape[1], k[0].shape[2]
    n_rep, nc = Hq // Hkv, -(-N // chunk)
    pad = nc * chunk - N

    def dq(t: Quantized) -> mx.array:  # (B, Hkv, 1, nc, chunk, D), padded keys are zero
        x = mx.dequantize(*t, group_size=group_size, bits=bits).astype(mx.float32)
        x = mx.pad(x, [(0, 0), (0, 0), (0, pad), (0, 0)])
        return x.reshape(B, Hkv, 1, nc, chunk, D)

    qf = (q * scale).astype(mx.float32).reshape(B, Hkv, n_rep * M, 1, 1, D)  # scaled in q's dtype, as mlx-lm
    s = (qf * dq(k)).sum(-1)  # (B, Hkv, R, nc, chunk)
    if isinstance(mask, str):
        mask = _causal(M, N)
    if mask is not None:
        m = mx.broadcast_to(mask, (B, Hq, M, N)).reshape(B, Hkv, n_rep * M, N)
        m = mx.pad(m, [(0, 0), (0, 0), (0, 0), (0, pad)]).reshape(B, Hkv, n_rep * M, nc, chunk)
        s = mx.where(m, s, fill) if mask.dtype == mx.bool_ else s + m.astype(mx.float32)
    valid = (mx.arange(nc * chunk) < N).reshape(nc, chunk)
    s = mx.where(valid, s, -mx.inf)
    cmax = s.max(-1)
    safe = mx.where(cmax == -mx.inf, 0.0, cmax)
    p = mx.exp(s - safe[..., None])
    csum = p.sum(-1)
    vt = dq(v).swapaxes(-1, -2)  # (B, Hkv, 1, nc, D, chunk): reduce over the last axis
    o = (p[..., None, :] * vt).sum(-1)  # (B, Hkv, R, nc, D)
    top = cmax.max(-1, keepdims=True)
    if sinks is not None:
        sk = sinks.astype(mx.float32).reshape(1, Hkv, n_rep, 1, 1)
        sk = mx.broadcast_to(sk, (B, Hkv, n_rep, M, 1)).reshape(B, Hkv, n_rep * M, 1)
        top = mx.maximum(top, sk)
    w = mx.exp(cmax - top)
    den = (w * csum).sum(-1, keepdims=True)
    if sinks is not None:
        den = den + mx.exp(sk - top)
    out = (w[..., None] * o).sum(-2) / den
    return out.reshape(B, Hq, M, D).astype(q.dtype)
