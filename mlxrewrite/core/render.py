"""Printing a graph: a jaxpr-like listing, Graphviz DOT (one graph, or two side by side) and pictures.

Pictures are drawn by a Graphviz `dot` program: `graphviz-pure` (a pip-installable port, the
`render` extra: `pip install 'mlxrewrite[render]'`) or, failing that, Graphviz's own `dot` on PATH.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import networkx as nx

from .graph import row_major_strides

if TYPE_CHECKING:
    from .graph import Graph, Value

# A mark on an op node: (style name, note added to its label)
Mark = tuple[str, str]
STYLES = {
    "hazard": 'style=filled fillcolor="#f4b6b6" color=red penwidth=2',
    "call": 'style=filled fillcolor="#c8ecc8" color="#2e7d32" penwidth=2',
}
# Larger graphs (a whole model) are drawn only around their marked ops, or no layout engine copes.
MAX_DRAWN_OPS = 150
FOCUS_RADIUS = 3  # ops on either side of a marked op that are still drawn
FORMATS = ("dot", "svg", "png")


class RenderError(RuntimeError):
    """No Graphviz program to draw with, or it failed (the message says how to fix it)."""


def _value_text(value: "Value") -> str:
    text = f"{value.name}:{value.type_str}"
    if value.strides is not None and value.strides != row_major_strides(value.shape):
        text += f"{{{','.join(map(str, value.strides))}}}"
    if value.constant is not None:
        text += f"<{value.constant}>"
    return text


def _arg_text(arg) -> str:
    return str(arg).replace("mlx.core.", "").replace(" ", "")


def graph_to_text(graph: "Graph") -> str:
    """One line per primitive; non-row-major strides in {braces}, constant summaries in <angles>."""
    v = graph.values
    lines = ["{ lambda " + ", ".join(_value_text(v[n]) for n in graph.inputs) + " ."]
    consts = [val for val in v.values() if val.kind == "constant"]
    if consts:
        lines.append("  consts " + ", ".join(_value_text(c) for c in consts))
    for node in graph.nodes:
        outs = " ".join(_value_text(v[n]) for n in node.outputs)
        args = f"[{', '.join(_arg_text(a) for a in node.args)}]" if node.args else ""
        where = f"    # {node.location}" if node.location else ""
        lines.append(f"  {outs} = {node.op}{args} {' '.join(node.inputs)}{where}")
    lines.append(f"  in ({', '.join(graph.outputs)}) }}")
    return "\n".join(lines)


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def graph_to_dot(graph: "Graph", highlight: set[str], title: str | None = None) -> str:
    """Ops as boxes (highlighted ones red), inputs/constants as ellipses, edges labelled by value."""
    lines = ["digraph G {", "  rankdir=TB; node [fontname=Helvetica fontsize=10]; edge [fontsize=9];"]
    if title:
        lines.append(f"  label={_quote(title)}; labelloc=t;")
    lines += _graph_lines(graph, "", {key: ("hazard", "") for key in highlight}, keep=None)
    lines.append("}")
    return "\n".join(lines)


def side_by_side_dot(before: tuple["Graph", dict[str, Mark], str], after: tuple["Graph", dict[str, Mark], str]) -> str:
    """Two graphs as clusters `cluster_before` and `cluster_after` of one DOT graph, node ids prefixed
    ("b_", "a_") to keep them apart. Each is (graph, marks by op key, title)."""
    lines = ["digraph G {", "  rankdir=TB; newrank=true; node [fontname=Helvetica fontsize=10]; edge [fontsize=9];"]
    for cluster, prefix, (graph, marks, title) in (("before", "b_", before), ("after", "a_", after)):
        lines += [f"  subgraph cluster_{cluster} {{", f"    label={_quote(title)}; labelloc=t; fontsize=14;"]
        lines += ["  " + line for line in _graph_lines(graph, prefix, marks, _focus(graph, marks))]
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines)


def _focus(graph: "Graph", marks: dict[str, Mark]) -> set[str] | None:
    """The op keys to draw: all of a small graph, else those near a marked op."""
    if len(graph.nodes) <= MAX_DRAWN_OPS or not marks:
        return None
    undirected = graph.nx.to_undirected(as_view=True)
    keep: set[str] = set()
    for key in marks:  # op -> value -> op: two edges per op step
        keep |= set(nx.single_source_shortest_path_length(undirected, key, cutoff=2 * FOCUS_RADIUS))
    return {node.key for node in graph.nodes if node.key in keep}


def _graph_lines(graph: "Graph", prefix: str, marks: dict[str, Mark], keep: set[str] | None) -> list[str]:
    """Node and edge statements of one graph; with `keep`, only those ops, and values from ops left out
    start at plain "... Op" stubs."""
    ops = [node for node in graph.nodes if keep is None or node.key in keep]
    producers = {out: node for node in graph.nodes for out in node.outputs}
    drawn = {node.key for node in ops}
    lines = []
    for node in ops:
        style, note = marks.get(node.key, ("", ""))
        label = "\n".join(part for part in (node.op, note, (node.location or "").rsplit("/", 1)[-1]) if part)
        lines.append(f"  {prefix}{node.key} [shape=box label={_quote(label)}{' ' + STYLES[style] if style else ''}];")
    declared: set[str] = set()
    for node in ops:
        for name in node.inputs:
            source, declaration = _edge_source(graph, name, prefix, producers.get(name), drawn)
            if declaration and source not in declared:
                declared.add(source)
                lines.append(declaration)
            lines.append(f"  {source} -> {prefix}{node.key} [label={_quote(_value_text(graph.values[name]))}];")
    for name in graph.outputs:
        producer = producers.get(name)
        if producer is None or producer.key in drawn:
            source = f"{prefix}{producer.key}" if producer else _quote(prefix + name)
            lines.append(f"  {prefix}out_{name} [shape=plaintext label={_quote('out ' + name)}];")
            lines.append(f"  {source} -> {prefix}out_{name};")
    return lines


def _edge_source(graph: "Graph", name: str, prefix: str, producer, drawn: set[str]) -> tuple[str, str | None]:
    """The DOT id an edge carrying value `name` starts from, and the statement that declares it (None
    when it is a drawn op)."""
    if producer is not None and producer.key in drawn:
        return f"{prefix}{producer.key}", None
    if producer is not None:
        source = _quote(f"{prefix}cut_{name}")
        return source, f"  {source} [shape=plaintext label={_quote('... ' + producer.op)}];"
    value = graph.values[name]
    constant = value.kind == "constant"
    source = _quote(f"{prefix}{'c_' if constant else ''}{name}")
    return source, f"  {source} [shape={'plaintext' if constant else 'ellipse'} label={_quote(_value_text(value))}];"


def dot_program() -> str | None:
    """The Graphviz program to draw with: graphviz-pure (also when its venv is not on PATH), else `dot`."""
    beside_python = Path(sys.executable).parent / "graphviz-pure"
    for candidate in (shutil.which("graphviz-pure"), str(beside_python) if beside_python.exists() else None,
                      shutil.which("dot")):
        if candidate:
            return candidate
    return None


def write_picture(dot_text: str, path: str | Path, fmt: str | None = None) -> Path:
    """Write DOT text as `fmt` (default: the file's suffix): dot as is, svg/png drawn by Graphviz."""
    path = Path(path)
    fmt = fmt or path.suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise RenderError(f"cannot write {path}: format {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "dot":
        path.write_text(dot_text + "\n")
        return path
    program = dot_program()
    if program is None:
        raise RenderError(f"cannot draw {path}: no Graphviz program found; install one with "
                          "`pip install 'mlxrewrite[render]'` (graphviz-pure) or Graphviz's `dot`, or write --dot instead")
    done = subprocess.run([program, f"-T{fmt}", "-o", str(path)], input=dot_text, capture_output=True, text=True)
    if done.returncode != 0:
        raise RenderError(f"{Path(program).name} failed to draw {path}: {done.stderr.strip()}")
    return path
