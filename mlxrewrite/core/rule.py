"""What a rule is: a pattern, guards over named facts, and rewrites. Both paths decide through `decide`.

    RULE = Rule(name, severity, hazard, pattern=CallPattern("quantized_matmul"), guard=guard,
                rewrites={"fold": fold, ...}, doc=__doc__)

- `pattern` (pattern.py): one intercepted call, or a subgraph written as MLX code.
- `guard(facts) -> Decision | Decline`: reads the match through `Facts` (facts.py), which records every
  read. The eager cache key is derived from exactly those reads, so there is no hand-written key to drift.
  A guard that asks for a fact the path cannot supply (values in eager mode without check_values, say)
  declines with that reason instead of silently doing nothing.
- `rewrites[name](matched, decision) -> mx.array`: receives what it matched (tinygrad's way): the
  intercepted `Call` for a call pattern (operands, params, `run_original`), a `Bound` for a subgraph
  (the placeholders' arrays).
- `probes` (optional): the module with the rule's `mlxrewrite doctor` probes; its guard then reads what they
  measured through `Backend.profile` (the rule's own section of it).
The rule's module docstring says the hazard, the evidence, the rewrite and when it must not fire.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import mlx.core as mx

from . import intercept
from .bindings import Source, materialise, view_root
from .facts import Facts, FactUnavailable
from .pattern import CallPattern, GraphPattern, Pattern


@dataclass(frozen=True)
class Decision:
    """A rule fires: which rewrite, why, and what the rewrite needs to know."""

    rule: str
    rewrite: str
    reason: str
    params: dict[str, Any] = field(default_factory=dict)
    where: str = ""  # the call site (file:line), filled in by the path that decided


@dataclass(frozen=True)
class Decline:
    """A rule does not fire, and why (shown by explain(), the audit on request, and the logs)."""

    rule: str
    reason: str
    where: str = ""


Verdict = Decision | Decline
Guard = Callable[[Facts], Verdict]


class Bound:
    """What a subgraph rewrite receives: its placeholders' arrays, each made on first use (None where
    absent), and the anchor call's parameters."""

    __slots__ = ("sources", "calls", "inputs", "params", "_made")

    def __init__(self, sources: dict[str, Source], calls: list, inputs: list[mx.array], params: dict[str, Any]):
        self.sources, self.calls, self.inputs, self.params = sources, calls, inputs, params
        self._made: dict[str, mx.array] = {}

    def __getitem__(self, name: str) -> mx.array | None:
        if name not in self._made:
            source = self.sources.get(name)
            self._made[name] = None if source is None else materialise(source, self.calls, self.inputs)
        return self._made[name]

    def root(self, name: str) -> mx.array | None:
        """The array placeholder `name` is a broadcast / expand_dims view of (a KV cache as the model holds it,
        before mlx-lm's `expand_dims` and the kernel's broadcast): no view made."""
        source = self.sources.get(name)
        return None if source is None else materialise(view_root(source), self.calls, self.inputs)

    @property
    def operands(self) -> dict[str, mx.array | None]:
        return {name: self[name] for name in self.sources}


