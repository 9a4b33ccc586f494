"""What a rule is: a declarative record of one hazard and its rewrites.

A rule looks at one API call site with the graph's facts (`match`), and either declines or returns a
`Decision` naming one of its rewrites. The rewrite runs later, at the call, on real (traced) arrays.
The rule's docstring (its module's) says the hazard, the evidence, the rewrite and when it must not fire.

For eager rewriting (`eager.py`, the mlx-lm wrapper), where a whole-function trace per shape would mean a
trace per token, a rule also declares which facts of a call its decision depends on (`site_key`): calls
with equal keys get the same decision, so one small trace serves a whole decode loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

import mlx.core as mx

from .graph import Graph
from .intercept import Call
from .policy import Backend
from .trace import CallSite

Matcher = Callable[[CallSite, Graph, Backend], "Decision | None"]
Rewrite = Callable[[Call, "Decision"], mx.array]
SiteKey = Callable[[Call, Backend], "Hashable | None"]


@dataclass(frozen=True)
class Decision:
    """A rule's verdict on one call site: which rewrite, why, and what the rewrite needs to know."""

    rule: str
    rewrite: str
    reason: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Rule:
    """One hazard: the API it concerns, how to recognise it, and how to rewrite it."""

    name: str
    api: str  # the intercepted API whose calls it matches ("quantized_matmul", ...)
    severity: str  # "error" (wrong numbers or crashes) | "warning" (slow or numerically divergent)
    hazard: str = field(repr=False)  # one line: what goes wrong
    match: Matcher = field(repr=False)
    rewrites: dict[str, Rewrite] = field(repr=False)
    doc: str = field(default="", repr=False)  # the full docstring: hazard, evidence, rewrite, when it must not fire
    # Eager mode: the facts of a call the decision depends on (None: the rule cannot fire on this call).
    # Without one, eager mode keys decisions by exact operand shapes (a new analysis per new shape).
    site_key: SiteKey | None = field(default=None, repr=False)
    # Operands whose values (not just shapes) the decision depends on; eager mode may check them at run
    # time when the user allows it (`check_values=True`), once per value per forward pass.
    value_operands: tuple[str, ...] = ()
    # Eager mode's fast path: operands that must be arrays of at least so many dims for the rule to fire
    # at all (its site_key is None otherwise). Calls that fail it for every rule of their API run as
    # written without being bound or keyed. Empty: every call of the API is considered.
    needs: dict[str, int] = field(default_factory=dict)

    def decide(self, site: CallSite, graph: Graph, backend: Backend) -> Decision | None:
        if site.api != self.api:
            return None
        decision = self.match(site, graph, backend)
        if decision is not None and decision.rewrite not in self.rewrites:
            raise ValueError(f"rule {self.name} chose unknown rewrite {decision.rewrite!r}")
        return decision

    def key(self, call: Call, backend: Backend) -> Hashable | None:
        """Eager-mode cache key of `call` for this rule (None: it cannot fire here)."""
        if call.api != self.api:
            return None
        if self.site_key is None:
            return tuple((k, None if a is None else (a.shape, a.dtype)) for k, a in call.operands.items()) + (
                tuple(sorted(call.params.items(), key=lambda kv: kv[0])),)
        return self.site_key(call, backend)

    def apply(self, call: Call, decision: Decision) -> mx.array:
        return self.rewrites[decision.rewrite](call, decision)


def first_decision(rules: list[Rule], site: CallSite, graph: Graph, backend: Backend) -> Decision | None:
    """The decision of the first rule that fires on `site` (rules are tried in order)."""
    return next((d for rule in rules if (d := rule.decide(site, graph, backend)) is not None), None)


_REGISTRY: dict[str, Rule] = {}


def register_rule(rule: Rule) -> Rule:
    """Add a rule that every `mlxrewrite.compile`/`audit` uses by default (replaces one of the same name)."""
    if not isinstance(rule, Rule):
        raise TypeError(f"register_rule expects a mlxrewrite.Rule, got {type(rule).__name__}")
    _REGISTRY[rule.name] = rule
    return rule


def default_rules() -> list[Rule]:
    from mlxrewrite.rules import BUILTIN_RULES

    by_name = {rule.name: rule for rule in BUILTIN_RULES}
    by_name.update(_REGISTRY)
    return list(by_name.values())


def select_rules(rules: list[Rule] | None = None, disable: tuple[str, ...] | list[str] = ()) -> list[Rule]:
    """The default rules plus `rules`, less those named in `disable` (unknown names are an error)."""
    chosen = {rule.name: rule for rule in default_rules()}
    for rule in rules or ():
        if not isinstance(rule, Rule):
            raise TypeError(f"rules= takes mlxrewrite.Rule objects, got {type(rule).__name__}")
        chosen[rule.name] = rule
    unknown = set(disable) - set(chosen)
    if unknown:
        raise ValueError(f"disable= names unknown rules {sorted(unknown)}; known: {sorted(chosen)}")
    return [rule for name, rule in chosen.items() if name not in set(disable)]
