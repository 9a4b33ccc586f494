"""Facts: what a rule's guards know about a match, read through one object that remembers every read.

Both paths hand a rule the same `Facts`. `mlxrewrite.compile` builds it over the traced graph; eager mode
over the trace of one call (or one region) on placeholder operands. Each read is recorded as a `Read`
(the question) with its answer, so eager mode can tell whether a later call gets the same decision: it asks
the recorded questions of the new call's arrays and reuses the decision when every answer is the same.
TorchDynamo's guards work this way. No hand-written cache key can forget a fact the guards used, and a
fact the guards did not read (the KV length, unless asked) does not split the cache.

The questions are asked of an `Env`: `GraphEnv` answers from a graph (shapes, dtypes, the layout pass's
strides, the constant pass's summaries), `ArrayEnv` from real arrays (eager mode's later calls).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol

import mlx.core as mx

from .constants import ConstSummary, summarize
from .graph import Graph, row_major_strides
from .layout import is_dense, is_row_contiguous

if TYPE_CHECKING:
    from ..backends.device import Backend

ValueCheck = Callable[[mx.array], "ConstSummary | None"]


@dataclass(frozen=True)
class Read:
    """One question a guard asked: `kind` of operand `name` (with `extra`: dims, a derived fact's recipe)."""

    kind: str  # shape | dims | ndim | dtype | present | strides | dense | const | param | args | backend | derived
    name: str | None = None
    extra: Any = None


class Env(Protocol):
    """Where answers come from."""

    def answer(self, read: Read) -> Any: ...


class FactUnavailable(Exception):
    """A guard asked for a fact this path cannot supply (the rule declines, saying which)."""


@dataclass
class GraphEnv:
    """Answers from a traced graph: `bindings` maps placeholder names to the graph's value names.

    `eager`: the graph is a trace of one call on row-major placeholders, so strides describe a row-major
    array of each shape, and values are known only through `value_check` (eager mode's check_values)."""

    graph: Graph
    bindings: dict[str, str | None]
    params: dict[str, Any]
    node_args: dict[str, tuple]  # op name -> args of the matched primitive of that op
    backend: "Backend"
    eager: bool = False
    value_check: ValueCheck | None = None
    arrays: dict[str, mx.array] = field(default_factory=dict)  # eager: the first call's real operands

    def answer(self, read: Read) -> Any:
        if read.kind in ("param", "backend", "args", "derived"):
            return _common(self, read)
        name = self.bindings.get(read.name)
        if read.kind == "present":
            return name is not None
        if read.kind == "dense" and name is None:  # an absent operand has no layout to fault
            return True
        if name is None:
            raise FactUnavailable(f"operand {read.name!r} is absent")
        value = self.graph.values[name]
        if read.kind == "strides":
            return value.strides
        if read.kind == "dense":  # known only for values the graph computes (an input's layout may change)
            if self.eager or value.kind == "input" or value.strides is None:
                return None
            return is_dense(value.shape, value.strides) and is_row_contiguous(value.shape[-2:], value.strides[-2:])
        if read.kind == "const":  # a constant of the graph is known; eager mode may check an input's values
            summary = summarize(self.graph, name)
            if summary is not None or not self.eager or self.value_check is None:
                return summary
            array = self.arrays.get(read.name)
            return None if array is None else self.value_check(array)
        return _shape_answer(read, value.shape, value.dtype)


@dataclass
class ArrayEnv:
    """Answers from real arrays (eager mode's calls after the first of a kind)."""

    arrays: dict[str, mx.array | None]
    params: dict[str, Any]
    node_args: dict[str, tuple]
    backend: "Backend"
    value_check: ValueCheck | None = None

    def answer(self, read: Read) -> Any:
        if read.kind in ("param", "backend", "args", "derived"):
            return _common(self, read)
        array = self.arrays.get(read.name)
        if read.kind == "present":
            return array is not None
        if read.kind == "dense":
            return True if array is None else None
        if array is None:
            raise FactUnavailable(f"operand {read.name!r} is absent")
        if read.kind == "strides":  # as in GraphEnv(eager=True): eager mode does not see layouts
            return row_major_strides(tuple(array.shape))
        if read.kind == "const":
            return None if self.value_check is None else self.value_check(array)
        return _shape_answer(read, tuple(array.shape), array.dtype)


def _shape_answer(read: Read, shape: tuple, dtype: mx.Dtype) -> Any:
    if read.kind == "shape":
        return shape
    if read.kind == "dims":
        return tuple(shape[i] for i in read.extra)
    if read.kind == "ndim":
        return len(shape)
    if read.kind == "dtype":
        return dtype
    raise ValueError(f"unknown fact kind {read.kind!r}")


def _common(env: GraphEnv | ArrayEnv, read: Read) -> Any:
    if read.kind == "param":
        return env.params.get(read.name)
    if read.kind == "backend":
        return env.backend
    if read.kind == "args":
        if read.name not in env.node_args:
            raise FactUnavailable(f"the match has no {read.name} primitive")
        return env.node_args[read.name]
    label, fn, questions = read.extra  # derived: a function of other answers, recorded by its result only
    return fn(*(env.answer(q) for q in questions))


class Facts:
    """The guards' view of one match. Every accessor records its question and answer in `reads`."""

    def __init__(self, env: Env):
        self.env = env
        self.reads: list[tuple[Read, Any]] = []

    def _ask(self, read: Read) -> Any:
        answer = self.env.answer(read)
        self.reads.append((read, answer))
        return answer

    def shape(self, name: str) -> tuple[int, ...]:
        """The whole shape (every dim joins the eager key: prefer `dims` for what the rule needs)."""
        return self._ask(Read("shape", name))

    def dims(self, name: str, *indices: int) -> tuple[int, ...]:
        return self._ask(Read("dims", name, tuple(indices)))

    def ndim(self, name: str) -> int:
        return self._ask(Read("ndim", name))

    def dtype(self, name: str) -> mx.Dtype:
        return self._ask(Read("dtype", name))

    def present(self, name: str) -> bool:
        return self._ask(Read("present", name))

    def strides(self, name: str) -> tuple[int, ...]:
        return self._ask(Read("strides", name))

    def dense(self, name: str) -> bool | None:
        """Known dense with row-major last two dims (True), known not (False), or unknown (None: an input, whose
        layout at run time may not be the traced one, and everything in eager mode)."""
        return self._ask(Read("dense", name))

    def const(self, name: str) -> ConstSummary | None:
        """The value summary of a constant operand; None where unknown (eager mode without check_values)."""
        return self._ask(Read("const", name))

    def param(self, name: str) -> Any:
        return self._ask(Read("param", name))

    def args(self, op: str) -> tuple:
        """The arguments of the matched primitive `op` (e.g. "Softmax": its precise flag)."""
        return self._ask(Read("args", op))

    @property
    def backend(self) -> "Backend":
        return self._ask(Read("backend"))

    def derive(self, label: str, fn: Callable[..., Any], *questions: Read) -> Any:
        """`fn` of the answers to `questions`, recorded by its result alone: a rule that needs the KV length
        only through a bucket derives the bucket, and the eager key holds the bucket, not the length."""
        return self._ask(Read("derived", label, (label, fn, tuple(questions))))

    def peek(self, kind: str, name: str | None = None) -> Any:
        """An answer for a reason's text only: not recorded, so no decision may depend on it (the eager key
        would not cover it). Kernel strides in a message name the KV length; the decision reads less."""
        return self.env.answer(Read(kind, name))

    def still_holds(self, env: Env) -> bool:
        """Whether every recorded question gets the recorded answer from `env` (a later call)."""
        try:
            return all(env.answer(read) == answer for read, answer in self.reads)
        except FactUnavailable:
            return False
