"""Eager rewriting: apply the rules at each intercepted call as the function runs, without `mx.compile`.

For code that cannot be traced whole once per shape, such as an mlx-lm model decoding with a growing
KV cache (a whole-function trace per shape would be a trace per token). Each call is keyed by the facts
its rules' decisions depend on (`Rule.site_key`). The first call with a new key is traced alone on
placeholder operands of the same shapes and dtypes, and the rules decide on that graph exactly as they do
in `mlxrewrite.compile`. Later calls with the same key reuse the decision, so a decode loop traces a
handful of times, not once per token.

What eager mode cannot see: the operands' layouts. It analyses placeholders, which are row-major, so a
stride-0 dim hidden behind a full batch shape (an explicit `mx.broadcast_to` upstream) is not detected
here; broadcasting by shape (mlx-lm's `expand_dims` pattern) is. `mlxrewrite.audit` traces the whole
function and sees layouts. Values are not seen either, unless `check_values=True`: then operands a rule
declares as `value_operands` (SDPA masks) are checked at run time, once per array per forward pass.
"""

from __future__ import annotations

import threading
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Hashable

import mlx.core as mx

from . import intercept
from .constants import ConstSummary, summarize_array
from .graph import Graph, dtype_name
from .policy import Backend
from .rule import Decision, Rule, first_decision, select_rules
from .trace import CallSite, TraceError, trace_call


class EagerFallbackWarning(UserWarning):
    """A call could not be analysed; it ran as written."""


@dataclass
class Analysis:
    """One traced call: its graph and call site, the decision, and the call it was made for."""

    number: int
    api: str
    where: str
    operands: str  # the operand shapes it was first seen with
    graph: Graph | None
    site: CallSite | None
    decision: Decision | None
    error: str | None = None


def _operand_text(call: intercept.Call) -> str:
    return ", ".join(f"{k}: {dtype_name(a.dtype)}[{','.join(map(str, a.shape))}]"
                     for k, a in call.operands.items() if a is not None)


def analyse(call: intercept.Call, number: int) -> Analysis:
    """Trace `call` alone on placeholder operands (same shapes and dtypes, row-major)."""
    names = [k for k, a in call.operands.items() if a is not None]
    placeholders = tuple(mx.zeros(call.operands[k].shape, call.operands[k].dtype) for k in names)

    def one_call(*arrays: mx.array) -> mx.array:
        return call.dispatch(**dict(zip(names, arrays)))

    graph = trace_call(one_call, placeholders, {})
    site = next(s for s in graph.calls if s.source == "python")
    site.location = call.location
    return Analysis(number, call.api, call.location or "?", _operand_text(call), graph, site, None)


class ForwardPass:
    """The intercept handler for one run of the function: value checks live only this long."""

    def __init__(self, rewriter: "EagerRewriter", observer: Callable[[intercept.Call], None] | None = None):
        self.rewriter = rewriter
        self.backend = rewriter.backend()
        self.observer = observer
        self.checked: dict[int, tuple[mx.array, ConstSummary]] = {}  # id -> (array kept alive, summary)
        self.decided: dict[Hashable, Decision | None] = {}  # value-dependent decisions of this pass

    def __call__(self, call: intercept.Call) -> mx.array:
        if self.observer is not None:
            self.observer(call)
        return self.rewriter.handle(call, self)

    def check(self, array: mx.array) -> ConstSummary:
        """A runtime value summary, once per array per pass (one synchronisation)."""
        known = self.checked.get(id(array))
        if known is None:
            known = self.checked[id(array)] = (array, summarize_array(array, source="runtime check"))
            self.rewriter.count(f"value check ({dtype_name(array.dtype)}[{','.join(map(str, array.shape))}])")
        return known[1]


