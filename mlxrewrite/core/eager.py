"""Eager rewriting: apply the rules at each intercepted call as the function runs, without `mx.compile`.

For code that cannot be traced whole once per shape, such as an mlx-lm model decoding with a growing
KV cache (a whole-function trace per shape would be a trace per token). The first call of a kind is
traced alone on placeholder operands of the same shapes and dtypes, and the rules decide on that graph
exactly as they do in `mlxrewrite.compile`. Their guards read facts through `Facts`, which records each
question and answer; a later call reuses the decision when the same questions, asked of its own arrays,
get the same answers (facts.py). The KV length is not among them unless a guard reads it, so a decode
loop traces a handful of times, not once per token.

What eager mode cannot see: the operands' layouts. It analyses placeholders, which are row-major, so a
stride-0 dim hidden behind a full batch shape (an explicit `mx.broadcast_to` upstream) is not detected
here; broadcasting by shape (mlx-lm's `expand_dims` pattern) is. `mlxrewrite.audit` traces the whole
function and sees layouts. Values are not seen either, unless `check_values=True`: then a guard that
reads an operand's value (an SDPA mask) gets it checked at run time, at every call (an array may be
updated in place between two calls), except inside mx.compile or mx.vmap, where it is a tracer.

A rule's failure never reaches the user (`guard.py`): a rule that raises, or a rewrite whose result has
another shape or dtype than the call's, means the call runs as written, reported once.
"""

from __future__ import annotations

import inspect
import threading
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import mlx.core as mx
import optree

from . import guard, intercept, log, regions
from .bindings import FromAnchor, Source, Unreachable, materialise, resolve
from .constants import ConstSummary, summarize_array
from .decide import call_facts, decide_graph
from .facts import ArrayEnv, Facts
from .graph import Graph, dtype_name
from ..backends.device import Backend
from .rule import Bound, Decision, Decline, Rule, Verdict, first_decision, select_rules
from .signature import flatten_call
from .trace import CallSite, trace_call


class EagerFallbackWarning(UserWarning):
    """A call could not be analysed; it ran as written."""


@dataclass
class Analysis:
    """One traced call: its graph and call site, every rule's verdict with the facts it read, and where."""

    number: int
    api: str
    where: str
    operands: str  # the operand shapes it was first seen with
    graph: Graph | None
    site: CallSite | None
    verdicts: list[tuple[Verdict, Facts]] = field(default_factory=list)
    error: str | None = None
    sources: dict[str, Source] | None = None  # a region rewrite's placeholders, from the region's inputs
    output: Source | None = None  # the region's result as a view of the rewrite's
    note: str = ""  # why a region is keyed by exact shapes
    rule: Rule | None = None  # the rule that fired (regions: looked up once, not per call)
    # regions: the checked rewrite as one callable of (argument values, arrays), and its count's label, set
    # once its first result passed; per call the region then costs its key and this call
    fast: Callable[[tuple, list], Any] | None = None
    label: str = ""

    @property
    def outcome(self) -> str:
        """The count's label of a rewrite that ran."""
        decision = self.decision
        return f"{self.api}: {decision.rule} -> {decision.rewrite}"

    @property
    def decision(self) -> Decision | None:
        return first_decision([verdict for verdict, _ in self.verdicts])

    def holds_for(self, env: ArrayEnv) -> bool:
        """Whether every guard that ran would answer `env`'s call as it answered this one."""
        return all(facts.still_holds(env) for _, facts in self.verdicts)


def _operand_text(call: intercept.Call) -> str:
    return ", ".join(f"{k}: {dtype_name(a.dtype)}[{','.join(map(str, a.shape))}]"
                     for k, a in call.operands.items() if a is not None)


def trace_one_call(call: intercept.Call) -> tuple[Graph, CallSite]:
    """Trace `call` alone on placeholder operands (same shapes and dtypes, row-major)."""
    names = [k for k, a in call.operands.items() if a is not None]
    placeholders = tuple(mx.zeros(call.operands[k].shape, call.operands[k].dtype) for k in names)

    def one_call(*arrays: mx.array) -> mx.array:
        return call.dispatch(**dict(zip(names, arrays)))

    graph = trace_call(one_call, placeholders, {})
    site = next(s for s in graph.calls if s.source == "python")
    site.location = call.location
    return graph, site


