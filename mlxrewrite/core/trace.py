"""Tracing: run a function under MLX's exporter and return its primitive graph with call sites.

The function runs once on tracer arrays with the intercepted APIs recording each call. To tie a Python
call to the graph, every recorded call's array operands and result are appended to the exported
function's outputs, each behind a marker view (`_output_marker`: the exporter rewrites the arrays it is
returned, and an operand may be the caller's). The exporter then names them, and `CallSite` keeps those
names. State declared with `inputs=`/`outputs=` enters as extra inputs and leaves as extra outputs, and is restored afterwards
(keys the function added to it are removed again).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import mlx.core as mx
import optree

from . import intercept
from .graph import Graph, Node
from .layout import array_strides
from .signature import StateTree, flatten_call, read_slots, rebuild_call, write_slots

MODE_NAMES = {0: "affine", 1: "mxfp4", 2: "mxfp8", 3: "nvfp4"}


class TraceError(RuntimeError):
    """MLX's exporter could not trace the function (the message says why)."""


@dataclass
class CallSite:
    """An API call in a graph: value names of its operands and result, and where it came from."""

    index: int
    api: str
    params: dict[str, Any]
    operands: dict[str, str | None]
    output: str | None
    location: str | None = None
    source: str = "python"  # "python": recorded at the call; "graph": recognised from primitives
    node: int | None = None  # index of the primitive node that computes it, when known
    notes: dict[str, Any] = field(default_factory=dict)

    def where(self) -> str:
        return self.location or (f"graph op{self.node}" if self.node is not None else "graph")


class Recorder:
    """Intercept handler for tracing: run each call unchanged, keep it and its arrays."""

    def __init__(self, apply: Callable[[intercept.Call], mx.array] | None = None):
        self.calls: list[intercept.Call] = []
        self.results: list[mx.array] = []
        self.apply = apply or intercept.Call.run_original

    def __call__(self, call: intercept.Call) -> mx.array:
        result = self.apply(call)
        self.calls.append(call)
        self.results.append(result)
        return result

    def extra_outputs(self) -> list[mx.array]:
        extras = []
        for call, result in zip(self.calls, self.results):
            extras += [a for a in call.operands.values() if a is not None]
            extras.append(result)
        return extras

    def sites(self, names: list[str]) -> list[CallSite]:
        it = iter(names)
        sites = []
        for index, call in enumerate(self.calls):
            operands = {k: (None if a is None else next(it)) for k, a in call.operands.items()}
            sites.append(CallSite(index, call.api, dict(call.params), operands, next(it), call.location))
        return sites


def trace(fn: Callable, *args: Any, **kwargs: Any) -> Graph:
    """The primitive graph of `fn(*args, **kwargs)` with shapes, dtypes, strides and call sites.

    A `mlxrewrite.compile`d function is traced in its rewritten form.
    """
    if hasattr(fn, "trace_rewritten"):
        return fn.trace_rewritten(*args, **kwargs)
    return trace_call(fn, args, kwargs)


def trace_call(fn: Callable, args: tuple, kwargs: dict, state_in: Any = None, state_out: Any = None,
               recorder: Recorder | None = None, record_sites: bool = True) -> Graph:
    """Trace with explicit state trees; `recorder` may rewrite calls as they are recorded."""
    arrays, treespec, statics = flatten_call(args, kwargs)
    tree_in, tree_out = StateTree.walk(state_in), StateTree.walk(state_out)
    in_slots, out_slots = tree_in.slots, tree_out.slots
    saved_in, saved_out = read_slots(in_slots), read_slots(out_slots)
    recorder = recorder or Recorder()
    n_outputs: list[int] = []

    def traced(*flat: mx.array) -> tuple[mx.array, ...]:
        call_args, call_kwargs = rebuild_call(treespec, statics, list(flat[:len(arrays)]))
        write_slots(in_slots, list(flat[len(arrays):]))
        with intercept.handling(recorder):
            result = fn(*call_args, **call_kwargs)
        leaves = optree.tree_leaves(result, none_is_leaf=False)
        if not all(isinstance(leaf, mx.array) for leaf in leaves):
            raise TraceError(f"{_name(fn)} must return arrays (or lists/tuples/dicts of arrays), got "
                             f"{sorted({type(leaf).__name__ for leaf in leaves})}")
        outs = leaves + read_slots(out_slots)
        n_outputs.append(len(outs))
        return tuple(map(_output_marker, outs + (recorder.extra_outputs() if record_sites else [])))

    events: list[dict] = []
    try:
        mx.export_function(events.append, traced, *arrays, *saved_in)
    except TraceError:
        raise
    except (RuntimeError, ValueError) as error:
        if not n_outputs:
            raise  # the function itself failed: the same error as calling it
        raise TraceError(f"MLX's exporter cannot trace {_name(fn)}: {error}") from error
    finally:  # as before the trace, without keys the function may have added (they hold dead tracers)
        tree_out.restore(saved_out)
        tree_in.restore(saved_in)
    events = _strip_output_markers(events)
    graph_inputs = next(e for e in events if e["type"] == "inputs")["inputs"]
    input_strides = {name: st for (name, _, _), array in zip(graph_inputs, [*arrays, *saved_in])
                     if (st := array_strides(array)) is not None}
    graph = Graph.from_export_events(events, input_strides)
    extra_names = graph.outputs[n_outputs[0]:]
    graph.outputs = graph.outputs[:n_outputs[0]]
    python_sites = recorder.sites(extra_names) if record_sites else []
    _link_nodes(graph, python_sites)
    graph.calls = python_sites + [s for s in recognise_sites(graph) if not _covered(graph, s, python_sites)]
    for site in python_sites:
        if site.node is not None and site.location:
            graph.nodes[site.node].location = site.location
    return graph


