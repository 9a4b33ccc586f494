"""quantized-matmul-broadcast-weights: no quantized matmul kernel may see a stride-0 weight batch dim.

Hazard: `mx.quantized_matmul(x, w, scales, biases)` where a batch dim of w/scales/biases has stride 0:
an explicit `mx.broadcast_to`, or (the GQA quantized-KV pattern of mlx-lm) `mx.expand_dims(k, -3)` that
MLX broadcasts against queries shaped (B, n_kv, n_rep, M, D).

Evidence: Metal's vector kernels (M below `get_qmv_batch_limit`) read wrong memory for M >= 2 (MLX
#3480: errors up to 12.5 in real logits). CUDA (MLX 0.32.4, H100): every kernel uses weight matrix 0
for every batch of a broadcast weight, wrong for every M (max error ~100 on unit data), and
"No implementation for problem shape" for sliced (unaligned-length) caches. See bench/results/.

Rewrites (both exact: the same dot products, only the batching differs):
- fold: index the stride-0 dims away and move the matching batch dims of x into M, so the kernel
  multiplies the un-broadcast weights by a taller x (less memory traffic: 1.1-2.8x faster on H100).
  On CUDA, whose kernels need dense weights, the un-broadcast weights are made dense first with a
  flatten/unflatten pair: a free view when they already are, one copy (1/n_rep of copy's) when they
  are a sliced cache.
- copy: materialise the weights with `mx.concatenate` along the broadcast dims (the upstream-proposed
  fix, slower). Chosen when fold cannot apply: a dim is stride 0 in some of w/scales/biases but not all.

Must not fire: weights without a stride-0 batch dim (equal batch dims, 2-D weights), x or w of rank
2 (MLX does not broadcast then), and on Metal when M selects the matrix kernel, which is correct.
"""

from __future__ import annotations

import math

import mlx.core as mx

from mlxrewrite.graph import Graph
from mlxrewrite.intercept import Call
from mlxrewrite.layout import broadcast_strides, stride0_batch_dims
from mlxrewrite.policy import Backend, needs_dense_weights, qmm_hazard_applies
from mlxrewrite.rule import Decision, Rule
from mlxrewrite.trace import CallSite

NAME = "quantized-matmul-broadcast-weights"
WEIGHTS = ("w", "scales", "biases")


def match(site: CallSite, graph: Graph, backend: Backend) -> Decision | None:
    x = graph.values[site.operands["x"]]
    out = graph.values[site.output]
    weights = {k: graph.values[site.operands[k]] for k in WEIGHTS if site.operands.get(k)}
    if len(x.shape) <= 2 or len(weights["w"].shape) <= 2:
        return None
    batch = out.shape[:-2]
    kernel = {k: broadcast_strides(v.shape, v.strides, batch + v.shape[-2:]) for k, v in weights.items()}
    zero = {k: stride0_batch_dims(batch + weights[k].shape[-2:], s) for k, s in kernel.items()}
    dims = tuple(sorted(set().union(*zero.values())))
    if not dims:
        return None
    hazardous, why = qmm_hazard_applies(backend, *_mkn(x.shape, out.shape[-1]), site.params["transpose"])
    if not hazardous:
        return None
    facts = ", ".join(f"{k} strides {kernel[k]}" for k in weights)
    reason = f"batch dims {dims} of the weights have stride 0 ({facts}); {why}"
    params = {"dims": dims, "batch": batch, "operand_dims": zero}
    if any(zero[k] != dims for k in weights):
        return Decision(NAME, "copy", reason + "; copy: not every weight operand is broadcast on those dims", params)
    densify = needs_dense_weights(backend)
    return Decision(NAME, "fold", reason + f"; fold dims {dims} into M={x.shape[-2]}" +
                    (" (weights made dense first)" if densify else ""), {**params, "densify": densify})