@dataclass(frozen=True)
class Region:
    """A function eager mode intercepts whole (regions.py), and the dims of its arguments that the rule's
    decision must not depend on (the KV length): calls that differ only there share one analysis. Eager
    mode checks the claim when it analyses (a second trace with those dims changed) and keys by exact
    shapes where it does not hold."""

    path: str  # "module:function"
    free: dict[str, int] = field(default_factory=dict)  # argument name -> dim of each of its arrays
    # The rewrite written on the function's own arguments, prepared once per analysis: `direct(decision,
    # *arguments)` (every parameter in order, defaults filled in; the analysis's first call) -> a function of
    # the same arguments giving the region's result (or None for a call it does not serve: the bound rewrite
    # takes that one), or None where it serves none of the analysis's calls (decided from what the region's
    # key holds: shapes, dtypes, static arguments). Eager mode's fast path: it skips replaying the ops between
    # the arguments and the pattern, and what the key fixes is worked out once. Its first result per analysis
    # must equal the bound rewrite's (dtype, shape and bits), else the bound rewrite runs (reported).
    direct: Callable[..., Any] | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Rule:
    """One hazard: the pattern that shows it, the guards that decide, and the rewrites that fix it."""

    name: str
    severity: str  # "error" (wrong numbers or crashes) | "warning" (slow or numerically divergent)
    hazard: str = field(repr=False)  # one line: what goes wrong
    pattern: Pattern | tuple[GraphPattern, ...] = field(repr=False)  # several: variants, tried in order
    guard: Guard = field(repr=False)
    rewrites: dict[str, Callable[..., mx.array]] = field(repr=False)
    doc: str = field(default="", repr=False)
    version: int = 1  # joins the eager cache key: bump it when the guard changes meaning
    # Eager mode's fast path: operands that must be arrays of at least so many dims for the rule to fire at
    # all; calls that fail it for every rule of their API run as written, unbound. The guard must decline
    # wherever `needs` fails (tests/test_eager.py holds the built-in rules to it).
    needs: dict[str, int] = field(default_factory=dict)
    # Subgraph rules in eager mode: the Python function whose calls are the regions the pattern is matched in
    # (mlx-lm's quantized attention). Without one a subgraph rule is compile-only, and eager mode says so.
    region: "Region | None" = None
    # Where the rewrites may run at all (a kernel verified on this backend); eager mode skips the rule's regions
    # elsewhere, at no cost. The guard still decides; it must decline wherever this says no.
    runs_on: Callable[[Any], bool] = field(default=lambda backend: True, repr=False)
    # What `mlxrewrite doctor` measures for this rule: a module path, imported by the doctor only, whose
    # `grid(backend, name)` says what to probe and `report(profile, footnotes)` renders it (docs/doctor.md)
    probes: str | None = None

    def __post_init__(self) -> None:
        apis = {p.anchor_api for p in self.patterns}
        if len(apis) != 1 or self.api not in intercept.APIS:
            raise ValueError(f"rule {self.name}: API {', '.join(map(repr, sorted(apis)))} is not intercepted (its "
                             f"patterns must end in one of {sorted(intercept.APIS)})")
        if self.severity not in ("error", "warning"):
            raise ValueError(f"rule {self.name}: severity must be 'error' or 'warning', got {self.severity!r}")
        if not self.rewrites or not callable(self.guard):
            raise ValueError(f"rule {self.name}: needs a guard and at least one rewrite")

    @property
    def patterns(self) -> tuple[Pattern, ...]:
        return self.pattern if isinstance(self.pattern, tuple) else (self.pattern,)

    @property
    def api(self) -> str:
        """The intercepted API at which the rule's rewrite runs (the pattern's output)."""
        return self.patterns[0].anchor_api

    @property
    def is_subgraph(self) -> bool:
        return isinstance(self.patterns[0], GraphPattern)

    def decide(self, facts: Facts, where: str = "") -> Verdict:
        """The guard's verdict on one match (a guard that raises is the rule's bug: it propagates)."""
        try:
            verdict = self.guard(facts)
        except FactUnavailable as missing:
            return Decline(self.name, f"needs a fact this path cannot supply: {missing}", where)
        if isinstance(verdict, Decision) and verdict.rewrite not in self.rewrites:
            raise ValueError(f"rule {self.name} chose unknown rewrite {verdict.rewrite!r}")
        if not isinstance(verdict, (Decision, Decline)):
            raise TypeError(f"rule {self.name}: its guard must return a Decision or a Decline, got "
                            f"{type(verdict).__name__}")
        return dataclasses.replace(verdict, rule=self.name, where=where)

    def apply(self, matched: Any, decision: Decision) -> mx.array:
        return self.rewrites[decision.rewrite](matched, decision)

    def forcing(self, rewrite: str) -> "Rule":
        """This rule choosing `rewrite` wherever it fires (benchmarks and tests time each rewrite alike)."""
        if rewrite not in self.rewrites:
            raise ValueError(f"rule {self.name} has no rewrite {rewrite!r}; it has {sorted(self.rewrites)}")

        def guard(facts: Facts) -> Verdict:
            verdict = self.guard(facts)
            if not isinstance(verdict, Decision):
                return verdict
            return dataclasses.replace(verdict, rewrite=rewrite, reason=f"{verdict.reason}; forced {rewrite}")

        return dataclasses.replace(self, guard=guard, hazard=f"{self.hazard} (forced: {rewrite})")


def first_decision(verdicts: list[Verdict]) -> Decision | None:
    return next((v for v in verdicts if isinstance(v, Decision)), None)


_REGISTRY: dict[str, Rule] = {}


def register_rule(rule: Rule) -> Rule:
    """Add a rule that every `mlxrewrite.compile`/`eager`/`audit` uses by default (replaces one of the same
    name)."""
    if not isinstance(rule, Rule):
        raise TypeError(f"register_rule expects a mlxrewrite.Rule, got {type(rule).__name__}")
    _REGISTRY[rule.name] = rule
    return rule


def default_rules() -> list[Rule]:
    from mlxrewrite.rules import BUILTIN_RULES

    by_name = {rule.name: rule for rule in BUILTIN_RULES}
    by_name.update(_REGISTRY)
    return list(by_name.values())


def select_rules(rules: list[Rule] | None = None, disable: tuple[str, ...] | list[str] | str = ()) -> list[Rule]:
    """The default rules plus `rules`, less those named in `disable` (one name, or several; unknown names
    are an error). Subgraph rules come first: where one matches, it replaces the calls inside it."""
    disable = (disable,) if isinstance(disable, str) else tuple(disable)
    chosen = {rule.name: rule for rule in default_rules()}
    for rule in rules or ():
        if not isinstance(rule, Rule):
            raise TypeError(f"rules= takes mlxrewrite.Rule objects, got {type(rule).__name__}")
        chosen[rule.name] = rule
    unknown = set(disable) - set(chosen)
    if unknown:
        raise ValueError(f"disable= names unknown rules {sorted(unknown)}; known: {sorted(chosen)}")
    kept = [rule for name, rule in chosen.items() if name not in set(disable)]
    return sorted(kept, key=lambda rule: not rule.is_subgraph)


__all__ = ["Bound", "CallPattern", "Decision", "Decline", "GraphPattern", "Rule", "Verdict", "default_rules",
           "first_decision", "register_rule", "select_rules"]