class EagerRewriter:
    """Rules applied call by call; decisions cached per site key. Thread-safe: one handler per pass."""

    def __init__(self, rules: list[Rule] | None = None, disable: tuple[str, ...] = (), check_values: bool = False):
        self.rules = select_rules(rules, disable)
        self.check_values = check_values
        self._by_api: dict[str, list[Rule]] = {}
        for rule in self.rules:
            self._by_api.setdefault(rule.api, []).append(rule)
        self.gate = intercept.Gate({api: [rule.needs for rule in rules] for api, rules in self._by_api.items()})
        self._analyses: dict[Hashable, Analysis] = {}
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._backend: tuple[mx.Device, Backend] | None = None

    def backend(self) -> Backend:
        """The backend (and doctor profile) as of this rewriter's first pass on the current default device:
        read once, not per forward pass (a profile written later applies to rewriters made later)."""
        device = mx.default_device()
        if self._backend is None or self._backend[0] != device:
            self._backend = (device, Backend.current())
        return self._backend[1]

    def run(self, fn: Callable, args: tuple, kwargs: dict[str, Any],
            observer: Callable[[intercept.Call], None] | None = None, patch_mlx: bool = True) -> Any:
        """`fn(*args, **kwargs)` as one forward pass, this rewriter handling the intercepted calls (in
        this thread / task).

        Only calls some rule may fire on reach it (`Rule.needs`), unless an `observer` is given: that
        sees every intercepted call. `patch_mlx=False`: only calls through `intercept.instrumented_mlx()`
        are intercepted (see `intercept.activate`)."""
        forward_pass = ForwardPass(self, observer)
        token = intercept.activate(forward_pass, None if observer is not None else self.gate, patch_mlx)
        try:
            return fn(*args, **kwargs)
        finally:
            intercept.deactivate(token, patch_mlx)

    def __call__(self, fn: Callable) -> Callable:
        """Decorate `fn` so that every call is one forward pass (`run`)."""
        def run(*args: Any, **kwargs: Any) -> Any:
            return self.run(fn, args, kwargs)

        run.__wrapped__ = fn
        run.rewriter = self
        return run

    # ---- one call -------------------------------------------------------------------------------
    def handle(self, call: intercept.Call, forward_pass: ForwardPass) -> mx.array:
        rules = self._by_api.get(call.api, ())
        keys = tuple([rule.key(call, forward_pass.backend) for rule in rules])
        if all(key is None for key in keys):
            return call.run_original()  # no rule can fire: the common, cheap case
        key = (call.api, forward_pass.backend, keys)
        analysis = self._analyses.get(key) or self._analyse(key, call)
        if analysis.graph is None:
            return call.run_original()
        values = self._values(call, rules, keys, forward_pass)
        if values:
            decision = self._decide_with_values(analysis, values, forward_pass)
        else:
            decision = analysis.decision
        if decision is None:
            self.count(f"{call.api}: left as is")
            return call.run_original()
        self.count(f"{call.api}: {decision.rule} -> {decision.rewrite}")
        return next(r for r in rules if r.name == decision.rule).apply(call, decision)

    def _analyse(self, key: Hashable, call: intercept.Call) -> Analysis:
        with self._lock:
            if key in self._analyses:
                return self._analyses[key]
            number = len(self._analyses) + 1
            try:
                analysis = analyse(call, number)
                analysis.decision = first_decision(self.rules, analysis.site, analysis.graph, key[1])
            except (TraceError, RuntimeError, ValueError, TypeError) as error:
                analysis = Analysis(number, call.api, call.location or "?", _operand_text(call), None, None, None,
                                    error=str(error))
                warnings.warn(f"mlxrewrite: cannot analyse {call.api} at {call.location}; it runs as written: "
                              f"{error}", EagerFallbackWarning, stacklevel=5)
            self._analyses[key] = analysis
            return analysis

    def _values(self, call: intercept.Call, rules: list[Rule], keys: tuple,
                forward_pass: ForwardPass) -> dict[str, ConstSummary]:
        if not self.check_values:
            return {}
        names = {name for rule, key in zip(rules, keys) if key is not None for name in rule.value_operands}
        return {name: forward_pass.check(call.operands[name]) for name in names
                if isinstance(call.operands.get(name), mx.array)}

    def _decide_with_values(self, analysis: Analysis, values: dict[str, ConstSummary],
                            forward_pass: ForwardPass) -> Decision | None:
        """Decide again with the checked values in place of "unknown" (cheap: no trace)."""
        memo = (analysis.number, tuple(sorted((k, id(v)) for k, v in values.items())))
        if memo not in forward_pass.decided:
            with self._lock:
                graph_values = [analysis.graph.values[analysis.site.operands[k]] for k in values]
                for value, summary in zip(graph_values, values.values()):
                    value.constant = summary
                try:
                    forward_pass.decided[memo] = first_decision(self.rules, analysis.site, analysis.graph,
                                                                forward_pass.backend)
                finally:
                    for value in graph_values:
                        value.constant = None
        return forward_pass.decided[memo]

    def count(self, what: str) -> None:
        self._counts[what] += 1

    # ---- looking inside -------------------------------------------------------------------------
    @property
    def traces(self) -> int:
        """How many calls were traced (one per new site key), however many calls ran."""
        return len(self._analyses)

    @property
    def calls(self) -> dict[str, int]:
        """How often each outcome ran: per API, which rule and rewrite or "left as is"; value checks."""
        return dict(self._counts)

    def analyses(self) -> list[Analysis]:
        return list(self._analyses.values())

    def explain(self) -> str:
        """Each analysis (why it happened: a new site key) and its decision; how often each outcome ran."""
        lines = [f"mlxrewrite eager: {self.traces} call trace(s), one per new site key; rules: "
                 f"{', '.join(r.name for r in self.rules)}"
                 + ("; runtime value checks on" if self.check_values else "")]
        for a in self._analyses.values():
            head = f"  trace #{a.number}: {a.api} at {a.where} ({a.operands})"
            if a.error is not None:
                lines.append(f"{head}: not analysed, runs as written: {a.error}")
            elif a.decision is None:
                lines.append(f"{head}: no rule fires")
            else:
                lines.append(f"{head}: {a.decision.rule} -> {a.decision.rewrite}: {a.decision.reason}")
        if self._counts:
            lines.append("  calls: " + "; ".join(f"{what} x{n}" for what, n in sorted(self._counts.items())))
        return "\n".join(lines)


def eager(fn: Callable | None = None, *, rules: list[Rule] | None = None, disable: tuple[str, ...] = (),
          check_values: bool = False) -> Any:
    """Rewrite `fn`'s hazardous MLX calls as it runs, without compiling it (usable as a decorator).

    The returned function has `.rewriter` (with `explain()` and `traces`).
    """
    rewriter = EagerRewriter(rules, tuple(disable), check_values)
    return rewriter if fn is None else rewriter(fn)
