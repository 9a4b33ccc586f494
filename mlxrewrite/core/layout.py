"""The layout pass: element strides for every value, mirroring MLX's view semantics.

Python cannot see an MLX array's strides before it is evaluated, yet the hazards depend on them (a
broadcast batch dim has stride 0). MLX evaluates these primitives as views of their input:
Broadcast/BroadcastAxes (stride 0 on new or size-1 dims), ExpandDims, Squeeze, Transpose, Slice,
AsStrided, and Reshape/Flatten/Unflatten when the new shape can be expressed over the old strides
(otherwise they copy to row-major). Everything else writes a fresh row-major buffer. Matmul-like
primitives also broadcast their operands' batch dims internally: `kernel_operand_strides` gives the
strides the kernel really sees. `tests/test_layout.py` checks all of it against evaluated arrays.
"""

from __future__ import annotations

from typing import Callable

from .graph import Graph, Node, Shape, row_major_strides

ViewRule = Callable[[Node, list[Shape], list[Shape]], Shape]


def broadcast_strides(in_shape: Shape, in_strides: Shape, out_shape: Shape) -> Shape:
    """Strides of `broadcast_to(x, out_shape)`: new and stretched dims get stride 0."""
    lead = len(out_shape) - len(in_shape)
    strides = [0] * lead
    for size, stride, out in zip(in_shape, in_strides, out_shape[lead:]):
        strides.append(0 if size == 1 and out != 1 else stride)
    return tuple(strides)


def is_row_contiguous(shape: Shape, strides: Shape) -> bool:
    expected = row_major_strides(shape)
    return all(a == b for a, b, n in zip(strides, expected, shape) if n > 1)


def collapse_contiguous_dims(shape: Shape, strides: Shape) -> tuple[list[int], list[int]]:
    """MLX's single-array `collapse_contiguous_dims`: merge dims that are contiguous in each other."""
    out_shape, out_strides = [shape[0]], [strides[0]]
    for size, stride in zip(shape[1:], strides[1:]):
        if size == 1:
            continue
        if stride * size != out_strides[-1]:
            out_shape.append(size)
            out_strides.append(stride)
        else:
            out_shape[-1] *= size
            out_strides[-1] = stride
    return out_shape, out_strides


def reshape_strides(in_shape: Shape, in_strides: Shape, out_shape: Shape) -> Shape | None:
    """Strides of a reshape done as a view, or None when MLX copies (mirrors MLX's `prepare_reshape`)."""
    if is_row_contiguous(in_shape, in_strides) or 0 in in_shape:
        return row_major_strides(out_shape)
    if not in_shape:
        return (0,) * len(out_shape)
    shape, strides = collapse_contiguous_dims(in_shape, in_strides)
    out: list[int] = []
    j = 0
    for size in out_shape:
        if j < len(shape) and shape[j] % size == 0:
            shape[j] //= size
            out.append(shape[j] * strides[j])
            j += shape[j] == 1
        elif size == 1:
            out.append(out[-1] if out else 1)
        else:
            return None
    return tuple(out)


def _reshaped(node: Node, in_shapes: list[Shape], in_strides: list[Shape], out_shape: Shape) -> Shape:
    view = reshape_strides(in_shapes[0], in_strides[0], out_shape)
    return view if view is not None else row_major_strides(out_shape)


def _expand_dims(node: Node, in_shapes, in_strides, out_shape) -> Shape:
    strides = list(in_strides[0])
    for axis in sorted(a % len(out_shape) for a in node.args[0]):
        strides.insert(axis, 1)  # MLX gives an inserted size-1 dim stride 1 (any value would be valid)
    return tuple(strides)


def _squeeze(node: Node, in_shapes, in_strides, out_shape) -> Shape:
    axes = {a % len(in_shapes[0]) for a in node.args[0]}
    return tuple(st for k, st in enumerate(in_strides[0]) if k not in axes)


def _transpose(node: Node, in_shapes, in_strides, out_shape) -> Shape:
    return tuple(in_strides[0][axis] for axis in node.args[0])


def _slice(node: Node, in_shapes, in_strides, out_shape) -> Shape:
    steps = node.args[2]
    return tuple(st * step for st, step in zip(in_strides[0], steps))


VIEW_RULES: dict[str, ViewRule] = {
    "Broadcast": lambda node, shapes, strides, out: broadcast_strides(shapes[0], strides[0], out),
    "BroadcastAxes": lambda node, shapes, strides, out: broadcast_strides(shapes[0], strides[0], out),
    "ExpandDims": _expand_dims,
    "Squeeze": _squeeze,
    "Transpose": _transpose,
    "Slice": _slice,
    "Reshape": _reshaped,
    "Flatten": _reshaped,
    "Unflatten": _reshaped,
    "AsStrided": lambda node, shapes, strides, out: tuple(node.args[1]),
}


