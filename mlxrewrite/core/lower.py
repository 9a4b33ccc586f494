"""Lowering: a plan of decisions, applied at the intercepted calls while `mx.compile` traces.

The plan comes from one trace of the same function with the same signature, so the calls arrive in the
same order. Each call is checked against the plan entry (API, call site, operand shapes) before its
rewrite runs; a call that does not match is left exactly as written and reported, never guessed at. So is
a call whose rewrite raises or returns another shape or dtype than the call as written (`guard.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from .bindings import Source
from .guard import checked_rewrite
from .intercept import Call
from .rule import Bound, Decision, Rule, Verdict
from .trace import CallSite


@dataclass(frozen=True)
class PlannedCall:
    """What the trace saw at one call, and what to do there (decision None: leave it)."""

    api: str
    location: str | None
    shapes: tuple
    decision: Decision | None
    verdicts: tuple[Verdict, ...] = ()  # every rule's verdict here, for explain()
    sources: dict[str, Source] | None = None  # a subgraph rewrite's placeholders, recovered at run time
    covered_by: int | None = None  # the anchor call whose subgraph rewrite makes this call dead code

    @classmethod
    def of(cls, site: CallSite, shapes: tuple, decision: Decision | None, verdicts: tuple = (),
           sources: dict[str, Source] | None = None, covered_by: int | None = None) -> "PlannedCall":
        return cls(site.api, site.location, shapes, decision, verdicts, sources, covered_by)


def call_shapes(call: Call) -> tuple:
    return tuple((k, call.shape_of(k)) for k in call.operands)


@dataclass
class Plan:
    calls: list[PlannedCall]
    rules: dict[str, Rule]

    @property
    def fired(self) -> list[PlannedCall]:
        return [c for c in self.calls if c.decision is not None]


class Applier:
    """Intercept handler that runs the plan's rewrites; counts calls that did not match the plan, and rewrites
    that failed (`problems`: those calls ran as written)."""

    def __init__(self, plan: Plan, inputs: list[mx.array] = ()):
        self.plan = plan
        self.inputs = list(inputs)  # the traced function's inputs (arguments, then state), for bindings
        self.position = 0
        self.seen: list[Call] = []  # this run's calls, by plan position: subgraph rewrites read their operands
        self.mismatches: list[str] = []
        self.problems: list[str] = []

    def __call__(self, call: Call) -> mx.array:
        index = self.position
        self.position += 1
        self.seen.append(call)
        planned = self.plan.calls[index] if index < len(self.plan.calls) else None
        seen = (call.api, call.location, call_shapes(call))
        if planned is None or seen != (planned.api, planned.location, planned.shapes):
            self.mismatches.append(f"call #{index} {call.api} at {call.location} does not match the traced plan; "
                                   "left as written")
            return call.run_original()
        if planned.decision is None:
            return call.run_original()
        rule = self.plan.rules[planned.decision.rule]
        matched = None if planned.sources is None else Bound(planned.sources, self.seen, self.inputs, dict(call.params))
        result, problem = checked_rewrite(rule, call, planned.decision, matched)
        if problem is not None:
            self.problems.append(f"call #{index} {call.api} at {call.location}: {problem}; left as written")
        return result
