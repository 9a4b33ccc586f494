"""quantized-matmul-cuda-legalise: every quantized_matmul gets a CUDA kernel that accepts it and computes it right.

Hazard: MLX's CUDA dispatch (`qmm_dispatch`) raises "No implementation for problem shape" for any call whose
w, scales or biases are not dense, and runs two defective kernels: `qmm_sm90` is wrong where group_size >= K,
`qmm_sm80` reads past x and w where K is under 3 K-tiles. Calls without a broadcast weight meet them too.

Evidence: H200, MLX 0.32.4 (issue 14): a random 16-layer llama with MHA attention (16 heads, 16 kv heads) and
an 8- or 4-bit KV cache raises "No implementation ... 1x4097x64x16" (head dim 64, prompt 4096) and "...
1x4094x128x16" (head dim 128, prompt 4093), as shipped and wrapped. mlx-lm's `QuantizedKVCache` returns
`keys[..., :offset, :]` of a buffer that grows in steps of 256 rows: a view with holes between the heads
whenever offset is short of the buffer, so the scores (transpose=True, K = head dim) and values
(transpose=False, K = KV length) calls of every decode step, prefill chunk and verification pass have no kernel.
Aligned N does not help: on an H100 the broadcast rule's fold (a call of this kind) raised for sliced caches at
N = 512, 2048 and 4096 alike before it made the weights dense (bench/results/gpu_rules_h100_run1.log).

Rewrites (all exact):
- dense: the same call on weights made dense by a flatten/unflatten pair: a view where they are dense, one copy
  of a sliced cache. No view does: the buffer past the offset is out of reach of what the call receives (MLX
  has no base-array access, and `mx.as_strided` flattens, so copies, a view first), so padding N into the
  cache's own buffer is impossible here, and a split of N is a view with the same holes.
- pad: for a call that the dispatch would send to a defective kernel (qmm_sm90 at group_size >= K: the scores
  call at head dim 64 with group 64, N % 4 == 0; qmm_sm80 at K under 3 tiles with N % 128 == 0: head dim 128
  in half precision), copy the weights with a zero row appended, so that N % 4 != 0, which sends the call to
  qmm_naive (or qmv for M * B < 8), then cut the output to N. The copy is the one `dense` makes of a sliced
  cache, so it costs the same there; the zero row dequantizes to 0 and is cut away. (Slack after x and w, the
  broadcast rule's guard, would copy a sliced cache twice.)
- dequantize: dequantize, then a float matmul, where no kernel accepts even dense weights.

Which one (`legal_route`, over plain facts): on CUDA, a defective kernel: pad; batched weights whose layout is
not known dense (graph inputs: eager mode analyses row-major placeholders of what may be a sliced view, and
compile does not re-check row-major inputs; or strides with holes): dense; else the call is left alone.
2-D weights (linear layers) are taken as dense; in eager mode they never reach the rule (`needs`),
so their defect cases (K <= 128 on sm90, K under 3 tiles on sm80) are fixed by `compile`, which traces them, and
reported by `audit`, not in eager mode.

Must not fire: on CPU and Metal (their kernels copy non-dense weights and accept every shape), unless a
`mlxrewrite doctor` profile measured the call's bucket failed (then dequantize; those buckets are measured on
broadcast weights, so this is caution); on weights broadcast against x (quantized-matmul-broadcast-weights,
which comes first, fixes those); on dense weights with a correct kernel.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, NamedTuple

import mlx.core as mx

from mlxrewrite.backends.device import Backend
from mlxrewrite.core.facts import Facts, Read
from mlxrewrite.core.graph import dtype_name
from mlxrewrite.core.intercept import Call
from mlxrewrite.core.pattern import CallPattern
from mlxrewrite.core.rule import Decision, Decline, Rule

from .qmm_dispatch import cuda_qmm_kernel, cuda_qmm_overreads, cuda_qmm_wrong, dispatch_rows, qmm_mkn, quantization
from .qmm_profile import ORIGINAL, QmmBucket, measured
from .quantized_matmul_broadcast import NAME as BROADCAST, WEIGHTS, dequantize

NAME = "quantized-matmul-cuda-legalise"
PARAMS = ("group_size", "bits", "mode", "transpose")
# Both defective kernels need N % 4 == 0 (qmm_sm90's TMA) or N % 128 == 0 (qmm_sm80): N + 1 meets neither
PAD_ROWS = 1


class Route(NamedTuple):
    """A legalisation: the rewrite, why (free of the exact N, so eager mode may key on it), its parameters."""

    rewrite: str
    reason: str
    params: dict[str, Any]


def legal_route(backend: Backend, dtype: str, x_shape: tuple, w_shape: tuple, params: Mapping[str, Any],
                weights_dense: bool | None = None) -> Route | None:
    """How to run this call on `backend` so that a kernel accepts it and computes it right; None: as written.

    `weights_dense`: True where w, scales and biases are known dense, False where known not, None where
    unknown (graph inputs); unknown batched weights are treated as a possibly sliced cache."""
    x_shape = (1,) * (2 - len(x_shape)) + tuple(x_shape)
    batch = mx.broadcast_shapes(x_shape[:-2], w_shape[:-2])
    if tuple(w_shape[:-2]) != batch:
        return None  # weights broadcast against x: quantized-matmul-broadcast-weights
    if backend.kind != "cuda":
        return _measured_failed(backend, dtype, x_shape, w_shape, params, batch)
    m, k, n = qmm_mkn(x_shape, w_shape, params)
    rows = m * math.prod(batch)
    kernel = cuda_qmm_kernel(backend, dtype, rows, k, params, n)
    if kernel is None:
        return Route("dequantize", f"MLX's CUDA dispatch has no kernel for {_facts(dtype, k, params)}",
                     _dequantize_params(batch))
    defect = cuda_qmm_wrong(backend, dtype, rows, k, params, n) or cuda_qmm_overreads(backend, dtype, rows, k,
                                                                                       params, n)
    if defect:
        padded = cuda_qmm_kernel(backend, dtype, rows, k, params, n + PAD_ROWS)
        return Route("pad", f"{defect}; a zero row appended to the weights (N % 4 != 0) so that {padded} runs, "
                            "the output cut back to N", _dequantize_params(batch))
    sliced = weights_dense is False or (weights_dense is None and len(w_shape) > 2)
    if sliced:
        why = "have holes" if weights_dense is False else "may be a view with holes (a sliced KV cache)"
        return Route("dense", f"{kernel} needs dense weights and these {why}: made dense (a view if they are)",
                     _dequantize_params(batch))
    return None


def _facts(dtype: str, k: int, params: Mapping[str, Any]) -> str:
    mode, bits, group_size = quantization(params)
    return f"{dtype} x, K={k}, transpose={bool(params['transpose'])}, {bits} bits, group {group_size}, {mode}"


def _dequantize_params(batch: tuple) -> dict[str, Any]:
    """What the broadcast rule's dequantize needs: the output batch, and no broadcast dims to cut (every route
    carries them, so that a measurement may force dequantize anywhere)."""
    return {"batch": batch, "operand_dims": {"w": ()}}


def _measured_failed(backend: Backend, dtype: str, x_shape: tuple, w_shape: tuple, params: Mapping[str, Any],
                     batch: tuple) -> Route | None:
    """The doctor hook for CPU and Metal: dequantize where a profile measured the call's bucket failing."""
    profile = measured(backend.profile, BROADCAST)  # the doctor probes the broadcast rule's calls
    if profile is None or len(w_shape) <= 2:  # ... on batched weights only
        return None
    bucket = QmmBucket.of(dtype, x_shape, w_shape, params)
    verdict = profile.verdicts.get(bucket)
    if verdict is None or not verdict.ways[ORIGINAL].failed:
        return None
    return Route("dequantize", f"`mlxrewrite doctor` measured {bucket.label()} as shipped: "
                               f"{verdict.ways[ORIGINAL].status} ({backend.profile.device})", _dequantize_params(batch))