class ForwardPass:
    """The intercept handler for one run of the function: value checks live only this long."""

    def __init__(self, rewriter: "EagerRewriter", observer: Callable[[intercept.Call], None] | None = None):
        self.rewriter = rewriter
        self.backend = rewriter.backend()
        self.observer = observer
        # region path -> its table for this pass's backend (those made by earlier passes, at once)
        self.regions: dict[str, _RegionTable] = rewriter.region_tables(self.backend)
        checker = rewriter.check_values
        self.value_check = (lambda array: checker(array, self)) if callable(checker) else \
            (self.check if checker else None)

    def __call__(self, call: intercept.Call) -> mx.array:
        if self.observer is not None:
            self.observer(call)
        return self.rewriter.handle(call, self)

    def region(self, call: regions.RegionCall) -> Any:
        """A region function was called in this pass (regions.py) and `region_fast` did not serve it."""
        if self.observer is not None:
            self.observer(call)
        return self.rewriter.handle_region(call, self)

    def region_fast(self, path: str, args: tuple, kwargs: dict[str, Any]) -> Any:
        """A region call's common case, tried first, per attention layer per token: a call of a kind already
        analysed whose fast rewrite is checked. Its result, or `regions.MISS` (then `region` takes it). Costs the
        call's generated binder, one key lookup and the rewrite: no `RegionCall`, no frame read."""
        table = self.regions.get(path)
        if table is None or self.observer is not None or not table.rules:
            return regions.MISS
        try:
            values, arrays, key = table.signature.split(args, kwargs)
            analysis = table.analyses.get(key)
        except TypeError:  # arguments the binder does not take apart (or an unhashable one): the slow way
            return regions.MISS
        return self.rewriter.served(analysis, values, arrays)

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
    """Rules applied call by call; decisions reused while their guards' facts hold. Thread-safe: one handler
    per pass."""

    def __init__(self, rules: list[Rule] | None = None, disable: tuple[str, ...] | str = (),
                 check_values: bool | Callable[[mx.array, ForwardPass], ConstSummary | None] = False):
        """`check_values`: True checks any operand a guard asks the values of, at run time; a function
        `(array, forward_pass) -> summary | None` decides which (the mlx-lm wrapper: the cache's masks)."""
        self.rules = select_rules(rules, disable)
        self.check_values = check_values
        self._by_api: dict[str, list[Rule]] = {}
        for rule in self.rules:
            if not rule.is_subgraph:
                self._by_api.setdefault(rule.api, []).append(rule)
        self.gate = intercept.Gate({api: [rule.needs for rule in rules] for api, rules in self._by_api.items()})
        self._regions: dict[str, list[Rule]] = {}
        self.notes: list[str] = []  # subgraph rules eager mode cannot apply, and why
        for rule in (r for r in self.rules if r.is_subgraph):
            why = "it names no region function" if rule.region is None else regions.install(rule.region.path)
            if why:
                self.notes.append(f"{rule.name} is not applied in eager mode: {why}")
            else:
                self._regions.setdefault(rule.region.path, []).append(rule)
        self._region_tables: dict[tuple, _RegionTable] = {}  # (region path, backend) -> rules, signature, analyses
        self._verdicts: dict[tuple, str] = {}  # (analysis, rewrite) -> "" checked fine, or why it is refused
        self._problems: list[str] = []  # rules that raised or returned a wrong result, each reported once
        self._analyses: list[Analysis] = []
        self._kinds: dict[tuple, list[Analysis]] = {}  # cheap prefix of a call -> analyses to try
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
        rules = self._by_api.get(call.api)
        operands = call.operands
        if not rules or not any(_meets(rule.needs, operands) for rule in rules):
            return call.run_original()  # no rule can fire (the gate let it through for an observer)
        value_check = forward_pass.value_check and _once_per_call(forward_pass.value_check)
        env = ArrayEnv(operands, call.params, {}, forward_pass.backend, value_check)
        kind = (call.api, tuple(None if a is None else (a.ndim, a.dtype) for a in operands.values()))
        analysis = next((a for a in self._kinds.get(kind, ()) if a.holds_for(env)), None)
        if analysis is None:
            analysis = self._analyse(kind, call, env)
        decision = analysis.decision
        if decision is None:
            self.count(f"{call.api}: left as is")
            return call.run_original()
        rule = next(r for r in rules if r.name == decision.rule)
        return self._apply(call.api, analysis, decision, lambda: guard.checked_rewrite(rule, call, decision),
                           lambda: rule.apply(call, decision), call.run_original)

    def _apply(self, api: str, analysis: Analysis, decision: Decision, checked: Callable, rewrite: Callable,
               original: Callable) -> Any:
        """The rewrite. Its first result for an analysis is checked against the call as written (shape and
        dtype); a rewrite that raised or returned something else runs as written from then on, reported."""
        memo = (analysis.number, decision.rule, decision.rewrite)
        verdict = self._verdicts.get(memo)
        outcome = f"{api}: {decision.rule} -> {decision.rewrite}"
        if verdict is None:
            result, problem = checked()
        elif verdict:
            result, problem = original(), verdict
        else:
            try:
                result, problem = rewrite(), None
            except Exception as error:  # noqa: BLE001 - a rule's bug: the call runs as written, reported
                result, problem = original(), f"rule {decision.rule} raised {type(error).__name__} in rewrite " \
                                              f"{decision.rewrite!r}: {error}"
        self._verdicts.setdefault(memo, problem or "")
        if problem:
            self._report(problem)
            outcome += " refused, ran as written"
        self.count(outcome)
        return result

    def _report(self, problem: str) -> None:
        """A rule's failure, warned about once (and listed by explain()); the call concerned runs as written."""
        if problem not in self._problems:
            self._problems.append(problem)
            _fallback(f"{problem}; the call runs as written")

    def _analyse(self, kind: tuple, call: intercept.Call, env: ArrayEnv) -> Analysis:
        with self._lock:
            analysis = next((a for a in self._kinds.get(kind, ()) if a.holds_for(env)), None)
            if analysis is not None:
                return analysis
            number = len(self._analyses) + 1
            analysis = Analysis(number, call.api, call.location or "?", _operand_text(call), None, None)
            try:
                analysis.graph, analysis.site = trace_one_call(call)
            except Exception as error:  # noqa: BLE001 - MLX rejects the call itself (a wrong K, mismatched heads)
                analysis.graph = analysis.site = None  # remembered for identical calls only: valid ones of its
                analysis.verdicts = [(None, _ExactShapes(call))]  # kind are still analysed
                analysis.error = f"{type(error).__name__}: {error}"
                _fallback(f"cannot analyse {call.api} at {call.location}; it runs as written: {analysis.error}")
            for rule in self._by_api[call.api] if analysis.error is None else ():
                facts = call_facts(analysis.site, analysis.graph, env.backend, eager=True,
                                   value_check=env.value_check, arrays=call.operands)
                try:
                    verdict = rule.decide(facts, analysis.where)
                except Exception as error:  # noqa: BLE001 - a rule's bug: it declines here, the next rules decide
                    problem = guard.rule_failure(rule, "its guard", error)
                    self._report(f"{problem} at {analysis.where}")
                    verdict, facts = Decline(rule.name, problem, analysis.where), _ExactShapes(call)
                log.verdict(verdict, "eager")
                analysis.verdicts.append((verdict, facts))
                if isinstance(verdict, Decision):
                    break
            self._analyses.append(analysis)
            self._kinds.setdefault(kind, []).append(analysis)
            log.channel("traces").info("eager trace #%d: %s at %s (%s): no earlier analysis's facts hold",
                                       number, call.api, analysis.where, analysis.operands)
            return analysis

    # ---- one region ------------------------------------------------------------------------------
    def handle_region(self, call: regions.RegionCall, forward_pass: ForwardPass) -> Any:
        """One region call. This runs per attention layer per token, so the common case (an analysis that
        holds, a rewrite already checked) is kept to the key's lookup and the rewrite itself: the rule's
        direct form where it has one (verified against the bound rewrite), else the bound rewrite."""
        table = forward_pass.regions.get(call.path) or self._region_table(call, forward_pass)
        if not table.rules:
            return call.run_original()
        try:
            values, arrays, key = table.signature.split(call.args, call.kwargs)
            analysis = table.analyses.get(key)
            if analysis is None or analysis.fast is None:  # the slow ways take lazy operands' arrays
                arrays = _concrete_arrays(arrays)
                analysis = analysis or table.analyses.get((key, _exact(arrays)))
        except TypeError:  # arguments the binder does not take apart (or an unhashable one): as written
            return call.run_original()
        if analysis is None:
            analysis = self._analyse_region(table, key, call, values, arrays, forward_pass)
        result = self.served(analysis, values, arrays)
        if result is not regions.MISS:
            return result
        decision = analysis.decision
        if decision is None:
            self.count(f"{analysis.api}: left as is")
            return call.run_original()
        rule = analysis.rule

        def bound(values: tuple, arrays: list) -> Any:  # the fast path hands it lazy operands as they came
            arrays = _concrete_arrays(arrays)
            result = rule.apply(Bound(analysis.sources, [], arrays, analysis.site.params), decision)
            return materialise(analysis.output, [], arrays, result)

        result = self._apply(analysis.api, analysis, decision,
                             lambda: _checked_region(rule, decision, analysis, lambda: bound(values, arrays),
                                                     call.run_original),
                             lambda: bound(values, arrays), call.run_original)
        if self._verdicts.get((analysis.number, decision.rule, decision.rewrite)) == "":  # checked: fine
            analysis.label = analysis.outcome
            analysis.fast, result = self._direct(rule, decision, analysis, bound, values, arrays, result)
        return result

    def _direct(self, rule: Rule, decision: Decision, analysis: Analysis, bound: Callable, values: tuple,
                arrays: list[mx.array], result: Any) -> tuple[Callable | None, Any]:
        """The region's fast rewrite: the rule's direct form (its rewrite on the function's own arguments,
        prepared once per analysis, skipping the replay of the ops before the pattern) once its first result
        equals the bound rewrite's bitwise, else the bound rewrite. Where values cannot be compared now (under
        a transformation), or it does not serve this call, the bound rewrite runs and a later call tries again."""
        prepare = rule.region.direct
        if prepare is None:
            return bound, result
        try:
            run = prepare(decision, *values)
            if run is None:  # it does not serve this analysis's calls (what it reads of them is in the key)
                return bound, result
            out = run(*values)
            if out is None:
                return None, result
            agree = isinstance(out, mx.array) and (out.dtype, out.shape) == (result.dtype, result.shape) and \
                mx.array_equal(out, result).item()
        except Exception as error:  # noqa: BLE001 - a tracer (undecidable now) or the direct form's bug
            if guard.is_transformation_error(error):
                return None, result
            self._report(f"{guard.rule_failure(rule, 'its direct form', error)} at {analysis.where}; "
                         f"its bound rewrite runs")
            return bound, result
        if not agree:
            self._report(f"rule {rule.name}'s direct form differs from its bound rewrite at {analysis.where}; "
                         f"the bound rewrite runs")
            return bound, result

        def fast(values: tuple, arrays: list) -> Any:
            out = run(*values)
            return bound(values, arrays) if out is None else out

        return fast, out

    def served(self, analysis: Analysis | None, values: tuple, arrays: list) -> Any:
        """The analysis's checked fast rewrite on one call, or `regions.MISS`: there is none yet, or it raised
        (then it is dropped, and the slow way reports the failure and runs the bound rewrite)."""
        if analysis is None or analysis.fast is None:
            return regions.MISS
        try:
            result = analysis.fast(values, arrays)
        except Exception:  # noqa: BLE001 - a rule's bug: the slow way reports it and runs the bound rewrite
            analysis.fast = None
            return regions.MISS
        self._counts[analysis.label] += 1
        return result

    def region_tables(self, backend: Backend) -> dict[str, "_RegionTable"]:
        """The region tables made so far for `backend`, by region path: a new forward pass starts with them."""
        return {path: table for (path, made_for), table in self._region_tables.items() if made_for == backend}

    def _region_table(self, call: regions.RegionCall, forward_pass: ForwardPass) -> "_RegionTable":
        """The rules of the call's region that may run on the pass's backend, the region's signature for them
        and their analyses: made once per region and backend, looked up once per forward pass."""
        backend = forward_pass.backend
        table = self._region_tables.get((call.path, backend))
        if table is None:
            rules = [rule for rule in self._regions.get(call.path, ()) if rule.runs_on(backend)]
            table = _RegionTable(rules, _region_signature(call.real, rules) if rules else None)
            self._region_tables[(call.path, backend)] = table
        forward_pass.regions[call.path] = table
        return table

    def _analyse_region(self, table: "_RegionTable", key: tuple, call: regions.RegionCall, arguments: tuple,
                        arrays: list[mx.array], forward_pass: ForwardPass) -> Analysis:
        rules = table.rules
        arguments = tuple(regions.concrete(value) for value in arguments)  # traced and decided as arrays
        with self._lock:
            number = len(self._analyses) + 1
            name = call.path.rsplit(":", 1)[-1]
            text = ", ".join(f"{dtype_name(a.dtype)}[{','.join(map(str, a.shape))}]" for a in arrays)
            analysis = Analysis(number, f"region {name}", call.location or "?", text, None, None)
            try:
                found = _decide_region(call, rules, arguments, forward_pass.backend)
                analysis.graph, analysis.site, analysis.verdicts = found.graph, found.site, found.verdicts
                analysis.sources, analysis.output = found.sources, found.output
                decision = found.decision
                analysis.rule = next((r for r in rules if decision and r.name == decision.rule), None)
                facts = _array_facts(table.signature.describe(arguments)[1])
                if not self._free_claim_holds(call, rules, arguments, facts, found, forward_pass.backend):
                    analysis.note = "its decision changed with the dims the rule declares free: keyed by exact shapes"
                    key = (key, _exact(arrays))
            except Exception as error:  # noqa: BLE001 - any failure means "run as written, reported once"
                analysis.graph = analysis.site = analysis.sources = None
                analysis.verdicts = []
                analysis.error = f"{type(error).__name__}: {error}"
                _fallback(f"cannot analyse {analysis.api} at {analysis.where}; it runs as written: {analysis.error}")
            self._analyses.append(analysis)
            table.analyses[key] = analysis
            log.channel("traces").info("eager trace #%d: %s at %s (%s): a new region kind%s", number, analysis.api,
                                       analysis.where, analysis.operands, f" ({analysis.note})" if analysis.note else "")
            return analysis

    def _free_claim_holds(self, call: regions.RegionCall, rules: list[Rule], arguments: tuple, facts: tuple,
                          found: RegionDecision, backend: Backend) -> bool:
        """Trace once more with every free dim one longer: the decision must not change, and the planned
        sources, replayed on the longer arguments, must give the arrays that trace binds."""
        if all(-1 not in shape for _, shape in facts):
            return True
        leaves, treespec = optree.tree_flatten(arguments, none_is_leaf=False)
        it = iter(facts)
        grown = []
        for leaf in leaves:
            if isinstance(leaf, mx.array):
                dtype, shape = next(it)
                leaf = mx.zeros(tuple(n + 1 if k == -1 else n for n, k in zip(leaf.shape, shape)), dtype)
            grown.append(leaf)
        longer = optree.tree_unflatten(treespec, grown)
        again = _decide_region(call, rules, longer, backend)
        first, second = found.decision, again.decision
        if (first is None) != (second is None):
            return False
        if first is None:
            return True
        if (first.rewrite, first.params) != (second.rewrite, second.params) or again.match is None:
            return False
        inputs, _, _ = flatten_call(longer, {})
        return all(materialise(source, [], inputs).shape == again.graph.values[again.match.bindings[name]].shape
                   for name, source in found.sources.items())

    def count(self, what: str) -> None:
        self._counts[what] += 1

    # ---- looking inside -------------------------------------------------------------------------
    @property
    def traces(self) -> int:
        """How many calls were traced (one per new combination of the facts the guards read)."""
        return len(self._analyses)

    @property
    def calls(self) -> dict[str, int]:
        """How often each outcome ran: per API, which rule and rewrite or "left as is"; value checks."""
        return dict(self._counts)

    def analyses(self) -> list[Analysis]:
        return list(self._analyses)

    def explain(self, declines: bool = False) -> str:
        """Each analysis (a call whose facts no earlier analysis covered) and its decision; how often each
        outcome ran. `declines=True` adds why each rule that did not fire declined."""
        lines = [f"mlxrewrite eager: {self.traces} call trace(s), one per new set of facts the rules read; rules: "
                 f"{', '.join(r.name for r in self.rules)}"
                 + ("; runtime value checks on" if self.check_values else "")]
        lines += [f"  {note}" for note in self.notes]
        for a in self._analyses:
            head = f"  trace #{a.number}: {a.api} at {a.where} ({a.operands})" + (f" [{a.note}]" if a.note else "")
            decision = a.decision
            if a.error is not None:
                lines.append(f"{head}: not analysed, runs as written: {a.error}")
            elif decision is None:
                lines.append(f"{head}: no rule fires")
            else:
                lines.append(f"{head}: {decision.rule} -> {decision.rewrite}: {decision.reason}")
            if declines:
                lines += [f"    {v.rule} declined: {v.reason}" for v, _ in a.verdicts if v is not None
                          and not isinstance(v, Decision)]
        lines += [f"  ! {problem}; the call runs as written" for problem in self._problems]
        if self._counts:
            lines.append("  calls: " + "; ".join(f"{what} x{n}" for what, n in sorted(self._counts.items())))
        return "\n".join(lines)


