"""Constant facts: evaluate the part of the graph that does not depend on the inputs, once.

A value is constant when none of its ancestors is a graph input (captured arrays that were not declared
as `inputs=` state count as constants, exactly as `mx.compile` bakes them in). Its value is computed by
re-running its producer chain with MLX's own ops (so the numbers are MLX's), for the primitives listed
in `EVALUATORS`; anything else makes the value "unknown", and rules treat unknown as "do not fire".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import networkx as nx

from .graph import Graph, Node

MAX_ELEMENTS = 1 << 26  # never materialise a constant larger than this (~64M elements) for a summary


@dataclass(frozen=True)
class ConstSummary:
    """What a rule may need to know about a constant value."""

    all_true: bool  # every element is nonzero (a bool mask that keeps everything)
    all_zero: bool  # every element is zero (an additive mask that changes nothing)
    min: float
    max: float
    preview: tuple | None  # the values, when there are at most 8
    source: str = "constant"  # how it is known: "constant" (proved from the graph) or "runtime check"

    def __str__(self) -> str:
        if self.preview is not None:
            return f"const {list(self.preview)}"
        if self.all_true and self.min == self.max:
            return f"const all={self.min:g}"
        return f"const in [{self.min:g}, {self.max:g}]"


def _binary(fn: Callable) -> Callable:
    return lambda node, xs: fn(xs[0], xs[1])


_BITWISE = {0: mx.bitwise_and, 1: mx.bitwise_or, 2: mx.bitwise_xor, 3: mx.left_shift, 4: mx.right_shift}

EVALUATORS: dict[str, Callable[[Node, list[mx.array]], mx.array]] = {
    "Broadcast": lambda node, xs: mx.broadcast_to(xs[0], node.args[0]),
    "Full": lambda node, xs: xs[0],
    "Copy": lambda node, xs: xs[0],
    "StopGradient": lambda node, xs: xs[0],
    "ExpandDims": lambda node, xs: mx.expand_dims(xs[0], node.args[0]),
    "Squeeze": lambda node, xs: mx.squeeze(xs[0], node.args[0]),
    "Reshape": lambda node, xs: mx.reshape(xs[0], node.args[0]),
    "Flatten": lambda node, xs: mx.flatten(xs[0], node.args[0], node.args[1]),
    "Unflatten": lambda node, xs: mx.unflatten(xs[0], node.args[0], node.args[1]),
    "Transpose": lambda node, xs: mx.transpose(xs[0], node.args[0]),
    "Slice": lambda node, xs: xs[0][tuple(slice(a, b, c) for a, b, c in zip(*node.args))],
    "AsType": lambda node, xs: xs[0].astype(node.args[0]),
    "Arange": lambda node, xs: mx.arange(*node.args),
    "Concatenate": lambda node, xs: mx.concatenate(xs, axis=node.args[0]),
    "Select": lambda node, xs: mx.where(*xs),
    "LogicalNot": lambda node, xs: mx.logical_not(xs[0]),
    "Negative": lambda node, xs: -xs[0],
    "Abs": lambda node, xs: mx.abs(xs[0]),
    "BitwiseBinary": lambda node, xs: _BITWISE[node.args[0]](xs[0], xs[1]),
    "Add": _binary(mx.add),
    "Subtract": _binary(mx.subtract),
    "Multiply": _binary(mx.multiply),
    "Divide": _binary(mx.divide),
    "Maximum": _binary(mx.maximum),
    "Minimum": _binary(mx.minimum),
    "Equal": _binary(mx.equal),
    "NotEqual": _binary(mx.not_equal),
    "Less": _binary(mx.less),
    "LessEqual": _binary(mx.less_equal),
    "Greater": _binary(mx.greater),
    "GreaterEqual": _binary(mx.greater_equal),
    "LogicalAnd": _binary(mx.logical_and),
    "LogicalOr": _binary(mx.logical_or),
}


def evaluate(graph: Graph, name: str) -> mx.array | None:
    """The value of `name` if it is constant and computable here, else None."""
    value = graph.values[name]
    if value.kind == "constant":
        return value.data
    if value.kind == "input" or graph.depends_on_inputs(name):
        return None
    needed = {key for key in nx.ancestors(graph.nx, name) if graph.nx.nodes[key]["kind"] == "op"}
    cache: dict[str, mx.array] = {}
    for node in graph.nodes:  # tape order: producers come first
        if node.key not in needed:
            continue
        if not all(n in cache or graph.values[n].kind == "constant" for n in node.inputs):
            continue
        evaluator = EVALUATORS.get(node.op)
        outs = [graph.values[n] for n in node.outputs]
        if evaluator is None or len(outs) != 1 or outs[0].shape and _numel(outs[0].shape) > MAX_ELEMENTS:
            continue
        xs = [cache.get(n, graph.values[n].data) for n in node.inputs]
        try:
            result = evaluator(node, xs) if node.op != "Arange" else mx.arange(*node.args, dtype=outs[0].dtype)
        except (ValueError, TypeError, IndexError, RuntimeError):
            continue
        out = outs[0]
        if tuple(result.shape) != out.shape or result.dtype != out.dtype:
            continue  # our replay does not match the tracer: do not trust it
        cache[out.name] = result
    return cache.get(name)


def summarize(graph: Graph, name: str) -> ConstSummary | None:
    """Summary of a constant value (cached on the Value), or None if not provably constant."""
    value = graph.values[name]
    if value.constant is not None:
        return value.constant
    array = evaluate(graph, name)
    if array is None:
        return None
    value.constant = summarize_array(array)
    return value.constant


def summarize_array(array: mx.array, source: str = "constant") -> ConstSummary:
    """Summary of a concrete array (evaluates it: one synchronisation)."""
    as_float = array.astype(mx.float32)
    empty = array.size == 0
    stats = mx.stack([mx.all(array != 0), mx.all(array == 0), mx.min(as_float) if not empty else mx.array(0.0),
                      mx.max(as_float) if not empty else mx.array(0.0)]).astype(mx.float32).tolist()
    return ConstSummary(all_true=bool(stats[0]), all_zero=bool(stats[1]), min=stats[2], max=stats[3],
                        preview=tuple(array.reshape(-1).tolist()) if array.size <= 8 else None, source=source)


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total
