"""fused-quantized-attention: quantized-KV attention as one kernel that reads the packed cache once.

Hazard: mlx-lm's `quantized_scaled_dot_product_attention` (`quantized_matmul(q, k, transpose=True)`, a
mask, `softmax(precise=True)`, `quantized_matmul(p, v)`) runs as separate kernels: the scores and the
probabilities go through HBM, and MLX's quantized kernels are not built for this shape. On CUDA it is also
wrong or raises as shipped (see quantized-matmul-broadcast-weights), and correct but slow once rewritten:
an 8-bit cache decoded at 0.35x the float cache's tokens/s on an H200 (issue 12).

Evidence: bench/results/ (gqa case, fused variant; mlx_lm case, kv8/kv4 wrapped) and
bench/results/fused_attention_notes.md for the kernel.

Rewrite: `fused`, one call of `mlxrewrite.backends.kernels.quantized_sdpa` (flash-decoding: N split in chunks that
depend on N only, online softmax in float32, each K/V tile read once for all query heads and rows of its
kv head, one launch). It reads the cache through its strides: no copy of K or V. The numbers change within
rounding: the scores and probabilities stay in float32 where the unfused graph rounds them to the query
dtype. In eager mode `direct` hands mlx-lm's own arguments to the kernel (which scales the query in its
dtype, as mlx-lm does), verified bitwise against `fused` on the first call of each analysis.

Must not fire: a softmax that is not precise; K and V with other bits, group sizes or shapes than each
other; a mode other than affine; a mask it does not understand (a per-kv-head mask, a mask computed inside
the function by ops the lowering cannot replay); anything between the scores and the softmax or the
softmax and the values (a scale applied there, a softcap); M > 16 (prefill keeps today's rewrites); head
dims, bit widths and group sizes the kernel does not cover; and any backend where the kernel was not
verified (CPU and Metal keep today's rewrites; on CUDA only the architectures in `VERIFIED`).
"""

from __future__ import annotations

import math
from typing import Callable

import mlx.core as mx

from mlxrewrite.core.facts import Facts, Read
from mlxrewrite.backends.kernels import packed_attention, quantized_sdpa
from mlxrewrite.core.pattern import GraphPattern
from mlxrewrite.backends.device import Backend
from mlxrewrite.core.rule import Bound, Decision, Decline, Region, Rule

NAME = "fused-quantized-attention"
VERIFIED = {"cuda": ("sm_90",)}  # where bench/gpu_fused_attention.py checked the kernel (H100/H200)
# What the kernel covers (`kernels.quantized_sdpa`): head dims in 32-element parts (80 keeps today's rewrites)
HEAD_DIMS, BITS, GROUPS, DTYPES = (64, 96, 128, 256), (4, 8), (32, 64, 128), ("float16", "bfloat16", "float32")
MAX_M, MAX_REP = 16, 16
AFFINE = 0  # QuantizedMatmul's mode argument


def _qmm(x, w, scales, biases, transpose):
    return mx.quantized_matmul(x, w, scales, biases, transpose=transpose, group_size=64, bits=8)


def unmasked(q, k_w, k_scales, k_biases, v_w, v_scales, v_biases):
    return _qmm(mx.softmax(_qmm(q, k_w, k_scales, k_biases, True), axis=-1, precise=True),
                v_w, v_scales, v_biases, False)


def bool_mask(q, k_w, k_scales, k_biases, v_w, v_scales, v_biases, mask, fill):
    scores = mx.where(mask, _qmm(q, k_w, k_scales, k_biases, True), fill)
    return _qmm(mx.softmax(scores, axis=-1, precise=True), v_w, v_scales, v_biases, False)


def additive_mask(q, k_w, k_scales, k_biases, v_w, v_scales, v_biases, mask):
    scores = _qmm(q, k_w, k_scales, k_biases, True) + mask
    return _qmm(mx.softmax(scores, axis=-1, precise=True), v_w, v_scales, v_biases, False)


def causal_mask(q, k_w, k_scales, k_biases, v_w, v_scales, v_biases, fill):
    """mlx-lm's mask="causal", built inside the function from the scores' shape."""
    scores = _qmm(q, k_w, k_scales, k_biases, True)
    q_len, k_len = scores.shape[-2:]
    mask = mx.arange(k_len - q_len, k_len)[:, None] >= mx.arange(k_len)[None]
    return _qmm(mx.softmax(mx.where(mask, scores, fill), axis=-1, precise=True), v_w, v_scales, v_biases, False)


def _example(with_mask: str | None) -> tuple:
    """Placeholders for tracing a pattern (any shapes the ops accept: matching ignores them)."""
    q = mx.zeros((1, 2, 2, 64))
    k = mx.quantize(mx.zeros((1, 2, 256, 64)), group_size=64, bits=8)
    extra = {None: (), "bool": (mx.ones((1, 1, 2, 256), mx.bool_), mx.array(-1e9)),
             "additive": (mx.zeros((1, 1, 2, 256)),), "causal": (mx.array(-1e9),)}[with_mask]
    return (q, *k, *k, *extra)