@dataclass
class RegionDecision:
    """One region call traced and decided: the anchor site, its verdicts, and, where a rule fired, where
    the rewrite's placeholders and the region's result come from."""

    graph: Graph
    site: CallSite | None = None
    verdicts: list = field(default_factory=list)
    match: Any = None
    sources: dict[str, Source] | None = None
    output: Source | None = None

    @property
    def decision(self) -> Decision | None:
        return first_decision([verdict for verdict, _ in self.verdicts])


def _decide_region(call: regions.RegionCall, rules: list[Rule], arguments: tuple, backend: Backend) -> RegionDecision:
    """Trace one region call and decide on its graph. The anchor is the call a rule matched at, else the last
    call of the rules' API (its declines say why). The region's output must be its anchor's output or a view
    of it (what the function does after the anchor); else the decision becomes a decline."""
    graph = trace_call(call.real, arguments, {})
    sites = [s for s in graph.calls if s.source == "python"]
    apis = {rule.api for rule in rules}
    entries = [e for e in decide_graph(rules, graph, backend, sites, from_calls=False, path="eager region")
               if e.site.api in apis]
    if not entries:
        return RegionDecision(graph)
    anchor = next((e for e in entries if e.match is not None), entries[-1])
    found = RegionDecision(graph, anchor.site, [(verdict, None) for verdict in anchor.verdicts])
    if anchor.match is None:
        return found
    result = anchor.match.anchor.outputs[0]
    try:
        found.output = resolve(graph, graph.outputs[0], lambda name: FromAnchor() if name == result else None,
                               constant_limit=1)
    except Unreachable as unreachable:
        decision = found.verdicts[-1][0]
        found.verdicts[-1] = (Decline(decision.rule, f"the region's result is not a view of the rewritten value: "
                                                     f"{unreachable}", decision.where), None)
        return found
    found.match, found.sources = anchor.match, anchor.sources
    return found


