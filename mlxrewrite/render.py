"""Printing a graph: a jaxpr-like listing and Graphviz DOT."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .graph import row_major_strides

if TYPE_CHECKING:
    from .graph import Graph, Value


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
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def graph_to_dot(graph: "Graph", highlight: set[str], title: str | None = None) -> str:
    """Ops as boxes (highlighted ones red), inputs/constants as ellipses, edges labelled by value."""
    lines = ["digraph G {", "  rankdir=TB; node [fontname=Helvetica fontsize=10]; edge [fontsize=9];"]
    if title:
        lines.append(f"  label={_quote(title)}; labelloc=t;")
    for name in graph.inputs:
        lines.append(f"  {_quote(name)} [shape=ellipse label={_quote(_value_text(graph.values[name]))}];")
    for node in graph.nodes:
        label = node.op + (f"\\n{node.location.rsplit('/', 1)[-1]}" if node.location else "")
        style = " style=filled fillcolor=\"#f4b6b6\" color=red penwidth=2" if node.key in highlight else ""
        lines.append(f"  {node.key} [shape=box label={_quote(label)}{style}];")
    producers = {out: node.key for node in graph.nodes for out in node.outputs}
    for node in graph.nodes:
        for name in node.inputs:
            value = graph.values[name]
            if value.kind == "constant" and value.name not in producers:
                source = f"c_{name}"
                lines.append(f"  {source} [shape=plaintext label={_quote(_value_text(value))}];")
            else:
                source = producers.get(name, _quote(name))
            lines.append(f"  {source} -> {node.key} [label={_quote(_value_text(value))}];")
    for name in graph.outputs:
        lines.append(f"  out_{name} [shape=plaintext label={_quote('out ' + name)}];")
        lines.append(f"  {producers.get(name, _quote(name))} -> out_{name};")
    lines.append("}")
    return "\n".join(lines)
