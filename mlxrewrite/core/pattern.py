"""Patterns: what a rule looks for, written as plain MLX code, and the structural matcher.

Two kinds, as in torch.fx's `replace_pattern` / Inductor's `register_replacement`:
- `CallPattern(api)`: one intercepted API call (`mx.quantized_matmul`, ...). Its placeholders are the
  call's operand names; it matches every recorded call of that API.
- `GraphPattern(fn, example)`: ordinary MLX code over placeholder operands, traced once with MLX's
  exporter (on `example()`'s arrays), and matched on a traced graph as a connected subgraph: primitive
  names and edges, anchored at the pattern's output. Arguments of primitives are not compared (guards
  read them as facts), so one pattern serves every shape, group size and bit width.

Matching rules, each there because MLX's exporter writes graphs that way:
- a placeholder binds to any value, the same placeholder always to the same one;
- a `Broadcast` in the pattern may be absent in the graph (the example's shapes needed it, the user's
  did not), and a placeholder absorbs any producer chain in the graph, so broadcasts that the user's
  shapes insert (a (B, 1, M, N) mask) bind to the placeholder with their stride-0 layout;
- `Add` and `Multiply` match in either operand order;
- a value inside the match (not the output) may have no consumer outside it, or the rewrite would
  remove a value the rest of the function still uses.
A failed match returns `FailedMatch(reason)`, which rules turn into a `Decline` that explain() shows.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Callable, Iterator

import mlx.core as mx

from .graph import Graph, Node

COMMUTATIVE = frozenset({"Add", "Multiply"})
OPTIONAL = frozenset({"Broadcast"})


@dataclass(frozen=True)
class CallPattern:
    """One intercepted call of `api`; placeholders are its operand names."""

    api: str

    @property
    def anchor_api(self) -> str:
        return self.api


@dataclass
class Match:
    """Where a pattern matched: placeholder -> graph value, pattern op -> graph node, and the anchor (the
    graph node computing the pattern's output, where the rewrite takes over)."""

    bindings: dict[str, str | None]
    nodes: dict[str, Node]
    anchor: Node

    def node_args(self) -> dict[str, tuple]:
        """Arguments of each matched primitive by op name, in the pattern's order: "QuantizedMatmul" for the
        first, "QuantizedMatmul#2" for the second of an op."""
        args: dict[str, tuple] = {}
        for key in sorted(self.nodes, key=lambda key: int(key[2:])):
            node = self.nodes[key]
            label = node.op if node.op not in args else f"{node.op}#{sum(k.split('#')[0] == node.op for k in args) + 1}"
            args[label] = node.args
        return args


@dataclass(frozen=True)
class FailedMatch:
    reason: str

    def __bool__(self) -> bool:
        return False


@dataclass(eq=False)
class GraphPattern:
    """A connected subgraph written as MLX code; `anchor_api` is the intercepted API computing its output
    (the call at which the rewrite runs)."""

    fn: Callable[..., mx.array]
    example: Callable[[], tuple]
    anchor_api: str
    name: str = ""
    _graph: Graph | None = field(default=None, repr=False)

    @property
    def graph(self) -> Graph:
        """The pattern's own graph, traced on first use (once per process)."""
        if self._graph is None:
            from .trace import trace_call

            self._graph = trace_call(self.fn, tuple(self.example()), {}, record_sites=False)
        return self._graph

    @functools.cached_property
    def placeholders(self) -> dict[str, str]:
        """Placeholder (the function's parameter) name -> the pattern graph's input value name."""
        names = list(inspect.signature(self.fn).parameters)
        return dict(zip(names, self.graph.inputs))

    def match(self, graph: Graph, anchor: Node) -> Match | FailedMatch:
        """Match with the pattern's output computed by `anchor`."""
        pattern = self.graph
        out = pattern.outputs[0]
        head = pattern.producer(out)
        if head is None or head.op != anchor.op:
            return FailedMatch(f"{anchor.op} is not the pattern's {head.op if head else 'output'}")
        failures: list[str] = []
        for state in _match_value(pattern, graph, out, anchor.outputs[0], _State(), failures):
            leak = _leaking_value(pattern, graph, state, anchor)
            if leak:
                failures.append(leak)
                continue
            names = {v: k for k, v in self.placeholders.items()}
            bindings = {names[p]: g for p, g in state.bindings.items() if p in names}
            bindings.update({k: None for k in self.placeholders if k not in bindings})
            return Match(bindings, state.nodes, anchor)
        return FailedMatch(failures[-1] if failures else "no match")


@dataclass(frozen=True)
class _State:
    bindings: dict = field(default_factory=dict)  # pattern input value -> graph value
    nodes: dict = field(default_factory=dict)  # pattern op key -> graph node

    def bind(self, p: str, g: str) -> "_State":
        return _State({**self.bindings, p: g}, self.nodes)

    def visit(self, key: str, node: Node) -> "_State":
        return _State(self.bindings, {**self.nodes, key: node})


def _match_value(pattern: Graph, graph: Graph, p: str, g: str, state: _State, failures: list[str]) -> Iterator[_State]:
    pv = pattern.values[p]
    if pv.kind == "input":
        if p in state.bindings and state.bindings[p] != g:
            failures.append(f"one placeholder would bind two values ({state.bindings[p]}, {g})")
            return
        yield state.bind(p, g)
        return
    if pv.kind == "constant":
        gv = graph.values[g]
        if gv.kind == "constant" and gv.shape == pv.shape and bool(mx.array_equal(gv.data, pv.data)):
            yield state
        else:
            failures.append(f"{g} is not the pattern's constant")
        return
    pn = pattern.producer(p)
    gn = graph.producer(g)
    if pn.op in OPTIONAL and (gn is None or gn.op != pn.op):
        yield from _match_value(pattern, graph, pn.inputs[0], g, state, failures)
        return
    if gn is None:
        failures.append(f"{g} is an input or constant where the pattern computes {pn.op}")
        return
    if gn.op != pn.op:
        failures.append(f"{g} is computed by {gn.op}, the pattern has {pn.op} there")
        return
    if pn.key in state.nodes:
        if state.nodes[pn.key] is gn:
            yield state
        return
    if len(gn.inputs) != len(pn.inputs) or pn.outputs.index(p) != gn.outputs.index(g):
        failures.append(f"{gn.op} at {g} has another arity than the pattern's")
        return
    orders = [gn.inputs]
    if gn.op in COMMUTATIVE and len(gn.inputs) == 2:
        orders.append(gn.inputs[::-1])
    for inputs in orders:
        yield from _match_inputs(pattern, graph, pn.inputs, inputs, state.visit(pn.key, gn), failures)


def _match_inputs(pattern: Graph, graph: Graph, ps: tuple, gs: tuple, state: _State,
                  failures: list[str]) -> Iterator[_State]:
    if not ps:
        yield state
        return
    for first in _match_value(pattern, graph, ps[0], gs[0], state, failures):
        yield from _match_inputs(pattern, graph, ps[1:], gs[1:], first, failures)


def _leaking_value(pattern: Graph, graph: Graph, state: _State, anchor: Node) -> str | None:
    """A value computed inside the match that something outside it uses (or the function returns)."""
    inside = {node.key for node in state.nodes.values()}
    for node in state.nodes.values():
        if node is anchor:
            continue
        for out in node.outputs:
            if out in graph.outputs:
                return f"{out} (inside the match) is returned by the function"
            outside = [c for c in graph.consumers(out) if c.key not in inside]
            if outside:
                return f"{out} (inside the match) is also used by {outside[0].op} op{outside[0].index}"
    return None


Pattern = CallPattern | GraphPattern
__all__ = ["CallPattern", "FailedMatch", "GraphPattern", "Match", "Pattern"]