def _exact(arrays: list[mx.array]) -> tuple:
    return tuple(a.shape for a in arrays)


def _concrete_arrays(arrays: list) -> list[mx.array]:
    """`arrays` with each lazy operand replaced by its arrays (the flatten order of the tuple it stands for)."""
    if all(type(a) is mx.array for a in arrays):
        return arrays
    return [x for a in arrays for x in (a.materialise() if isinstance(a, regions.LazyOperand) else (a,))]


_MISSING = object()


class _RegionSignature:
    """A region function's parameters, read once, to take a call apart and key it in a few microseconds
    (inspect's `bind` and optree cost more than the rest of a fused call). As TorchDynamo compiles its
    guards, each way of calling seen (how many arguments are positional, which are named, and which are
    arrays, tuples of arrays, lazy operands or static values) gets a generated function that checks it and
    binds and keys the call with no loop; others take the general way."""

    MAX_LAYOUTS = 8

    def __init__(self, names: tuple[str, ...], defaults: dict[str, Any], free: dict[str, int]):
        self.names = names
        self.defaults = defaults
        # per count of positional arguments: the other parameters' names, defaults, and which are required
        self._rest = tuple((names[n:], tuple(defaults.get(name, _MISSING) for name in names[n:]),
                            tuple(i for i in range(n, len(names)) if names[i] not in defaults))
                           for n in range(len(names)))
        self._allowed = tuple(frozenset(names[n:]) for n in range(len(names) + 1))
        self._free = tuple(free.get(name) for name in names)  # the dim each argument's arrays leave free
        self._binders: list[Callable[[tuple, dict], tuple | None]] = []

    def split(self, args: tuple, kwargs: dict) -> tuple[tuple, list, tuple]:
        """(every parameter's value in order, the arrays in flatten order, the key: per argument an array's
        (dtype, shape with its free dim as -1), a tuple of such for a tuple of arrays, ("lazy", its type,
        its `region_layout`) for a lazy operand, or ("static", value)). TypeError: not arguments it takes apart."""
        for binder in self._binders:
            found = binder(args, kwargs)
            if found is not None:
                return found
        values = self.values(args, kwargs)
        arrays, key, layout = self.describe(values)
        if len(self._binders) < self.MAX_LAYOUTS:
            self._binders.append(_binder(self, len(args), tuple(kwargs), layout))
        return values, arrays, key

    def values(self, args: tuple, kwargs: dict) -> tuple:
        """Every parameter's value in order, defaults filled in; TypeError where the arguments do not fit."""
        n = len(args)
        if n > len(self.names) or (kwargs and not kwargs.keys() <= self._allowed[n]):
            raise TypeError("arguments do not fit the region's parameters")
        if n == len(self.names):
            return args
        rest, defaults, required = self._rest[n]
        values = args + tuple(map(kwargs.get, rest, defaults))
        for i in required:
            if values[i] is _MISSING:
                raise TypeError("a required argument of the region is missing")
        return values

    def describe(self, values: tuple) -> tuple[list, tuple, list]:
        """The general way: arrays, key and layout (per argument "array", (tuple or list, length), ("lazy",
        its type) or "static"). A lazy operand is one entry of the arrays, keyed by its `region_layout`."""
        arrays: list = []
        key, layout = [], []
        for value, free in zip(values, self._free):
            kind = type(value)
            if kind is mx.array:
                arrays.append(value)
                key.append(_array_key(value, free))
                layout.append("array")
            elif isinstance(value, regions.LazyOperand):
                arrays.append(value)
                key.append(("lazy", kind, value.region_layout))
                layout.append(("lazy", kind))
            elif (kind is tuple or kind is list) and value and all(type(a) is mx.array for a in value):
                arrays.extend(value)
                key.append((kind, tuple([_array_key(a, free) for a in value])))
                layout.append((kind, len(value)))
            else:
                key.append(("static", value))
                layout.append("static")
        return arrays, tuple(key), layout


