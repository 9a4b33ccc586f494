"""The graph IR: MLX primitives and the values between them, with facts attached.

A `Graph` is built from the events of `mx.export_function` (see `trace.py`). It is a bipartite
networkx DiGraph (op nodes -> value nodes -> op nodes) wrapped with a few helpers, so that a newcomer
can read it like torch.fx's Graph and print it like a jaxpr. Facts live on `Value`: shape and dtype
(from the tracer), strides (`layout.py`) and constant summaries (`constants.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import mlx.core as mx
import networkx as nx

Shape = tuple[int, ...]


@dataclass
class Value:
    """One array in the graph."""

    name: str
    shape: Shape
    dtype: mx.Dtype
    kind: str  # "input" | "constant" | "intermediate"
    data: mx.array | None = None  # the array, for constants
    strides: Shape | None = None  # element strides, filled by the layout pass
    constant: Any = None  # ConstSummary, filled on demand by constants.summarize

    @property
    def type_str(self) -> str:
        return f"{dtype_name(self.dtype)}[{','.join(map(str, self.shape))}]"


@dataclass
class Node:
    """One primitive application: `outputs = op[args](inputs)`."""

    index: int
    op: str
    args: tuple
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    location: str | None = None
    notes: dict[str, Any] = field(default_factory=dict)  # facts a pass attaches (e.g. operand strides)

    @property
    def key(self) -> str:
        return f"op{self.index}"


def dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).removeprefix("mlx.core.")


def row_major_strides(shape: Shape) -> Shape:
    strides, acc = [], 1
    for size in reversed(shape):
        strides.append(acc)
        acc *= size
    return tuple(reversed(strides))


class Graph:
    """Values and primitive nodes in topological (tape) order, backed by a networkx DiGraph."""

    def __init__(self, values: dict[str, Value], nodes: list[Node], inputs: list[str], outputs: list[str]):
        self.values = values
        self.nodes = nodes
        self.inputs = inputs
        self.outputs = outputs
        self.calls: list = []  # Call records of intercepted API calls, set by trace
        self.nx = nx.DiGraph()
        for value in values.values():
            self.nx.add_node(value.name, kind="value", value=value)
        for node in nodes:
            self.nx.add_node(node.key, kind="op", node=node)
            self.nx.add_edges_from((name, node.key) for name in node.inputs)
            self.nx.add_edges_from((node.key, name) for name in node.outputs)

    # ---- navigation -------------------------------------------------------------------------
    def producer(self, name: str) -> Node | None:
        preds = list(self.nx.predecessors(name))
        return self.nx.nodes[preds[0]]["node"] if preds else None

    def consumers(self, name: str) -> list[Node]:
        return [self.nx.nodes[key]["node"] for key in self.nx.successors(name)]

    def ancestors(self, name: str) -> Iterator[Value]:
        """Every value `name` depends on (not itself)."""
        for key in nx.ancestors(self.nx, name):
            if self.nx.nodes[key]["kind"] == "value":
                yield self.values[key]

    def depends_on_inputs(self, name: str) -> bool:
        if self.values[name].kind == "input":
            return True
        return any(v.kind == "input" for v in self.ancestors(name))

    def find(self, op: str) -> list[Node]:
        return [node for node in self.nodes if node.op == op]

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    # ---- views -------------------------------------------------------------------------------
    def to_networkx(self) -> nx.DiGraph:
        """The bipartite op/value graph (a copy: mutate it freely)."""
        return self.nx.copy()

    def to_dot(self, highlight: Iterable[str] = (), title: str | None = None) -> str:
        """Graphviz DOT text: ops as boxes, values as edge labels; `highlight` names ops to mark red."""
        from .render import graph_to_dot

        return graph_to_dot(self, highlight=set(highlight), title=title)

    def __str__(self) -> str:
        from .render import graph_to_text

        return graph_to_text(self)

    def __repr__(self) -> str:
        return f"<Graph: {len(self.inputs)} inputs, {len(self.nodes)} ops, {len(self.outputs)} outputs>"

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_export_events(cls, events: list[dict], input_strides: dict[str, Shape] | None = None) -> "Graph":
        """Build a graph from the dicts `mx.export_function(callback, ...)` passes to `callback`."""
        values: dict[str, Value] = {}
        nodes: list[Node] = []
        inputs: list[str] = []
        outputs: list[str] = []
        for event in events:
            kind = event["type"]
            if kind in ("inputs", "keyword_inputs"):
                entries = event.get("inputs", event.get("keywords", []))
                for entry in entries:
                    name, shape, dtype = entry[-3:]  # keyword entries carry the keyword first
                    values[name] = Value(name, tuple(shape), dtype, "input")
                    inputs.append(name)
            elif kind == "outputs":
                outputs = [name for name, _, _ in event["outputs"]]
                pending_outputs = {name: (tuple(s), d) for name, s, d in event["outputs"]}
            elif kind == "constants":
                for name, array in event["constants"]:
                    values[name] = Value(name, tuple(array.shape), array.dtype, "constant", data=array)
            elif kind == "primitive":
                for name, shape, dtype in event["outputs"]:
                    values[name] = Value(name, tuple(shape), dtype, "intermediate")
                nodes.append(Node(
                    index=len(nodes),
                    op=event["name"],
                    args=tuple(event["arguments"]),
                    inputs=tuple(name for name, _, _ in event["inputs"]),
                    outputs=tuple(name for name, _, _ in event["outputs"]),
                ))
            else:
                raise ValueError(f"unknown export event type {kind!r}")
        for name in outputs:  # an output may be an input or constant returned as is
            if name not in values:
                shape, dtype = pending_outputs[name]
                values[name] = Value(name, shape, dtype, "intermediate")
        graph = cls(values, nodes, inputs, outputs)
        from .layout import assign_layouts

        assign_layouts(graph, input_strides or {})
        return graph