def _output_marker(array: mx.array) -> mx.array:
    """A fresh view of `array` to hand the exporter in its place.

    The exporter rewrites the arrays it is returned in place (their inputs become its copies), which cuts
    their gradient for the caller when they are the caller's arrays: closed-over operands, intermediates
    of an outer `mx.grad`. `mx.compile` returns only the function's results, so it has no such problem.
    The markers are stripped again by `_strip_output_markers`. (`stop_gradient` would be stripped by the
    exporter itself, but then its common-subexpression pass merges equal operands of two calls and leaves
    one of the names without a producer.)"""
    return mx.expand_dims(array, 0)


def _strip_output_markers(events: list[dict]) -> list[dict]:
    """The export events with every output named by the array beneath its `_output_marker`."""
    outputs_event = next(e for e in events if e["type"] == "outputs")
    marked = {name for name, _, _ in outputs_event["outputs"]}
    beneath: dict[str, tuple] = {}
    kept = []
    for event in events:
        if event["type"] == "primitive" and event["outputs"][0][0] in marked:
            beneath[event["outputs"][0][0]] = event["inputs"][0]
        else:
            kept.append(event)
    index = kept.index(outputs_event)
    kept[index] = {**outputs_event, "outputs": [beneath[name] for name, _, _ in outputs_event["outputs"]]}
    return kept


def _name(fn: Callable) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def _link_nodes(graph: Graph, sites: list[CallSite]) -> None:
    for site in sites:
        producer = graph.producer(site.output) if site.output else None
        if producer is not None:
            site.node = producer.index


def recognise_sites(graph: Graph) -> list[CallSite]:
    """API calls recognised from primitives alone (for graphs without Python calls, or rewritten ones)."""
    sites = []
    for node in graph.nodes:
        if node.op == "QuantizedMatmul":
            names = ("x", "w", "scales", "biases")
            group_size, bits, mode, transpose = node.args[:4]
            params = {"group_size": group_size, "bits": bits, "mode": MODE_NAMES.get(mode, mode),
                      "transpose": bool(transpose)}
            operands = {k: node.inputs[i] if i < len(node.inputs) else None for i, k in enumerate(names)}
        elif node.op == "ScaledDotProductAttention":
            scale, causal, has_sinks = node.args[:3]
            n_fixed = 3 + int(bool(has_sinks))
            params = {"scale": scale, "mask": "causal"} if causal else {"scale": scale}
            operands = {"q": node.inputs[0], "k": node.inputs[1], "v": node.inputs[2],
                        "mask": node.inputs[3] if len(node.inputs) > n_fixed else None,
                        "sinks": node.inputs[-1] if has_sinks else None}
        elif node.op in ("Select", "Add") and _feeds_softmax_from_matmul(graph, node):
            mask = node.inputs[0] if node.op == "Select" else node.inputs[1]
            params, operands = {"decomposed": node.op}, {"mask": mask}
        else:
            continue
        sites.append(CallSite(len(sites), "quantized_matmul" if node.op == "QuantizedMatmul"
                              else "scaled_dot_product_attention", params, operands, node.outputs[0],
                              source="graph", node=node.index))
    return sites


def _feeds_softmax_from_matmul(graph: Graph, node: Node) -> bool:
    """The masking step of an SDPA decomposed into primitives: Softmax(Select(m, Matmul, c)) or
    Softmax(Add(Matmul, m))."""
    scores = node.inputs[1] if node.op == "Select" else node.inputs[0]
    producer = graph.producer(scores)
    return (producer is not None and producer.op == "Matmul"
            and any(c.op == "Softmax" for c in graph.consumers(node.outputs[0])))


def _covered(graph: Graph, site: CallSite, python_sites: list[CallSite]) -> bool:
    """Is a recognised site the same call as a recorded Python one? (Its primitive, or the masking step
    of a decomposed SDPA that lies between a recorded call's queries and its result.)"""
    for known in python_sites:
        if site.node is not None and site.node == known.node:
            return True
        if site.params.get("decomposed") and known.api == site.api and known.output and known.operands.get("q"):
            masked = graph.nodes[site.node].outputs[0]
            upstream = {v.name for v in graph.ancestors(known.output)}
            if masked in upstream and known.operands["q"] in {v.name for v in graph.ancestors(masked)}:
                return True
    return False