_FREE = (-1,)


def _array_key(a: mx.array, free: int | None) -> tuple:
    """(dtype, shape with dim `free` as -1)."""
    shape = a.shape
    if free is None:
        return a.dtype, shape
    return a.dtype, shape[:free] + _FREE + (shape[free + 1:] if free != -1 else ())


def _binder(signature: _RegionSignature, positional: int, named: tuple[str, ...], layout: list
            ) -> Callable[[tuple, dict], tuple | None]:
    """A function of a call's (args, kwargs) giving (values, arrays, key) exactly as `split`'s general way
    would, or None where the call is not made this way: `positional` arguments, the parameters `named` by
    keyword (the others by default), values of this `layout`."""
    outer, inner, arrays, key, unpack = [], [], [], [], []

    def array(name: str, dim: int | None, checks: list[str]) -> str:
        checks.append(f"type({name}) is not A")
        arrays.append(name)
        if dim is None:
            return f"({name}.dtype, {name}.shape)"
        tail = "" if dim == -1 else f" + s_{name}[{dim + 1}:]"  # one shape read per array: each builds a tuple
        return f"({name}.dtype, (s_{name} := {name}.shape)[:{dim}] + F{tail})"

    scope = {"A": mx.array, "F": _FREE, "Lazy": regions.LazyOperand, "NOT_STATIC": frozenset({mx.array, tuple, list}),
             "MISSING": _MISSING}
    names = [f"x{i}" for i in range(len(layout))]
    binding = [f"    {''.join(f'{x}, ' for x in names[:positional])}= args"] if positional else []
    for i, parameter in enumerate(signature.names[positional:], positional):
        if parameter in named:
            binding.append(f"    x{i} = kwargs.get({parameter!r}, MISSING)")
            outer.append(f"x{i} is MISSING")
        else:
            scope[f"D{i}"] = signature.defaults[parameter]
            binding.append(f"    x{i} = D{i}")
    for i, (entry, dim) in enumerate(zip(layout, signature._free)):
        name = names[i]
        if entry == "array":
            key.append(array(name, dim, outer))
        elif entry == "static":
            outer.append(f"type({name}) in NOT_STATIC or isinstance({name}, Lazy)")
            key.append(f"('static', {name})")
        elif entry[0] == "lazy":
            scope[f"L{i}"] = entry[1]
            outer.append(f"type({name}) is not L{i}")
            arrays.append(name)
            key.append(f"('lazy', L{i}, {name}.region_layout)")
        else:
            kind, length = entry
            items = [f"{name}_{j}" for j in range(length)]
            outer.append(f"type({name}) is not {kind.__name__} or len({name}) != {length}")
            unpack.append(f"{', '.join(items)}, = {name}")
            key.append(f"({kind.__name__}, ({''.join(array(item, dim, inner) + ', ' for item in items)}))")
    source = "\n".join([
        "def binder(args, kwargs):",
        f"    if len(args) != {positional} or len(kwargs) != {len(named)}:",
        "        return None",
        *binding,
        f"    if {' or '.join(outer) or 'False'}:",
        "        return None",
        *(f"    {line}" for line in unpack),
        f"    if {' or '.join(inner) or 'False'}:",
        "        return None",
        f"    return ({''.join(x + ', ' for x in names)}), [{', '.join(arrays)}], ({''.join(k + ', ' for k in key)})",
    ])
    exec(compile(source, "<region binder>", "exec"), scope)  # noqa: S102 - our own generated guard, as Dynamo's
    return scope["binder"]