PATTERNS = tuple(GraphPattern(fn, lambda kind=kind: _example(kind), "quantized_matmul", kind or "unmasked")
                 for fn, kind in ((causal_mask, "causal"), (bool_mask, "bool"), (additive_mask, "additive"),
                                  (unmasked, None)))
# causal first: its mask is a constant the bool pattern would also bind, but eager mode cannot reuse


def verified(backend: Backend) -> bool:
    return backend.arch in VERIFIED.get(backend.kind, ())


def guard(facts: Facts) -> Decision | Decline:
    backend = facts.backend
    if not verified(backend):
        return Decline(NAME, f"the fused kernel is not verified on {backend.kind} {backend.arch}".rstrip()
                             + "; today's rewrites apply")
    scores, values = facts.args("QuantizedMatmul"), facts.args("QuantizedMatmul#2")
    group_size, bits, mode, transpose = scores[:4]
    if (mode, transpose, values[3]) != (AFFINE, True, False) or tuple(values[:3]) != (group_size, bits, mode):
        return Decline(NAME, f"scores {scores} and values {values} are not one affine K/V pair (transpose, then not)")
    if not facts.args("Softmax")[0]:
        return Decline(NAME, "the softmax is not precise=True: the kernel's float32 softmax would change it")
    if bits not in BITS or group_size not in GROUPS:
        return Decline(NAME, f"bits={bits}, group_size={group_size}: the kernel covers bits {BITS}, groups {GROUPS}")
    layout = facts.derive("heads", _heads, Read("shape", "q"), Read("shape", "k_w"), Read("shape", "v_w"),
                          *(Read("present", k) for k in ("k_biases", "v_biases")))
    if isinstance(layout, str):
        return Decline(NAME, layout)
    rep, m, d = layout
    dtype = facts.dtype("q")
    if str(dtype).removeprefix("mlx.core.") not in DTYPES or facts.dtype("k_scales") != dtype:
        return Decline(NAME, f"queries {dtype} with scales {facts.dtype('k_scales')}: the kernel takes one float dtype")
    if d not in HEAD_DIMS or m > MAX_M or rep > MAX_REP or d % group_size or d % 32:
        return Decline(NAME, f"head dim {d}, M {m}, {rep} query heads per kv head: outside what the kernel covers "
                             f"(head dims {HEAD_DIMS}, M <= {MAX_M}, <= {MAX_REP} per kv head)")
    params = {"group_size": group_size, "bits": bits, "mask": None, "fill": None, "mask_view": None}
    how = "no mask"
    if facts.present("fill"):
        fill = facts.const("fill")
        if fill is None or fill.min != fill.max:
            return Decline(NAME, "the masked-out fill value is not a known constant")
        params["fill"] = fill.min
    if facts.present("mask"):
        view = facts.derive("mask view", _mask_view, Read("shape", "mask"), Read("shape", "q"))
        if view is None:
            return Decline(NAME, "the mask varies per kv head but not per query head (or does not broadcast)")
        params.update(mask="array", mask_view=view)
        how = f"{'bool' if facts.dtype('mask') == mx.bool_ else 'additive'} mask"
    elif params["fill"] is not None:
        if not facts.derive("causal", _is_causal, Read("args", "Arange"), Read("args", "Arange#2")):
            return Decline(NAME, "the mask built inside the function is not mlx-lm's causal mask")
        params["mask"], how = "causal", "causal mask"
    return Decision(NAME, "fused", f"quantized attention (bits {bits}, group {group_size}, head dim {d}, M {m}, "
                                   f"{rep} query heads per kv head, {how}) as one fused kernel", params)


def _heads(q: tuple, k: tuple, v: tuple, k_biases: bool, v_biases: bool) -> tuple[int, int, int] | str:
    """(query heads per kv head, M, head dim), or why the shapes are not one attention."""
    if not (k_biases and v_biases):
        return "no biases: not affine quantization"
    if k != v:
        return f"K {k} and V {v} differ in shape"
    if len(q) == 5 and len(k) in (4, 5):  # GQA: (B, kv, rep, M, D) over (B, kv, [rep|1], N, D/pack)
        batch, kv, rep, m, d = q
        same = k[:2] == (batch, kv)
    elif len(q) == 4 and len(k) == 4:  # MHA (or GQA written with repeated heads)
        batch, heads, m, d = q
        same, rep = k[:2] == (batch, heads), 1
    else:
        return f"queries {q} over keys {k}: not (B, H, M, D) over (B, H, N, D/pack)"
    return (rep, m, d) if same else f"queries {q} and keys {k} disagree in batch or heads"