def guard(facts: Facts) -> Decision | Decline:
    route = facts.derive("route", _route, Read("backend"), Read("dtype", "x"), Read("shape", "x"), Read("shape", "w"),
                         *(Read("param", k) for k in PARAMS), *(Read("dense", k) for k in WEIGHTS))
    if route is None:
        return Decline(NAME, "a kernel accepts the call and computes it right (or the weights broadcast)")
    return Decision(NAME, route.rewrite, route.reason, route.params)


def _route(backend: Backend, dtype: mx.Dtype, x_shape: tuple, w_shape: tuple, *rest: Any) -> Route | None:
    """`legal_route` of the call: a result free of the KV length (eager mode keys on it). On CUDA it is
    computed once per shape class (`_kv_length_free`)."""
    params, dense_flags = dict(zip(PARAMS, rest[:len(PARAMS)])), rest[len(PARAMS):]
    known = [d for d in dense_flags if d is not None]
    weights_dense = False if False in known else (True if len(known) == len(dense_flags) else None)
    if backend.kind == "cuda":
        return _keyed_route(backend, dtype, *_kv_length_free(x_shape, w_shape, params), tuple(params.items()),
                            weights_dense)
    return legal_route(backend, dtype_name(dtype), x_shape, w_shape, params, weights_dense)