UNARY_ELEMENTWISE = frozenset("""Abs AsType BitwiseInvert Ceil Conjugate Cos Cosh Erf ErfInv Exp Expm1 Floor Imag
    Log Log1p LogicalNot Negative Real Round Sigmoid Sign Sin Sinh Sqrt Square StopGradient Tan Tanh""".split())
BINARY_ELEMENTWISE = frozenset("""Add ArcTan2 BitwiseBinary Divide Equal Greater GreaterEqual Less LessEqual LogAddExp
    LogicalAnd LogicalOr Maximum Minimum Multiply NotEqual Power Remainder Select Subtract""".split())


def elementwise_strides(in_shapes: list[Shape], in_strides: list[Shape], out_shape: Shape, unary: bool) -> Shape:
    """MLX's elementwise kernels keep the layout of a dense input (unary, or beside scalars), and of
    inputs that share one row- or column-major layout; otherwise they write row-major."""
    full = [st for sh, st in zip(in_shapes, in_strides) if any(s and n > 1 for s, n in zip(st, sh))]
    if not full:
        return row_major_strides(out_shape)
    if len(full) == 1 and is_dense(out_shape, full[0]) and (unary or len(full) < len(in_shapes)):
        return full[0]
    col_major = tuple(reversed(row_major_strides(tuple(reversed(out_shape)))))
    if all(st == full[0] for st in full) and _same_layout(out_shape, full[0], col_major):
        return full[0]
    return row_major_strides(out_shape)


def _same_layout(shape: Shape, strides: Shape, reference: Shape) -> bool:
    return all(a == b for a, b, n in zip(strides, reference, shape) if n > 1)


def is_dense(shape: Shape, strides: Shape) -> bool:
    """True when the array covers one gap-free block of memory in some dim order (no stride 0)."""
    dims = sorted((st, n) for st, n in zip(strides, shape) if n > 1)
    expected = 1
    for st, n in dims:
        if st != expected:
            return False
        expected *= n
    return True


def assign_layouts(graph: Graph, input_strides: dict[str, Shape]) -> None:
    """Fill `Value.strides` for every value, in tape order."""
    for value in graph.values.values():
        if value.kind == "input":
            value.strides = tuple(input_strides.get(value.name, row_major_strides(value.shape)))
        elif value.kind == "constant":
            value.strides = array_strides(value.data) or row_major_strides(value.shape)
    for node in graph.nodes:
        ins = [graph.values[n] for n in node.inputs]
        shapes, strides = [v.shape for v in ins], [v.strides for v in ins]
        for name in node.outputs:
            out = graph.values[name]
            rule = VIEW_RULES.get(node.op)
            if rule is not None and len(node.outputs) == 1:
                out.strides = rule(node, shapes, strides, out.shape)
            elif node.op in UNARY_ELEMENTWISE or node.op in BINARY_ELEMENTWISE:
                out.strides = elementwise_strides(shapes, strides, out.shape, node.op in UNARY_ELEMENTWISE)
            else:
                out.strides = row_major_strides(out.shape)
        if node.op in MATMUL_OPERANDS:
            node.notes["kernel_strides"] = kernel_operand_strides(graph, node)


# Matmul-like primitives: which inputs are "weights" whose batch dims the op broadcasts to the
# output's batch shape, and how many trailing (matrix) dims each operand has.
MATMUL_OPERANDS: dict[str, tuple[int, ...]] = {
    "QuantizedMatmul": (1, 2, 3),  # w, scales, biases (x is input 0)
    "Matmul": (0, 1),
}


def kernel_operand_strides(graph: Graph, node: Node) -> dict[str, Shape]:
    """Strides of each weight operand after the op's implicit batch broadcast (what the kernel sees)."""
    out = graph.values[node.outputs[0]]
    batch = out.shape[:-2]
    seen = {}
    for position in MATMUL_OPERANDS[node.op]:
        if position >= len(node.inputs):
            continue
        value = graph.values[node.inputs[position]]
        target = batch + value.shape[-2:]
        seen[value.name] = broadcast_strides(value.shape, value.strides, target)
    return seen


def array_strides(array) -> Shape | None:
    """Element strides of an evaluated array, read through the buffer protocol (None if unavailable)."""
    try:
        view = memoryview(array)
    except (TypeError, ValueError, RuntimeError):
        return None
    return tuple(st // view.itemsize for st in view.strides) if view.ndim else ()


def stride0_batch_dims(shape: Shape, strides: Shape) -> tuple[int, ...]:
    """Batch dims (all but the last two) of size > 1 whose stride is 0."""
    return tuple(k for k in range(len(shape) - 2) if shape[k] > 1 and strides[k] == 0)
