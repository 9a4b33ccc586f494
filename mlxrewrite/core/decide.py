"""Deciding on a traced graph: every rule's verdict at every call site, for `compile` and the audit.

Subgraph rules go first. Where one fires, its match's calls are covered (the anchor runs the rewrite;
the calls inside it become dead code) and no call rule decides there. Every other recorded call gets the
verdicts of the call rules of its API, up to the first that fires. Declines are kept: `explain()` and
`audit(..., declines=True)` show why a rule did not fire.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import log
from .bindings import FromCall, Source, Unreachable, resolve
from .facts import Facts, GraphEnv
from .graph import Graph
from .pattern import FailedMatch, Match
from ..backends.device import Backend
from .rule import Decision, Decline, Rule, Verdict, first_decision
from .trace import CallSite


@dataclass
class SiteVerdicts:
    """One call site: the verdicts of the rules tried there, in order, and the subgraph match that covers
    it (the anchor's own match, or the match this call lies inside)."""

    site: CallSite
    verdicts: list[Verdict] = field(default_factory=list)
    match: Match | None = None
    sources: dict[str, Source] | None = None  # where the match's placeholders come from at run time
    covered_by: int | None = None  # index of the anchor site whose subgraph rewrite makes this call dead
    problem: str | None = None  # a rule raised here (it declines; the rules after it decide)

    @property
    def decision(self) -> Decision | None:
        return None if self.covered_by is not None else first_decision(self.verdicts)


def call_facts(site: CallSite, graph: Graph, backend: Backend, eager: bool = False, **env) -> Facts:
    node_args = {graph.nodes[site.node].op: graph.nodes[site.node].args} if site.node is not None else {}
    return Facts(GraphEnv(graph, dict(site.operands), dict(site.params), node_args, backend, eager, **env))


def match_facts(match: Match, site: CallSite, graph: Graph, backend: Backend, eager: bool = False,
                **env) -> Facts:
    return Facts(GraphEnv(graph, match.bindings, dict(site.params), match.node_args(), backend, eager, **env))


def decide_graph(rules: list[Rule], graph: Graph, backend: Backend, sites: list[CallSite] | None = None,
                 from_calls: bool = True, path: str = "compile") -> list[SiteVerdicts]:
    """Verdicts at each recorded call site of `graph` (or at `sites`). A subgraph rule fires only where its
    placeholders can be recovered at run time (bindings.py): from the operands of the calls before the
    anchor (`from_calls`; eager regions recover from the region's inputs alone), inputs or constants."""
    sites = [s for s in graph.calls if s.source == "python"] if sites is None else sites
    results = [SiteVerdicts(site) for site in sites]
    by_node = {s.site.node: i for i, s in enumerate(results) if s.site.node is not None}
    for index, entry in enumerate(results):
        for rule in (r for r in rules if r.is_subgraph and r.api == entry.site.api):
            if entry.covered_by is not None or entry.site.node is None:
                break
            match = _first_match(rule, graph, graph.nodes[entry.site.node])
            if isinstance(match, FailedMatch):
                entry.verdicts.append(Decline(rule.name, f"pattern does not match: {match.reason}", entry.site.where()))
                continue
            verdict = _decide(rule, match_facts(match, entry.site, graph, backend), entry)
            if isinstance(verdict, Decision):
                try:
                    entry.sources = recover(graph, match, sites[:index + 1]) if from_calls else \
                        recover(graph, match, [], constant_limit=1)
                except Unreachable as unreachable:
                    verdict = Decline(rule.name, f"its placeholders cannot be handed to the rewrite: {unreachable}",
                                      verdict.where)
            entry.verdicts.append(verdict)
            if isinstance(verdict, Decision):
                entry.match = match
                for node in match.nodes.values():
                    inner = by_node.get(node.index)
                    if inner is not None and inner != index:
                        results[inner].covered_by = index
                break
    for entry in results:
        if entry.covered_by is not None or entry.decision is not None:
            continue
        for rule in (r for r in rules if not r.is_subgraph and r.api == entry.site.api):
            verdict = _decide(rule, call_facts(entry.site, graph, backend), entry)
            entry.verdicts.append(verdict)
            if isinstance(verdict, Decision):
                break
    for entry in results:
        for verdict in entry.verdicts:
            log.verdict(verdict, path)
    return results


def _decide(rule: Rule, facts: Facts, entry: SiteVerdicts) -> Verdict:
    """The rule's verdict; a rule that raises declines (its bug: `entry.problem` names it), so the rules after
    it still decide and a buggy rule cannot keep a hazard unfixed."""
    try:
        return rule.decide(facts, entry.site.where())
    except Exception as error:  # noqa: BLE001 - any bug in a rule
        entry.problem = f"rule {rule.name} raised {type(error).__name__} in its guard: {error}"
        return Decline(rule.name, entry.problem, entry.site.where())


def _first_match(rule: Rule, graph: Graph, anchor) -> Match | FailedMatch:
    """The first of the rule's pattern variants that matches at `anchor`, or why each did not."""
    failures = []
    for pattern in rule.patterns:
        match = pattern.match(graph, anchor)
        if not isinstance(match, FailedMatch):
            return match
        failures.append(f"{pattern.name or pattern.fn.__name__}: {match.reason}")
    return FailedMatch("; ".join(failures))


def recover(graph: Graph, match: Match, calls: list[CallSite], constant_limit: int | None = None
            ) -> dict[str, Source]:
    """Each bound placeholder's run-time source; `calls` (in plan order) may hand over their operands."""
    def from_calls(name: str) -> FromCall | None:
        return next((FromCall(i, operand) for i, site in enumerate(calls)
                     for operand, value in site.operands.items() if value == name), None)

    return {name: resolve(graph, value, from_calls, constant_limit=constant_limit)
            for name, value in match.bindings.items() if value is not None}


def decide_site(rules: list[Rule], site: CallSite, graph: Graph, backend: Backend) -> Decision | None:
    """The decision of the first call rule that fires on one site (the audit and tests ask per site)."""
    return decide_graph([r for r in rules if not r.is_subgraph], graph, backend, [site])[0].decision
