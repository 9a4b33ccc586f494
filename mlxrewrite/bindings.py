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
class Replayed:
    node: Node
    sources: tuple["Source", ...]


Source = Union[FromCall, FromInput, FromConstant, Replayed]
CallOperands = Callable[[str], "FromCall | None"]


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
    if value.kind == "constant" or not graph.depends_on_inputs(name):
        array = evaluate(graph, name)
        if array is None:
            raise Unreachable(f"{value.type_str} {name} is a constant this pass cannot evaluate")
        if constant_limit is not None and array.size > constant_limit:
            raise Unreachable(f"{value.type_str} {name} is a constant built from this call's shapes; eager mode "
                              "cannot reuse it for other calls")
        return FromConstant(array)
    node = graph.producer(name)
    if node is None or node.op not in EVALUATORS or len(node.outputs) != 1 or depth >= REPLAY_LIMIT:
        raise Unreachable(f"{value.type_str} {name} is computed by {node.op if node else 'nothing'} inside the "
                          "function, not by an intercepted call, an input or a view of one")
    return Replayed(node, tuple(resolve(graph, i, from_calls, depth + 1, constant_limit) for i in node.inputs))


def materialise(source: Source, calls: list, inputs: list[mx.array]) -> mx.array:
    """The array of `source`, given the run's intercepted calls (by plan position) and inputs."""
    if isinstance(source, FromCall):
        return calls[source.index].operands[source.operand]
    if isinstance(source, FromInput):
        return inputs[source.position]
    if isinstance(source, FromConstant):
        return source.array
    node = source.node
    xs = [materialise(s, calls, inputs) for s in source.sources]
    if node.op == "Arange":
        return mx.arange(*node.args)
    return EVALUATORS[node.op](node, xs)
