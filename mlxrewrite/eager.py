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
declares as `value_operands` (SDPA masks) are checked at run time, at every call (not inside mx.compile or
mx.vmap, where they are tracers).

A rule's failure never reaches the user (`guard.py`): a rule that raises, or a rewrite whose result has
another shape or dtype than the call's, means the call runs as written, reported once.
"""

from __future__ import annotations

import threading
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Hashable

import mlx.core as mx

from . import guard, intercept
from .constants import ConstSummary, summarize_array
from .graph import Graph, dtype_name
from .policy import Backend
from .rule import Decision, Rule, select_rules
from .trace import CallSite, trace_call


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
        self.decided: dict[Hashable, Decision | None] = {}  # value-dependent decisions of this pass

    def __call__(self, call: intercept.Call) -> mx.array:
        if self.observer is not None:
            self.observer(call)
        return self.rewriter.handle(call, self)

    def check(self, array: mx.array) -> ConstSummary | None:
        """A runtime value summary of `array` as it is now: one synchronisation per call, not per array, as
        an array may be updated in place between two calls (`m[..., 0] = False`) and MLX shows no sign of
        it. None for a tracer (inside mx.compile or mx.vmap MLX refuses to evaluate): the mask is kept."""
        facts = f"{dtype_name(array.dtype)}[{','.join(map(str, array.shape))}]"
        try:
            summary = summarize_array(array, source="runtime check")
        except (RuntimeError, ValueError) as error:
            if not guard.is_transformation_error(error):
                raise
            self.rewriter.count(f"value check skipped ({facts}): a tracer inside mx.compile / mx.vmap, kept")
            return None
        self.rewriter.count(f"value check ({facts})")
        return summary


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
        self._verdicts: dict[tuple, str] = {}  # (analysis, rewrite) -> "" checked fine, or why it is refused
        self._problems: list[str] = []  # rules that raised or returned a wrong result, each reported once
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
        keys = guard.guarded_key(rules, call, forward_pass.backend, self._report)  # None: a site_key raised
        if keys is None or all(key is None for key in keys):
            return call.run_original()  # no rule can fire: the common, cheap case
        key = (call.api, forward_pass.backend, keys)
        # a call MLX rejected is remembered under its exact shapes, not the site key: valid calls share that
        analysis = self._analyses.get(key) or self._analyses.get(_invalid_key(key, call)) or self._analyse(key, call)
        if analysis.graph is None or analysis.error is not None:
            return call.run_original()
        values = self._values(call, rules, keys, forward_pass)
        if values:
            decision = self._decide_with_values(analysis, values, forward_pass)
        else:
            decision = analysis.decision
        if decision is None:
            self.count(f"{call.api}: left as is")
            return call.run_original()
        return self._apply(next(r for r in rules if r.name == decision.rule), call, decision, analysis)

    def _apply(self, rule: Rule, call: intercept.Call, decision: Decision, analysis: Analysis) -> mx.array:
        """The rewrite. Its first result for an analysis is checked against the call as written (shape and
        dtype); a rewrite that raised or returned something else runs as written from then on, reported."""
        memo = (analysis.number, decision.rule, decision.rewrite)
        verdict = self._verdicts.get(memo)
        if verdict is None:
            result, problem = guard.checked_rewrite(rule, call, decision)
        elif verdict:
            result, problem = call.run_original(), verdict
        else:
            try:
                return self._counted(call.api, f"{decision.rule} -> {decision.rewrite}", rule.apply(call, decision))
            except Exception as error:
                result, problem = call.run_original(), guard.rule_failure(rule, f"rewrite {decision.rewrite!r}", error)
        self._verdicts[memo] = problem or ""
        if problem:
            self._report(problem)
            return self._counted(call.api, f"{decision.rule} -> {decision.rewrite} refused, ran as written", result)
        return self._counted(call.api, f"{decision.rule} -> {decision.rewrite}", result)

    def _counted(self, api: str, outcome: str, result: mx.array) -> mx.array:
        self.count(f"{api}: {outcome}")
        return result

    def _report(self, problem: str) -> None:
        """A rule's failure, warned about once (and listed by explain()); the call concerned runs as written."""
        if problem not in self._problems and problem not in (a.error for a in self._analyses.values()):
            self._problems.append(problem)
            warnings.warn(f"mlxrewrite: {problem}; the call runs as written", EagerFallbackWarning, stacklevel=6)

    def _analyse(self, key: Hashable, call: intercept.Call) -> Analysis:
        with self._lock:
            if key in self._analyses:
                return self._analyses[key]
            number = len(self._analyses) + 1
            try:
                analysis = analyse(call, number)
            except Exception as error:
                analysis = Analysis(number, call.api, call.location or "?", _operand_text(call), None, None, None,
                                    error=str(error))
                warnings.warn(f"mlxrewrite: cannot analyse {call.api} at {call.location}; it runs as written: "
                              f"{error}", EagerFallbackWarning, stacklevel=5)
                # a call MLX rejects itself (a wrong K, mismatched head dims) is remembered under its exact
                # shapes only: valid calls with its site key are still analysed
                self._analyses[key if _valid(call) else _invalid_key(key, call)] = analysis
                return analysis
            analysis.decision, analysis.error = guard.guarded_decision(self.rules, analysis.site, analysis.graph,
                                                                       key[1])
            if analysis.error is not None:  # reported once here; explain() shows it with the analysis
                warnings.warn(f"mlxrewrite: {analysis.error}; the call runs as written", EagerFallbackWarning,
                              stacklevel=5)
            self._analyses[key] = analysis
            return analysis

    def _values(self, call: intercept.Call, rules: list[Rule], keys: tuple,
                forward_pass: ForwardPass) -> dict[str, ConstSummary]:
        if not self.check_values:
            return {}
        names = {name for rule, key in zip(rules, keys) if key is not None for name in rule.value_operands}
        checked = {name: forward_pass.check(call.operands[name]) for name in names
                   if isinstance(call.operands.get(name), mx.array)}
        return {name: summary for name, summary in checked.items() if summary is not None}

    def _decide_with_values(self, analysis: Analysis, values: dict[str, ConstSummary],
                            forward_pass: ForwardPass) -> Decision | None:
        """Decide again with the checked values in place of "unknown" (cheap: no trace)."""
        memo = (analysis.number, tuple(sorted(values.items(), key=lambda item: item[0])))  # by value
        if memo not in forward_pass.decided:
            with self._lock:
                graph_values = [analysis.graph.values[analysis.site.operands[k]] for k in values]
                for value, summary in zip(graph_values, values.values()):
                    value.constant = summary
                try:
                    forward_pass.decided[memo], problem = guard.guarded_decision(
                        self.rules, analysis.site, analysis.graph, forward_pass.backend)
                finally:
                    for value in graph_values:
                        value.constant = None
            if problem is not None:
                self._report(problem)
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
        lines += [f"  ! {problem}; the call runs as written" for problem in self._problems]
        if self._counts:
            lines.append("  calls: " + "; ".join(f"{what} x{n}" for what, n in sorted(self._counts.items())))
        return "\n".join(lines)


def _valid(call: intercept.Call) -> bool:
    """Whether MLX accepts the call's operands (built lazily, never evaluated)."""
    try:
        call.run_original()
    except Exception:
        return False
    return True


def _invalid_key(key: Hashable, call: intercept.Call) -> Hashable:
    """Where a call that MLX rejected is remembered: its site key and exact operands and parameters."""
    return "invalid call", key, _operand_text(call), repr(sorted(call.params.items(), key=lambda kv: kv[0]))


def eager(fn: Callable | None = None, *, rules: list[Rule] | None = None, disable: tuple[str, ...] = (),
          check_values: bool = False) -> Any:
    """Rewrite `fn`'s hazardous MLX calls as it runs, without compiling it (usable as a decorator).

    The returned function has `.rewriter` (with `explain()` and `traces`).
    """
    rewriter = EagerRewriter(rules, tuple(disable), check_values)
    return rewriter if fn is None else rewriter(fn)
