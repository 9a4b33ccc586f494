"""quantized-matmul-broadcast-weights: no quantized matmul kernel may see a stride-0 weight batch dim.

Hazard: `mx.quantized_matmul(x, w, scales, biases)` where a batch dim of w/scales/biases has stride 0:
an explicit `mx.broadcast_to`, or (the GQA quantized-KV pattern of mlx-lm) `mx.expand_dims(k, -3)` that
MLX broadcasts against queries shaped (B, n_kv, n_rep, M, D).

Evidence: Metal's vector kernels (M below `get_qmv_batch_limit`) read wrong memory for M >= 2 (MLX
#3480: errors up to 12.5 in real logits). CUDA (MLX 0.32.4, H100): every kernel uses weight matrix 0
for every batch of a broadcast weight, wrong for every M (max error ~100 on unit data), and
"No implementation for problem shape" for sliced (unaligned-length) caches. See bench/results/.

Rewrites (all exact: the same dot products, only the batching or the kernel differs):
- fold: index the stride-0 dims away and move the matching batch dims of x into M, so the kernel
  multiplies the un-broadcast weights by a taller x (less memory traffic: 1.1-2.8x faster on H100).
  On CUDA, whose kernels need dense weights, the un-broadcast weights are made dense first with a
  flatten/unflatten pair: a free view when they already are, one copy (1/n_rep of copy's) when they
  are a sliced cache.
- copy: materialise the weights with `mx.concatenate` along the broadcast dims (the upstream-proposed
  fix, slower). Chosen when fold cannot apply: a dim is stride 0 in some of w/scales/biases but not all.
- dequantize: dequantize the weights (broadcast dims cut to size 1), then a float matmul in x's dtype.
  No quantized kernel runs, so it serves shapes the backend's quantized kernels reject.

Fold and copy also guard a second CUDA defect (`qmm_dispatch.cuda_qmm_overreads`): for K under 3 K-tiles (the
scores call at head dim 64 or 128) MLX's `qmm_sm80` kernel reads up to two tiles past the end of x and w,
which killed an H100 process ("unspecified launch failure"; compute-sanitizer names the reads). There the
x and weights they pass get 1 KiB of zeros after their last element (one copy of the weights where fold would
not copy them). The numbers are unchanged: the kernel never uses what it reads there.

Which one (`qmm_route`, docs/doctor.md): where MLX's CUDA kernel for the call's K and group size is
wrong for every layout (`qmm_sm90` at group_size >= K, H100), dequantize; where `mlxrewrite doctor` measured
the call's bucket on this device and MLX version, the fastest rewrite that was correct there, then
dequantize; elsewhere fold (copy when fold cannot apply).

Must not fire: weights without a stride-0 batch dim (equal batch dims, 2-D weights), x or w of rank
2 (MLX does not broadcast then), and on Metal when M selects the matrix kernel, which is correct, unless
a profile measured that bucket wrong. A profile never stops the rule where the source facts see a hazard.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import mlx.core as mx
import numpy as np

from mlxrewrite.backends.device import NOT_MEASURED, Backend, Measured
from mlxrewrite.core.facts import Facts, Read
from mlxrewrite.core.graph import dtype_name
from mlxrewrite.core.intercept import Call
from mlxrewrite.core.layout import broadcast_strides, stride0_batch_dims
from mlxrewrite.core.pattern import CallPattern
from mlxrewrite.core.rule import Decision, Decline, Rule

from .qmm_dispatch import cuda_qmm_overreads, cuda_qmm_wrong, needs_dense_weights, qmm_hazard_applies, qmm_mkn
from .qmm_profile import ORIGINAL, SOURCE_WAYS, QmmBucket, measured

NAME = "quantized-matmul-broadcast-weights"
WEIGHTS = ("w", "scales", "biases")
SLACK_BYTES = 1024  # >= 2 K-tiles of 128 columns of float16 x (512 B) or of 8-bit w (256 B)


def guard(facts: Facts) -> Decision | Decline:
    if facts.ndim("x") <= 2 or facts.ndim("w") <= 2:
        return Decline(NAME, "x or w is 2-D: MLX does not broadcast the weights")
    weights = tuple(k for k in WEIGHTS if facts.present(k))
    batch, zero = facts.derive("broadcast weight dims", _broadcast_dims, *_layout_questions(weights))
    params = {k: facts.param(k) for k in ("group_size", "bits", "mode", "transpose")}
    backend = facts.backend
    (m,) = facts.dims("x", -2)
    slack = facts.derive("slack", _slack, Read("backend"), Read("dtype", "x"), Read("shape", "x"), Read("shape", "w"),
                         *(Read("param", k) for k in params))
    decision_params = rewrite_params(backend, batch, zero, slack)
    dims = decision_params["dims"]
    if not dims:
        return Decline(NAME, "no weight batch dim has stride 0")
    foldable = all(zero[k] == dims for k in weights)
    route = facts.derive("route", _route, Read("backend"), Read("dtype", "x"), Read("shape", "x"), Read("shape", "w"),
                         *(Read("param", k) for k in params))
    rewrite = route.choose(foldable)
    if rewrite is None:
        return Decline(NAME, f"batch dims {dims} of the weights have stride 0, but {route.why}; left as written")
    how = {
        "fold": f"fold dims {dims} into M={m}" + (" (weights made dense first)" if decision_params["densify"] else ""),
        "copy": "copy" + ("" if foldable else ": not every weight operand is broadcast on those dims"),
        "dequantize": "dequantize the weights, then a float matmul",
    }[rewrite]
    if decision_params["slack"] and rewrite != "dequantize":
        how += f"; x and weights get {SLACK_BYTES} B of slack ({decision_params['slack']})"
    seen = ", ".join(f"{k} strides {_kernel_strides(facts, k, batch)}" for k in weights)
    return Decision(NAME, rewrite, f"batch dims {dims} of the weights have stride 0 ({seen}); {route.why}; {how}",
                    decision_params)


def _kernel_strides(facts: Facts, name: str, batch: tuple) -> tuple:
    """The strides the kernel sees for weight operand `name` (for the message: not a fact of the decision)."""
    shape = facts.peek("shape", name)
    return broadcast_strides(shape, facts.peek("strides", name), batch + shape[-2:])


def _layout_questions(weights: tuple[str, ...]) -> tuple[Read, ...]:
    return (Read("shape", "x"), *(Read(kind, k) for k in weights for kind in ("shape", "strides")))


def _broadcast_dims(x_shape: tuple, *layouts: tuple) -> tuple[tuple, dict[str, tuple]]:
    """(the output's batch shape, each weight operand's stride-0 batch dims as the kernel sees them): the
    facts the decision needs, free of the KV length, so eager mode reuses one decision along a decode."""
    shapes, strides = layouts[0::2], layouts[1::2]
    batch = tuple(np.broadcast_shapes(x_shape[:-2], *(s[:-2] for s in shapes)))
    zero = {name: stride0_batch_dims(batch + shape[-2:], broadcast_strides(shape, stride, batch + shape[-2:]))
            for name, shape, stride in zip(WEIGHTS, shapes, strides)}
    return batch, zero


def _route(backend: Backend, dtype: mx.Dtype, x_shape: tuple, w_shape: tuple, *params: Any):
    return qmm_route(backend, dtype_name(dtype), x_shape, w_shape,
                     dict(zip(("group_size", "bits", "mode", "transpose"), params)))


def _slack(backend: Backend, dtype: mx.Dtype, x_shape: tuple, w_shape: tuple, *params: Any) -> str | None:
    """Why the quantized call needs slack after x and w (None: it does not); K is the KV length in the values
    call, so this is derived, and the eager key holds the answer, not K."""
    batch = tuple(np.broadcast_shapes(x_shape[:-2], w_shape[:-2]))
    return cuda_qmm_overreads(backend, dtype_name(dtype), math.prod(batch) * x_shape[-2], x_shape[-1],
                              dict(zip(("group_size", "bits", "mode", "transpose"), params)))


def rewrite_params(backend: Backend, batch: tuple, operand_dims: dict[str, tuple], slack: str | None) -> dict:
    """What every rewrite needs: the output batch shape, each weight operand's stride-0 dims, whether fold
    must make the weights dense, and why the quantized call needs slack after its buffers, if it does (also
    the doctor's way to force a rewrite on a probe)."""
    dims = tuple(sorted(set().union(*operand_dims.values())))
    return {"dims": dims, "batch": batch, "operand_dims": operand_dims, "densify": needs_dense_weights(backend),
            "slack": slack}


def _aligned(a: mx.array, ndim: int) -> mx.array:
    return a.reshape((1,) * (ndim - a.ndim) + tuple(a.shape)) if a.ndim < ndim else a


def _with_slack(a: mx.array) -> mx.array:
    """`a`, row-major, as a view of a buffer with SLACK_BYTES of zeros after its last element (one copy)."""
    pad = mx.zeros((-(-SLACK_BYTES // a.itemsize),), a.dtype)
    return mx.concatenate([a.reshape(-1), pad])[: a.size].reshape(a.shape)


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
    if decision.params.get("slack"):  # x, w: what qmm_sm80 reads past; scales and biases it does not
        weights["w"] = _with_slack(weights["w"])
    keep = [d for d in range(nb) if d not in dims]
    order = keep + list(dims) + [nb, nb + 1]
    moved = order != list(range(nb + 2))  # mlx-lm's pattern folds the dim next to M: no transpose needed
    m, k_dim = x.shape[-2], x.shape[-1]
    folded_sizes = [x.shape[d] for d in dims]
    ones = [1 if d in dims else x.shape[d] for d in range(nb)]  # size 1 where the weights have it
    x_folded = (mx.transpose(x, order) if moved else x).reshape(ones + [math.prod(folded_sizes) * m, k_dim])
    if decision.params.get("slack"):
        x_folded = _with_slack(x_folded)
    out = call.run_original(x=x_folded, **weights)
    out = out.reshape([out.shape[d] for d in keep] + folded_sizes + [m, out.shape[-1]])
    if moved:
        out = mx.transpose(out, [order.index(d) for d in range(nb + 2)])
    return _to_batch(out, batch)


def _to_batch(out: mx.array, batch: tuple) -> mx.array:
    """`out` broadcast to the original call's batch shape, which may exceed both x's and the cut weights'."""
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
    if decision.params.get("slack"):
        return call.run_original(x=_with_slack(call.operands["x"]), **{**weights, "w": _with_slack(weights["w"])})
    return call.run_original(**weights)


def dequantize(call: Call, decision: Decision) -> mx.array:
    batch = decision.params["batch"]
    nb = len(batch)
    common = tuple(set.intersection(*(set(d) for d in decision.params["operand_dims"].values())))
    weights = [None if call.operands.get(k) is None else _first_only(_aligned(call.operands[k], nb + 2), common)
               for k in WEIGHTS]
    x, p = call.operands["x"], call.params
    w = mx.dequantize(*weights, group_size=p["group_size"], bits=p["bits"], mode=p["mode"]).astype(x.dtype)
    return _to_batch(x @ (mx.swapaxes(w, -1, -2) if p["transpose"] else w), batch)


# ---- the decision --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class QmmRoute:
    """How to run one broadcast quantized_matmul call: ways in order of preference, and why. Hashable and
    free of exact KV lengths, so eager mode keys its cached decisions on it (equal routes, equal decisions)."""

    ways: tuple[str, ...]  # ORIGINAL (leave the call) or rewrite names; always holds one that is not "fold"
    why: str

    def choose(self, foldable: bool) -> str | None:
        """The first way that applies (fold needs every weight operand broadcast on the same dims); None:
        leave the call as written."""
        way = next(w for w in self.ways if foldable or w != "fold")
        return None if way == ORIGINAL else way


def qmm_route(backend: Backend, dtype: str, x_shape: tuple, w_shape: tuple, params: Mapping[str, Any]) -> QmmRoute:
    """The source-derived hazard, refined by the profile where it measured the call's bucket.

    A measurement may only add caution and pick among correct rewrites: the call is left as written only
    where the source facts call the kernel right and the profile measured it right too (leaving a call
    alone is the one choice whose correctness rests on a bucket's probes standing for all its shapes, and
    on CPU the rule rewrites on purpose, so that CPU audits show what GPUs need). Elsewhere it takes the
    fastest rewrite measured correct, then dequantize. Where the bucket was not measured: fold, or copy, less
    the rewrites that failed in the bucket's kernel family (then dequantize)."""
    hazardous, why = qmm_hazard_applies(backend, *qmm_mkn(x_shape, w_shape, params), bool(params["transpose"]))
    rows = math.prod(x_shape[:-1]) * math.prod(w_shape[:-2])  # > 1 exactly where M times the batch count is
    wrong = cuda_qmm_wrong(backend, dtype, rows, x_shape[-1], params)
    if wrong:  # no measurement of a bucket stands against a kernel that is wrong for every layout
        return QmmRoute(("dequantize",), f"{why}; {wrong}")
    profile = measured(backend.profile, NAME)
    if profile is None:
        return QmmRoute(SOURCE_WAYS if hazardous else (ORIGINAL,), why)
    bucket = QmmBucket.of(dtype, x_shape, w_shape, params)
    ways, measurement = profile.hazard_ways(bucket)
    verdict = profile.verdicts.get(bucket)
    shipped = verdict.ways[ORIGINAL] if verdict is not None else Measured(NOT_MEASURED)
    # measured: it must have been right; not measured: the source facts stand unless a probe found it wrong
    shipped_right = shipped.ok if verdict is not None and verdict.complete else not shipped.failed
    if not hazardous and shipped_right:
        return QmmRoute((ORIGINAL,), f"{why}; {measurement}")
    return QmmRoute(ways, f"{why}; {measurement}")


RULE = Rule(
    name=NAME,
    severity="error",
    hazard="quantized_matmul with stride-0 (broadcast) weight batch dims: wrong results on Metal (M >= 2, "
           "vector kernel) and CUDA (every M), or 'No implementation for problem shape' on CUDA",
    pattern=CallPattern("quantized_matmul"),
    guard=guard,
    rewrites={"fold": fold, "copy": copy, "dequantize": dequantize},
    doc=__doc__,
    needs={"x": 3, "w": 3},  # rank-2 x or w: MLX does not broadcast (linear layers pass straight through)
    probes="mlxrewrite.rules.qmm_probes",
)
