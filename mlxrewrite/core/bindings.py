"""Bindings: how a subgraph rewrite gets the arrays of its placeholders when the function runs.

A match names graph values; the rewrite needs arrays. Each placeholder's value is recovered, in order of
preference, as an operand of an intercepted call that ran before the anchor (the `Call` holds it), an
input of the traced function (an argument or declared state), a constant (evaluated once, when planned),
or a view or elementwise step over those that `constants.EVALUATORS` replays with MLX's own ops
(mlx-lm's `reshape(queries * scale)`, a `broadcast_to` of a mask). A value that is none of these is
computed by code the lowering cannot reach: the rule declines there, saying which value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

import mlx.core as mx

from .constants import EVALUATORS, evaluate
from .graph import Graph, Node

REPLAY_LIMIT = 8  # primitives replayed per placeholder: more means the placeholder is not a view of an input


@dataclass(frozen=True)
class FromCall:
    index: int  # the intercepted call's position in the plan
    operand: str


@dataclass(frozen=True)
class FromInput:
    position: int  # in the traced graph's inputs (arguments, then state)


@dataclass(frozen=True)
class FromConstant:
    array: mx.array


@dataclass(frozen=True)
class FromAnchor:
    """The rewrite's own result (a region's output is a view of it: mlx-lm reshapes it back to the heads)."""


@dataclass(frozen=True)
class Replayed:
    node: Node
    sources: tuple["Source", ...]
    in_shape: tuple[int, ...] = ()  # the first input's shape when planned (a broadcast keeps dims that tracked it)


Source = Union[FromCall, FromInput, FromConstant, FromAnchor, Replayed]
CallOperands = Callable[[str], "FromCall | FromAnchor | None"]


class Unreachable(Exception):
    """The value is computed by code the lowering cannot reach."""


def resolve(graph: Graph, name: str, from_calls: CallOperands = lambda name: None, depth: int = 0,
            constant_limit: int | None = None) -> Source:
    """Where the array of graph value `name` comes from at run time (raises `Unreachable`).

    `constant_limit`: the largest constant that may be baked in. Eager mode reuses one region's analysis for
    later calls of other shapes, so it bakes in scalars only (a fill value); a larger constant (a causal
    mask built from the first call's length) would be stale."""
    found = from_calls(name)
    if found is not None:
        return found
    if name in graph.inputs:
        return FromInput(graph.inputs.index(name))
    value = graph.values[name]
    node = graph.producer(name)
    if value.kind != "constant" and node is not None and node.op in EVALUATORS and len(node.outputs) == 1 \
            and depth < REPLAY_LIMIT:
        try:  # a view of what the run has (a call's operand broadcast by the kernel) beats a baked-in copy
            return Replayed(node, tuple(resolve(graph, i, from_calls, depth + 1, constant_limit) for i in node.inputs),
                            graph.values[node.inputs[0]].shape if node.inputs else ())
        except Unreachable:
            if graph.depends_on_inputs(name):
                raise
    if graph.depends_on_inputs(name):
        raise Unreachable(f"{value.type_str} {name} is computed by {node.op if node else 'nothing'} inside the "
                          "function, not by an intercepted call, an input or a view of one")
    array = evaluate(graph, name)
    if array is None:
        raise Unreachable(f"{value.type_str} {name} is a constant this pass cannot evaluate")
    if constant_limit is not None and array.size > constant_limit:
        raise Unreachable(f"{value.type_str} {name} is a constant built from this call's shapes; eager mode "
                          "cannot reuse it for other calls")
    return FromConstant(array)


def materialise(source: Source, calls: list, inputs: list[mx.array], anchor: mx.array | None = None) -> mx.array:
    """The array of `source`, given the run's intercepted calls (by plan position), inputs and the rewrite's
    result (`anchor`)."""
    if isinstance(source, FromAnchor):
        return anchor
    if isinstance(source, FromCall):
        return calls[source.index].operands[source.operand]
    if isinstance(source, FromInput):
        return inputs[source.position]
    if isinstance(source, FromConstant):
        return source.array
    node = source.node
    xs = [materialise(s, calls, inputs, anchor) for s in source.sources]
    if node.op == "Broadcast":
        return mx.broadcast_to(xs[0], _broadcast_shape(node.args[0], source.in_shape, xs[0].shape))
    return EVALUATORS[node.op](node, xs)


def view_root(source: Source) -> Source:
    """`source` less the broadcasts and expand_dims on top of it."""
    while isinstance(source, Replayed) and source.node.op in ("Broadcast", "ExpandDims"):
        source = source.sources[0]
    return source


def _broadcast_shape(planned: tuple, planned_in: tuple, now_in: tuple) -> tuple:
    """The planned broadcast target, except that dims where it followed its input follow the input now: eager
    mode replays a region's broadcasts for other KV lengths (and checks this when it analyses)."""
    lead = len(planned) - len(planned_in)
    return (*planned[:lead], *(now if was == want else want
                               for was, want, now in zip(planned_in, planned[lead:], now_in)))