def _mkn(x_shape: tuple, n: int) -> tuple[int, int, int]:
    return x_shape[-2], x_shape[-1], n


def site_key(call: Call, backend: Backend):
    """The decision depends on the batch shapes (which dims broadcast), M, the parameters and, on Metal,
    the K/N size class; not on the KV length itself, so a decode loop reuses one decision."""
    x, w = call.operands["x"], call.operands["w"]
    if x.ndim <= 2 or w.ndim <= 2:
        return None
    bits = call.params["bits"] or (4 if call.params["mode"] in ("mxfp4", "nvfp4") else 8)
    n = w.shape[-2] if call.params["transpose"] else w.shape[-1] * 32 // bits
    batches = tuple(None if a is None else a.shape[:-2] for a in call.operands.values())
    hazard = qmm_hazard_applies(backend, *_mkn(x.shape, n), call.params["transpose"])
    return batches, x.shape[-2], x.dtype, tuple(sorted(call.params.items())), hazard


def _aligned(a: mx.array, ndim: int) -> mx.array:
    return a.reshape((1,) * (ndim - a.ndim) + tuple(a.shape)) if a.ndim < ndim else a


def _first_only(a: mx.array, dims: tuple) -> mx.array:
    """`a` with its broadcast batch dims cut to size 1 (nothing to do in mlx-lm's expand_dims pattern)."""
    if all(a.shape[d] == 1 for d in dims):
        return a
    return a[tuple(slice(0, 1) if d in dims else slice(None) for d in range(a.ndim))]


def fold(call: Call, decision: Decision) -> mx.array:
    dims, batch = decision.params["dims"], decision.params["batch"]
    nb = len(batch)
    x = _aligned(call.operands["x"], nb + 2)
    weights = {k: _first_only(_aligned(call.operands[k], nb + 2), dims) for k in WEIGHTS
               if call.operands.get(k) is not None}
    if decision.params.get("densify"):
        weights = {k: w.reshape(-1).reshape(w.shape) for k, w in weights.items()}  # a view unless it must copy
    keep = [d for d in range(nb) if d not in dims]
    order = keep + list(dims) + [nb, nb + 1]
    moved = order != list(range(nb + 2))  # mlx-lm's pattern folds the dim next to M: no transpose needed
    m, k_dim = x.shape[-2], x.shape[-1]
    folded_sizes = [x.shape[d] for d in dims]
    ones = [1 if d in dims else x.shape[d] for d in range(nb)]  # size 1 where the weights have it
    x_folded = (mx.transpose(x, order) if moved else x).reshape(ones + [math.prod(folded_sizes) * m, k_dim])
    out = call.run_original(x=x_folded, **weights)
    out = out.reshape([out.shape[d] for d in keep] + folded_sizes + [m, out.shape[-1]])
    if moved:
        out = mx.transpose(out, [order.index(d) for d in range(nb + 2)])
    full = tuple(batch) + tuple(out.shape[-2:])
    return out if tuple(out.shape) == full else mx.broadcast_to(out, full)


def copy(call: Call, decision: Decision) -> mx.array:
    batch = decision.params["batch"]
    nb = len(batch)
    weights = {}
    for name, dims in decision.params["operand_dims"].items():
        array = _aligned(call.operands[name], nb + 2)
        for d in dims:
            one = array[tuple(slice(0, 1) if k == d else slice(None) for k in range(array.ndim))]
            array = mx.concatenate([one] * batch[d], axis=d)
        weights[name] = array
    return call.run_original(**weights)


RULE = Rule(
    name=NAME,
    api="quantized_matmul",
    severity="error",
    hazard="quantized_matmul with stride-0 (broadcast) weight batch dims: wrong results on Metal (M >= 2, "
           "vector kernel) and CUDA (every M), or 'No implementation for problem shape' on CUDA",
    match=match,
    rewrites={"fold": fold, "copy": copy},
    doc=__doc__,
    site_key=site_key,
)