def _mask_view(mask: tuple, q: tuple) -> str | None:
    """How the mask becomes broadcastable to (B, Hq, M, N): as it is, with its (kv, rep) dims merged, or None."""
    if len(mask) <= 4 and len(q) == 4:
        return "as is"
    if len(q) == 4 or len(mask) < 5:
        return "as is" if len(mask) <= 2 or mask[-3] == 1 else None
    kv, rep = mask[-4:-2] if len(mask) == 5 else (1, 1)
    if (kv, rep) == (1, 1):
        return "squeeze"
    return "merge" if (kv, rep) == tuple(q[1:3]) else None


def _is_causal(queries: tuple, keys: tuple) -> bool:
    """mlx-lm's `arange(kL - qL, kL)[:, None] >= arange(kL)[None]`: (start, stop, step) of the two aranges."""
    (q_start, q_stop, q_step), (k_start, k_stop, k_step) = queries[:3], keys[:3]
    return q_stop == k_stop and k_start == 0 and q_step == k_step == 1 and q_start <= q_stop


def fused(bound: Bound, decision: Decision) -> mx.array:
    p = decision.params
    q = bound["q"]
    k = tuple(_kv_heads(bound.root(f"k_{n}")) for n in ("w", "scales", "biases"))
    v = tuple(_kv_heads(bound.root(f"v_{n}")) for n in ("w", "scales", "biases"))
    q4 = q.reshape(q.shape[0], -1, *q.shape[-2:]) if q.ndim == 5 else q
    mask = "causal" if p["mask"] == "causal" else _mask(bound["mask"], p["mask_view"])
    out = quantized_sdpa(q4, k, v, scale=1.0, group_size=p["group_size"], bits=p["bits"], mask=mask, fill=p["fill"])
    return out.reshape(q.shape) if q.ndim == 5 else out


def direct(decision: Decision, queries: mx.array, q_keys: tuple, q_values: tuple, scale: float, mask, group_size: int,
           bits: int) -> Callable[..., mx.array | None] | None:
    """`fused` on the arguments of mlx-lm's function itself (eager mode's fast path), prepared once per analysis
    from its first call: the kernel scales the query as mlx-lm does and takes its 4-axis query and cache views
    as they are, so no op is replayed; from a packed cache (mlxrewrite.mlx_lm.packed_cache) it reads the cache's
    buffer, no view made at all, and a call costs the prepared kernel's launch. A mask whose view on the
    heads only the traced graph tells (neither (L, N) nor (B, 1, L, N)), and a query whose dtype is not the
    scales' (mlx-lm's matmul then promotes it after scaling), are left to `fused` (None). Everything read here
    is in the region's key (shapes, dtypes, static arguments, a packed cache's layout); per call the prepared
    form only checks that K and V are one cache's (else None: `fused` takes that call)."""
    if isinstance(mask, mx.array) and not (mask.ndim == 2 or (mask.ndim == 4 and mask.shape[1] == 1)):
        return None
    p = decision.params
    packed = getattr(q_keys, "packed", None)  # a packed cache's fetch: the kernel reads its buffer
    if packed is not None:
        if queries.dtype != packed.row.dtype:
            return None
        attend = packed_attention(queries.shape, queries.dtype, packed, scale=scale, group_size=p["group_size"],
                                  bits=p["bits"], mask=mask, fill=p["fill"])

        def run_packed(queries, q_keys, q_values, scale, mask, group_size, bits):
            packed = q_keys.packed
            if getattr(q_values, "packed", None) is not packed or q_keys.which != 0 or q_values.which != 1:
                return None
            return attend(queries, packed, mask)

        return run_packed
    if queries.dtype != q_keys[1].dtype:
        return None

    def run(queries, q_keys, q_values, scale, mask, group_size, bits):
        return quantized_sdpa(queries, q_keys, q_values, scale=scale, group_size=p["group_size"], bits=p["bits"],
                              mask=mask, fill=p["fill"])

    return run


def _kv_heads(a: mx.array) -> mx.array:
    """(B, kv, N, .): a GQA operand written as (B, kv, 1, N, .) by the caller (compile mode hands over the
    caller's operand) loses its repeat dim (a view)."""
    return a[:, :, 0] if a.ndim == 5 else a


def _mask(mask: mx.array | None, view: str | None) -> mx.array | None:
    if mask is None or view == "as is":
        return mask
    if view == "squeeze":
        return mask[..., 0, :, :]
    return mask.reshape(*mask.shape[:-4], math.prod(mask.shape[-4:-2]), *mask.shape[-2:])


RULE = Rule(
    name=NAME,
    severity="warning",
    hazard="quantized-KV attention runs as separate unfused kernels (scores and probabilities through HBM): "
           "0.35x the float cache's decode speed with an 8-bit cache on an H200",
    pattern=PATTERNS,
    guard=guard,
    rewrites={"fused": fused},
    doc=__doc__,
    runs_on=verified,
    region=Region("mlx_lm.models.base:quantized_scaled_dot_product_attention",
                  free={"q_keys": -2, "q_values": -2, "mask": -1}, direct=direct),
)