def _kv_length_free(x_shape: tuple, w_shape: tuple, params: Mapping[str, Any]) -> tuple[tuple, tuple]:
    """The shapes with the weights' rows (the KV length of attention) replaced by what the route reads of them:
    N of a transposed call as the dispatch sees it (`dispatch_rows`); K of an untransposed call not at all
    (only qmm_naive takes those, for any K)."""
    rows = dispatch_rows(w_shape[-2]) if params["transpose"] else 1
    x_shape = x_shape if params["transpose"] else (*x_shape[:-1], rows)
    return x_shape, (*w_shape[:-2], rows, w_shape[-1])


@functools.lru_cache(maxsize=1024)  # eager mode asks per call; these shape classes are few
def _keyed_route(backend: Backend, dtype: mx.Dtype, x_shape: tuple, w_shape: tuple, params: tuple,
                 weights_dense: bool | None) -> Route | None:
    return legal_route(backend, dtype_name(dtype), x_shape, w_shape, dict(params), weights_dense)


def _weights(call: Call) -> dict[str, mx.array]:
    return {k: a for k in WEIGHTS if (a := call.operands.get(k)) is not None}


def dense(call: Call, decision: Decision) -> mx.array:
    return call.run_original(**{k: a.reshape(-1).reshape(a.shape) for k, a in _weights(call).items()})


def pad(call: Call, decision: Decision) -> mx.array:
    n = call.operands["w"].shape[-2]  # transposed: the defective kernels run only then
    padded = {k: mx.concatenate([a, mx.zeros((*a.shape[:-2], PAD_ROWS, a.shape[-1]), a.dtype)], axis=-2)
              for k, a in _weights(call).items()}
    return call.run_original(**padded)[..., :n]


RULE = Rule(
    name=NAME,
    severity="error",
    hazard="quantized_matmul that MLX's CUDA dispatch rejects ('No implementation for problem shape': weights "
           "not dense, e.g. a sliced quantized KV cache) or sends to a defective kernel (qmm_sm90 wrong at "
           "group_size >= K, qmm_sm80 reading past x and w at K under 3 tiles)",
    pattern=CallPattern("quantized_matmul"),
    guard=guard,
    rewrites={"dense": dense, "pad": pad, "dequantize": dequantize},
    doc=__doc__,
    needs={"w": 3},  # 2-D weights (linear layers: parameters, dense) pass straight through in eager mode
)