def _array_facts(key: tuple) -> list[tuple]:
    """The (dtype, shape) entries of a region key, in the arrays' flatten order."""
    facts: list[tuple] = []
    for entry in key:
        if entry[0] in (tuple, list):
            facts += entry[1]
        elif entry[0] != "static":
            facts.append(entry)
    return facts


@dataclass
class _RegionTable:
    """A region's rules on one backend, its signature, and its analyses by key."""

    rules: list[Rule]
    signature: _RegionSignature | None
    analyses: dict[tuple, Analysis] = field(default_factory=dict)


def _region_signature(fn: Callable, rules: list[Rule]) -> _RegionSignature:
    """The parameters of region function `fn`, and the dims `rules` declare free."""
    parameters = inspect.signature(fn).parameters.values()
    free: dict[str, int] = {}
    for rule in rules:
        free.update(rule.region.free)
    return _RegionSignature(tuple(p.name for p in parameters),
                            {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}, free)


def _fallback(message: str) -> None:
    log.channel("fallbacks").info("eager: %s", message)
    warnings.warn(f"mlxrewrite: {message}", EagerFallbackWarning, stacklevel=6)


def _once_per_call(check: Callable[[mx.array], Any]) -> Callable[[mx.array], Any]:
    """`check`, evaluating each array once for this call (its guards may ask twice: reuse, then analysis)."""
    seen: dict[int, Any] = {}

    def checked(array: mx.array) -> Any:
        if id(array) not in seen:
            seen[id(array)] = check(array)
        return seen[id(array)]

    return checked


