"""`mlxrewrite.compile`: trace -> rules -> plan -> `mx.compile`, cached per input signature.

Per new signature the function is traced once with MLX's exporter (graph + call sites), every rule
decides on every call site, and the plan is lowered into an `mx.compile`d function whose intercepted
calls run the chosen rewrites. Nothing else in the function changes, so where no rule fires the result
is bitwise that of `mx.compile(fn)`. State declared as `inputs=`/`outputs=` is read at call time
(never baked in). `explain()` reports each trace, why it happened, and every decision.

Steady state costs what `mx.compile` costs plus a type check (a dictionary lookup once the function has
more than one signature). With captured state (a module), the state tree is walked only when
`StateTree.arrays()` finds it changed (a layer added, a sub-module replaced). Arguments or state of new
shapes or dtypes make `mx.compile` retrace; the runner then raises `StaleState`, and the call is keyed
by its full signature (a new trace and plan, or a cached one), never run with a plan made for others.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn

from . import intercept, log
from .graph import Graph, row_major_strides
from .layout import array_strides
from .lower import Applier, Plan, PlannedCall
from ..backends.device import Backend
from .decide import decide_graph
from .guard import RuleError
from .rule import Decline, Rule, select_rules
from .signature import Signature, SignatureError, StateTree, flatten_call, make_signature, read_slots, rebuild_call, \
    state_facts, state_slots
from .trace import CallSite, Recorder, TraceError, trace_call


class FallbackWarning(UserWarning):
    """The pass could not handle a call and ran the original function instead."""


_ARG_FACTS = operator.attrgetter("__class__", "shape", "dtype")  # the fast path's key, per argument
_ARRAY_TYPE = frozenset({mx.array})


class StaleState(Exception):
    """Raised inside `mx.compile`'s retrace when the arguments or the captured state no longer have the
    shapes and dtypes the plan was made for."""


@dataclass
class Entry:
    """One traced signature: its graph, plan and compiled function."""

    signature: Signature
    graph: Graph
    plan: Plan
    compiled: Callable
    reason: str
    mismatches: list[str] = field(default_factory=list)
    # (index, strides) of inputs traced with a non-row-major layout; arguments first, then inputs= state
    layout_guards: tuple = ()

    def layout_holds(self, inputs: tuple[mx.array, ...] | list[mx.array]) -> bool:
        """Whether the guarded inputs (arguments, then state arrays) still have the layout traced."""
        return all(array_strides(inputs[i]) == strides for i, strides in self.layout_guards)


def _layout_guards(graph: Graph) -> tuple:
    """Inputs (arguments and captured state) whose traced layout was not row-major: the plan may rely on it,
    so it is checked per call."""
    guards = []
    for index, name in enumerate(graph.inputs):
        value = graph.values[name]
        if value.strides != row_major_strides(value.shape) and any(n > 1 for n in value.shape):
            guards.append((index, value.strides))
    return tuple(guards)


def plan_for(graph: Graph, rules: list[Rule], backend: Backend) -> tuple[Plan, list[str]]:
    """Every rule's verdict on every recorded call site (subgraph rules first; then the first call rule that
    fires wins), and the rules that raised (no rule fires where one did: the call is left as written)."""
    sites = [s for s in graph.calls if s.source == "python"]
    entries = decide_graph(rules, graph, backend, sites)
    calls = [PlannedCall.of(e.site, _site_shapes(graph, e.site), e.decision, tuple(e.verdicts), e.sources,
                            e.covered_by) for e in entries]
    problems = [f"call {e.site.index} {e.site.api} at {e.site.where()}: {e.problem}; left as written"
                for e in entries if e.problem]
    return Plan(calls, {rule.name: rule for rule in rules}), problems


def _site_shapes(graph: Graph, site: CallSite) -> tuple:
    return tuple((k, None if name is None else graph.values[name].shape) for k, name in site.operands.items())


class RewrittenFunction:
    """A function whose hazardous MLX calls are rewritten by rules, then `mx.compile`d."""

    def __init__(self, fn: Callable, *, rules: list[Rule] | None = None, disable: tuple[str, ...] = (),
                 shapeless: bool = False, inputs: Any = None, outputs: Any = None, strict: bool = False):
        if not callable(fn):
            raise TypeError(f"mlxrewrite.compile expects a callable, got {type(fn).__name__}")
        self.fn = fn
        self.rules = select_rules(rules, disable)
        self.shapeless = shapeless
        module = fn if isinstance(fn, nn.Module) else getattr(fn, "__self__", None)
        if inputs is None and outputs is None and isinstance(module, nn.Module):
            inputs = outputs = module  # read the model's parameters at call time, like mx.compile(inputs=model.state)
        self.inputs, self.outputs = inputs, outputs
        self.strict = strict
        self._entries: dict[Signature, Entry] = {}
        self._fast: dict[tuple, Entry] = {}  # positional-arrays-only calls: (type, shape, dtype) per argument
        self._only: Entry | None = None  # the one entry the fast path serves, while there is one
        self._state = StateTree.walk(None)  # the inputs= tree as last walked, for the fast path
        self._history: list[str] = []
        self._fallbacks: list[str] = []
        self._lock = threading.Lock()
        functools.update_wrapper(self, fn, updated=())

    # ---- calling -----------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Steady state: the cached entry for these arguments, called at once; anything else: `_call`.

        This path runs on every call, so it does next to nothing: on a GPU a decode-sized kernel takes tens of
        microseconds, and Python time here adds to each synchronised call. While the fast path has served one
        signature only, not even a key is built: `mx.compile` checks the shapes and dtypes of the arguments
        and the state, and when they differ it retraces, where the runner raises `StaleState`.
        """
        if not kwargs:
            entry = (self._only if _ARRAY_TYPE.issuperset(map(type, args)) else None) or self._fast_entry(args)
            if entry is not None:
                tree = self._state
                state = tree.arrays() if self.inputs is not None else []
                # state None: the state tree is no longer as walked
                if state is not None and (not entry.layout_guards or entry.layout_holds((*args, *state))):
                    try:
                        return entry.compiled(*args)
                    except StaleState:  # mx.compile retraced, and left its tracers in the state: put it back
                        tree.restore(state)
        return self._call(args, kwargs)

    def _fast_entry(self, args: tuple) -> Entry | None:
        try:
            return self._fast.get(tuple(map(_ARG_FACTS, args)))
        except (AttributeError, TypeError):  # an argument that is no array: `_call` sorts it out
            return None

    def _call(self, args: tuple, kwargs: dict) -> Any:
        """Walk the state, key the call by its full signature, trace it if new."""
        try:
            arrays, treespec, statics = flatten_call(args, kwargs)
            tree = StateTree.walk(self.inputs)
            state = read_slots(tree.slots)
            signature = make_signature(arrays, treespec, statics, state, self.shapeless)
            entry = self._entries.get(signature) or self._build(signature, args, kwargs, self.shapeless)
            if self.shapeless and entry.plan.fired:  # rewrites bake shapes in: key them by exact shapes
                exact = make_signature(arrays, treespec, statics, state)
                entry = self._entries.get(exact) or self._build(exact, args, kwargs, False)
            if entry.layout_guards and not entry.layout_holds([*arrays, *state]):  # an input's layout changed
                layouts = tuple(array_strides(a) for a in [*arrays, *state])
                exact = dataclasses.replace(entry.signature, layouts=layouts)
                entry = self._entries.get(exact) or self._build(exact, args, kwargs, False)
        except (SignatureError, TraceError) as error:
            return self._fallback(error, args, kwargs)
        if entry.compiled is None:  # this signature could not be traced before: no second attempt
            return self._fallback(entry.reason, args, kwargs)
        if self._fast_path_serves(args, kwargs):
            self._state = tree
            self._fast[tuple(map(_ARG_FACTS, args))] = entry
            # a second signature (or a layout to guard, which needs the key's arity): keyed lookups from now on
            self._only = entry if len(self._fast) == 1 and not entry.layout_guards else None
        return entry.compiled(*arrays)

    def _fast_path_serves(self, args: tuple, kwargs: dict) -> bool:
        """Calls with positional arrays only, keyed by (type, shape, dtype) each; shapeless keys are not exact."""
        return not kwargs and not self.shapeless and all(type(a) is mx.array for a in args)

    def _build(self, signature: Signature, args: tuple, kwargs: dict, shapeless: bool = False) -> Entry:
        with self._lock:
            if signature in self._entries:
                return self._entries[signature]
            reason = self._retrace_reason(signature)
            try:
                graph = trace_call(self.fn, args, kwargs, self.inputs, self.outputs)
            except TraceError as error:  # remembered, so later calls fall back without tracing again
                self._entries[signature] = Entry(signature, Graph({}, [], [], []), Plan([], {}), None, str(error))
                raise
            plan, problems = plan_for(graph, self.rules, Backend.current())
            entry = Entry(signature, graph, plan, None, reason, layout_guards=_layout_guards(graph))
            self._report(entry, problems)
            entry.compiled = mx.compile(self._runner(signature, entry, shapeless), inputs=self.inputs,
                                        outputs=self.outputs, shapeless=shapeless)
            self._entries[signature] = entry
            fired = ", ".join(f"{c.decision.rule}:{c.decision.rewrite}" for c in plan.fired) or "no rule fired"
            self._history.append(f"trace #{len(self._entries)}: {reason} -> {len(plan.calls)} call sites, {fired}")
            log.channel("traces").info("compile %s %s", getattr(self.fn, "__qualname__", self.fn), self._history[-1])
            return entry

    def _runner(self, signature: Signature, entry: Entry, shapeless: bool) -> Callable:
        def run(*arrays: mx.array) -> Any:
            if not self._traced_as(signature, arrays, shapeless):
                raise StaleState  # mx.compile retraced for shapes or dtypes that this plan was not made for
            call_args, call_kwargs = rebuild_call(signature.treespec, signature.statics, list(arrays))
            applier = Applier(entry.plan, [*arrays, *read_slots(state_slots(self.inputs))])
            with intercept.handling(applier):
                result = self.fn(*call_args, **call_kwargs)
            entry.mismatches += applier.mismatches
            self._report(entry, applier.problems)
            if applier.position != len(entry.plan.calls):
                entry.mismatches.append(f"{applier.position} calls ran, the trace saw {len(entry.plan.calls)}")
            return result

        return run

    def _report(self, entry: Entry, problems: list[str]) -> None:
        """Rules that raised or whose rewrite was refused: warned about once, listed in explain();
        `strict=True` raises instead."""
        for problem in problems:
            if self.strict:
                raise RuleError(problem)
            if problem not in entry.mismatches:
                entry.mismatches.append(problem)
                warnings.warn(f"mlxrewrite: {problem}", FallbackWarning, stacklevel=4)

    def _traced_as(self, signature: Signature, arrays: tuple, shapeless: bool) -> bool:
        """Whether `mx.compile` is tracing the arguments and state that `signature` was planned for."""
        if not (shapeless or all(isinstance(a, mx.array) for a in arrays) and state_facts(arrays) == signature.arrays):
            return False
        return self.inputs is None or state_facts(read_slots(state_slots(self.inputs))) == signature.state

    def _retrace_reason(self, signature: Signature) -> str:
        if not self._entries:
            return "first call"
        nearest = min(self._entries, key=lambda old: len(signature.describe_change(old)))
        return "new signature: " + signature.describe_change(nearest)

    def _fallback(self, error: Exception | str, args: tuple, kwargs: dict) -> Any:
        if self.strict:
            raise error if isinstance(error, Exception) else TraceError(error)
        message = f"mlxrewrite: running {getattr(self.fn, '__qualname__', self.fn)!s} unchanged: {error}"
        if message not in self._fallbacks:
            self._fallbacks.append(message)
            log.channel("fallbacks").info("%s", message)
            warnings.warn(message, FallbackWarning, stacklevel=3)
        return self.fn(*args, **kwargs)

    # ---- looking inside ----------------------------------------------------------------------
    @property
    def traces(self) -> int:
        """How many times the function was traced (one per signature)."""
        return len(self._entries)

    def graph(self, *args: Any, **kwargs: Any) -> Graph:
        """The traced (original) graph for these arguments' signature."""
        return self._entry_for(args, kwargs).graph

    def trace_rewritten(self, *args: Any, **kwargs: Any) -> Graph:
        """The graph of the rewritten function: what `mx.compile` runs."""
        entry = self._entry_for(args, kwargs)
        recorder = Recorder(apply=Applier(entry.plan))
        return trace_call(self.fn, args, kwargs, self.inputs, self.outputs, recorder=recorder, record_sites=False)

    def _entry_for(self, args: tuple, kwargs: dict) -> Entry:
        arrays, treespec, statics = flatten_call(args, kwargs)
        signature = make_signature(arrays, treespec, statics, read_slots(state_slots(self.inputs)), self.shapeless)
        return self._entries.get(signature) or self._build(signature, args, kwargs, self.shapeless)

    def explain(self, declines: bool = False) -> str:
        """Which rules fired, where and why; every trace and the reason for it; fallbacks. `declines=True`
        adds why each rule that did not fire at a call declined."""
        lines = [f"mlxrewrite.compile({getattr(self.fn, '__qualname__', self.fn)!s}): {self.traces} trace(s); "
                 f"rules: {', '.join(r.name for r in self.rules)}"]
        lines += ["  " + h for h in self._history]
        for number, entry in enumerate(self._entries.values(), 1):
            lines.append(f"signature #{number}:")
            for index, call in enumerate(entry.plan.calls):
                where = call.location or "?"
                if call.covered_by is not None:
                    lines.append(f"  call {index} {call.api} at {where}: inside the subgraph rewritten at call "
                                 f"{call.covered_by} (dead code)")
                elif call.decision is None:
                    lines.append(f"  call {index} {call.api} at {where}: left as is (no rule matched)")
                else:
                    d = call.decision
                    lines.append(f"  call {index} {call.api} at {where}: {d.rule} -> {d.rewrite}: {d.reason}")
                if declines:
                    lines += [f"    {v.rule} declined: {v.reason}" for v in call.verdicts if isinstance(v, Decline)]
            lines += [f"  ! {m}" for m in entry.mismatches]
        lines += [f"fallback: {f}" for f in self._fallbacks]
        return "\n".join(lines)


def compile(fn: Callable | None = None, *, rules: list[Rule] | None = None, disable: tuple[str, ...] = (),
            shapeless: bool = False, inputs: Any = None, outputs: Any = None, strict: bool = False) -> Any:
    """Rewrite `fn`'s hazardous MLX calls with rules, then `mx.compile` it (usable as a decorator).

    Arguments as in `mx.compile` (`inputs=`/`outputs=` for captured state; an `nn.Module` or its bound
    method captures the module by default). `rules` adds rules, `disable` removes rules by name,
    `strict=True` raises instead of falling back to the original function.
    """
    options = dict(rules=rules, disable=disable, shapeless=shapeless, inputs=inputs, outputs=outputs,
                   strict=strict)
    if fn is None:
        return lambda f: RewrittenFunction(f, **options)
    return RewrittenFunction(fn, **options)
