"""Audit: findings for every call site where a rule would fire, with the facts that made it fire."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Callable

from .graph import Graph, dtype_name
from .policy import Backend
from .rule import Rule, select_rules
from .trace import trace

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Finding:
    """One hazardous call site."""

    rule: str
    severity: str
    op: str  # the API call ("quantized_matmul", ...)
    location: str  # file:line of the call, or "graph opN" when only the graph knows it
    node: int | None  # index of the primitive in the graph
    shapes: dict[str, list[int]]
    dtypes: dict[str, str]
    strides: dict[str, list[int]]
    why: str  # the rule's hazard and the facts that made it fire
    fix: str  # the rewrite mlxrewrite.compile applies

    def __str__(self) -> str:
        facts = ", ".join(f"{k}: {self.dtypes[k]}{self.shapes[k]} strides {self.strides[k]}" for k in self.shapes)
        return (f"[{self.severity}] {self.rule} at {self.location}\n    {self.op}({facts})\n"
                f"    why: {self.why}\n    fix: {self.fix}")


@dataclass
class Report:
    findings: list[Finding]
    graph: Graph
    backend: str

    @property
    def clean(self) -> bool:
        return not self.findings

    def __str__(self) -> str:
        if self.clean:
            return f"audit ({self.backend}): no hazards in {len(self.graph.calls)} call site(s)"
        head = f"audit ({self.backend}): {len(self.findings)} hazard(s) in {len(self.graph.calls)} call site(s)"
        return "\n".join([head] + [str(f) for f in self.findings])

    def to_json(self) -> str:
        return json.dumps({"schema": SCHEMA_VERSION, "backend": self.backend, "call_sites": len(self.graph.calls),
                           "findings": [asdict(f) for f in self.findings]}, indent=2)


def audit(fn: Callable, *args: Any, **kwargs: Any) -> Report:
    """Trace `fn(*args, **kwargs)` and report every call site a rule would rewrite."""
    return audit_graph(trace(fn, *args, **kwargs))


def audit_graph(graph: Graph, rules: list[Rule] | None = None, backend: Backend | None = None) -> Report:
    rules = select_rules() if rules is None else rules
    backend = backend or Backend.current()
    findings = []
    for site in graph.calls:
        for rule in rules:
            decision = rule.decide(site, graph, backend)
            if decision is None:
                continue
            operands = {k: graph.values[v] for k, v in site.operands.items() if v}
            findings.append(Finding(
                rule=rule.name, severity=rule.severity, op=site.api, location=site.where(), node=site.node,
                shapes={k: list(v.shape) for k, v in operands.items()},
                dtypes={k: dtype_name(v.dtype) for k, v in operands.items()},
                strides={k: list(v.strides) for k, v in operands.items()},
                why=f"{rule.hazard}. Here: {decision.reason}",
                fix=f"mlxrewrite.compile rewrites it with '{decision.rewrite}' (rule {rule.name})",
            ))
            break
    return Report(findings, graph, backend.kind)