def _meets(needs: dict[str, int], operands: dict[str, Any]) -> bool:
    return all(isinstance(operands.get(name), mx.array) and operands[name].ndim >= dims for name, dims in needs.items())


def _checked_region(rule: Rule, decision: Decision, analysis: Analysis, rewrite: Callable,
                    original: Callable) -> tuple[Any, str | None]:
    """A region rewrite's first result against the traced region's output (dtype and rank: its shape has the
    free dims of the first call)."""
    try:
        result = rewrite()
    except Exception as error:  # noqa: BLE001 - a rule's bug: the region runs as written, reported
        return original(), guard.rule_failure(rule, f"rewrite {decision.rewrite!r}", error)
    traced = analysis.graph.values[analysis.graph.outputs[0]]
    if not isinstance(result, mx.array) or result.dtype != traced.dtype or result.ndim != len(traced.shape):
        got = type(result).__name__ if not isinstance(result, mx.array) else f"{dtype_name(result.dtype)} rank {result.ndim}"
        return original(), (f"rule {rule.name} rewrite {decision.rewrite!r} returned {got} where the region gives "
                            f"{traced.type_str}")
    return result, None


class _ExactShapes(Facts):
    """The facts of a call whose analysis failed: its exact operand shapes and parameters, so that the
    failure is remembered for identical calls only (one bad call must not poison others of its kind)."""

    def __init__(self, call: intercept.Call):
        super().__init__(None)
        self.shapes = {k: None if a is None else tuple(a.shape) for k, a in call.operands.items()}
        self.params = dict(call.params)

    def still_holds(self, env: ArrayEnv) -> bool:
        return env.params == self.params and all(
            (a is None and self.shapes.get(k) is None) or (a is not None and tuple(a.shape) == self.shapes.get(k))
            for k, a in env.arrays.items())


def eager(fn: Callable | None = None, *, rules: list[Rule] | None = None, disable: tuple[str, ...] | str = (),
          check_values: bool = False) -> Any:
    """Rewrite `fn`'s hazardous MLX calls as it runs, without compiling it (usable as a decorator).

    The returned function has `.rewriter` (with `explain()` and `traces`).
    """
    rewriter = EagerRewriter(rules, disable, check_values)
    return rewriter if fn is None else rewriter(fn)
