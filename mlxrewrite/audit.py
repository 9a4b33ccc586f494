"""Audit: findings for every call site where a rule would fire, with the facts that made it fire.

A `Report` holds one or more steps: `audit(fn, *args)` gives one (the function), the mlx-lm audit gives
one per generation step (prefill, decode, ...). Its JSON form is documented field by field in
docs/audit.md; `SCHEMA_VERSION` changes only when a field changes meaning or goes away.
"""

from __future__ import annotations

import json
import re
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import mlx.core as mx
import networkx as nx
import numpy as np

from .core.graph import Graph, dtype_name
from .core.layout import broadcast_strides
from .backends.device import Backend
from .core.decide import decide_graph, decide_site
from .core.rule import Decline, Rule, select_rules
from .core.trace import trace

SCHEMA_VERSION = 1
_PACKAGE = Path(__file__).resolve().parent
WIDTH = 110  # text output is wrapped to this many columns
BROADCAST_APIS = ("quantized_matmul",)  # APIs whose kernels broadcast the operands' batch dims together
CPU_NOTE = ("on cpu, MLX computes these calls right: they are flagged for the Metal and CUDA kernels named "
            "above, which the audit checks from any machine")


@dataclass(frozen=True)
class Finding:
    """One hazardous call site."""

    rule: str
    severity: str  # "error" (wrong numbers or crashes) | "warning" (slow or numerically divergent)
    op: str  # the API call ("quantized_matmul", ...)
    location: str  # file:line of the call, or "graph opN" when only the graph knows it
    node: int | None  # index of the primitive in the graph
    shapes: dict[str, list[int]]
    dtypes: dict[str, str]
    strides: dict[str, list[int]]
    why: str  # the rule's hazard and the facts that made it fire
    fix: str  # the rewrite mlxrewrite.compile applies
    rewrite: str = ""  # the rewrite's name, for machines ("fold", "copy", "drop_mask")
    evidence: str = ""  # where the hazard was measured (the rule's documented evidence)
    step: str = ""  # the audited step it belongs to (the function's name, or "decode (M=1)", ...)
    # The operands as the kernel sees them: batch dims broadcast together (quantized_matmul), so a size-1
    # dim stretched over the batch shows its stride 0; the same as shapes/strides where nothing broadcasts.
    kernel_shapes: dict[str, list[int]] = field(default_factory=dict)
    kernel_strides: dict[str, list[int]] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"[{self.severity}] {self.rule} at {short_location(self.location)}",
                 f"    {self.op}, operands as the kernel sees them (0*: a broadcast dim, stride 0):"]
        lines += [f"      {name}: {self._operand(name)}" for name in self.shapes]
        for label, text in (("why", self.why), ("fix", self.fix)):
            lines += wrapped(f"{label}: {text}", "    ")
        return "\n".join(lines)

    def _operand(self, name: str) -> str:
        shape, strides = self.kernel_shapes.get(name, self.shapes[name]), self.kernel_strides.get(name, self.strides[name])
        seen = f", seen as {shape}" if shape != self.shapes[name] else ""
        marked = ", ".join("0*" if stride == 0 and size > 1 else str(stride) for stride, size in zip(strides, shape))
        return f"{self.dtypes[name]}{self.shapes[name]}{seen} strides [{marked}]"


def wrapped(text: str, indent: str) -> list[str]:
    """`text` in lines of at most WIDTH columns, continuation lines indented two more."""
    return textwrap.wrap(text, WIDTH, initial_indent=indent, subsequent_indent=indent + "  ",
                         break_long_words=False, break_on_hyphens=False)


def short_location(location: str) -> str:
    """file:line for reading, the same however things are installed: from the installed package on
    (`mlx_lm/models/base.py:84`, `mlxrewrite/examples/x.py:21`), else relative to the working directory
    when under it."""
    if "site-packages/" in location:
        return location.rpartition("site-packages/")[2]
    path = Path(location.rpartition(":")[0])
    if path.is_relative_to(_PACKAGE):  # mlxrewrite's own files (its examples) in a checkout: an editable install
        return str(Path(location).relative_to(_PACKAGE.parent))
    if path.is_absolute() and path.is_relative_to(Path.cwd()):
        return str(Path(location).relative_to(Path.cwd()))
    return location


@dataclass
class Step:
    """One audited function: its graph, how many call sites were audited, and the findings."""

    name: str
    graph: Graph
    call_sites: int
    findings: list[Finding]
    declines: list[str] = field(default_factory=list)  # "rule X did not fire at file:line: why", every rule

    def summary(self) -> str:
        return _summary(len(self.findings), self.call_sites)


def _summary(findings: int, call_sites: int) -> str:
    hazards = f"{findings} hazard(s)" if findings else "no hazards"
    return f"{hazards} in {call_sites} call site(s)"


@dataclass
class Report:
    """Findings of one audit run, step by step, with where it ran (backend, MLX version)."""

    steps: list[Step]
    backend: str
    target: str = ""  # what was audited ("examples/x.py:attention", "llama (tiny ...)")
    mlx_version: str = field(default_factory=lambda: mx.__version__)
    notes: list[str] = field(default_factory=list)  # advice for this kind of target (printed last)

    @property
    def findings(self) -> list[Finding]:
        return [f for step in self.steps for f in step.findings]

    @property
    def graph(self) -> Graph:
        """The first step's graph (the only one for `audit(fn, ...)`)."""
        return self.steps[0].graph

    @property
    def call_sites(self) -> int:
        return sum(step.call_sites for step in self.steps)

    @property
    def clean(self) -> bool:
        return not self.findings

    @classmethod
    def combine(cls, reports: Iterable["Report"], target: str = "") -> "Report":
        """One report of several runs' steps (they must share a backend)."""
        reports = list(reports)
        return cls([s for r in reports for s in r.steps], reports[0].backend, target, reports[0].mlx_version)

    def __str__(self) -> str:
        head = f"audit ({self.backend}): {_summary(len(self.findings), self.call_sites)}"
        if len(self.steps) == 1:
            lines = [head] + _finding_lines(self.findings, "")
        else:
            lines = wrapped(f"{head} in {len(self.steps)} steps of {self.target}", "")
            for step in self.steps:
                lines.append(f"{step.name}: {step.summary()}")
                lines += _finding_lines(step.findings, "  ")
        notes = ([CPU_NOTE] if self.backend == "cpu" and any(f.severity == "error" for f in self.findings) else [])
        notes += self.notes
        return "\n".join(lines + self._evidence_lines() + [line for note in notes for line in wrapped(f"note: {note}", "")])

    def explain_declines(self) -> str:
        """Why each rule that did not fire at a call site declined there (`mlxrewrite audit --declines`)."""
        lines = []
        for step in self.steps:
            lines += [f"{step.name}: {line}" if len(self.steps) > 1 else line for line in step.declines]
        return "\n".join(lines) or "no rule declined anywhere"

    def _evidence_lines(self) -> list[str]:
        """Each fired rule's evidence once, and where this audit ran."""
        evidence = {f.rule: f.evidence for f in self.findings if f.evidence}
        if not evidence:
            return []
        return ([f"evidence (from the rules' docs; this audit ran on {self.backend}, MLX {self.mlx_version}):"] +
                [line for rule, text in evidence.items() for line in wrapped(f"{rule}: {text}", "  ")])

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (docs/audit.md lists every field)."""
        from . import __version__

        return {"schema": SCHEMA_VERSION, "mlxrewrite_version": __version__, "mlx_version": self.mlx_version,
                "backend": self.backend, "target": self.target, "call_sites": self.call_sites,
                "steps": [{"name": s.name, "call_sites": s.call_sites, "hazards": len(s.findings)}
                          for s in self.steps],
                "findings": [asdict(f) for f in self.findings], "notes": self.notes}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _finding_lines(findings: list[Finding], indent: str) -> list[str]:
    """Findings as text; the same hazard repeated at one call site (one per layer) is printed once."""
    groups: dict[tuple, list[Finding]] = {}
    for f in findings:
        groups.setdefault((f.rule, f.location, str(f.shapes), str(f.strides)), []).append(f)
    lines = []
    for same in groups.values():
        head, _, rest = str(same[0]).partition("\n")
        count = f" ({len(same)} calls)" if len(same) > 1 else ""
        lines += [indent + line for line in f"{head}{count}\n{rest}".splitlines()]
    return lines


def rule_evidence(rule: Rule) -> str:
    """The "Evidence:" paragraph of the rule's docstring on one line ("" when it has none)."""
    match = re.search(r"^Evidence:\s*(.*?)(?:\n\s*\n|\Z)", rule.doc, re.S | re.M)
    return " ".join(match.group(1).split()) if match else ""


@dataclass(frozen=True)
class Case:
    """A function and the inputs to audit it on, as one named step."""

    name: str
    fn: Callable
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    # Leading input arrays that only replay earlier steps (the prompt that fills the cache before a decode
    # step): call sites that depend on none of the other inputs belong to those steps and are not reported.
    replayed: int = 0

    def audit(self) -> Report:
        graph = trace(self.fn, *self.args, **self.kwargs)
        return audit_graph(graph, step=self.name, depends_on=graph.inputs[self.replayed:] if self.replayed else None)

    def rewritten_graph(self) -> Graph:
        """The graph `mlxrewrite.compile(fn)` runs for these inputs."""
        from .core.compiler import compile

        return compile(self.fn).trace_rewritten(*self.args, **self.kwargs)


def audit(fn: Callable, *args: Any, **kwargs: Any) -> Report:
    """Trace `fn(*args, **kwargs)` and report every call site a rule would rewrite."""
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    report = Case(name, fn, args, kwargs).audit()
    report.target = name
    return report


def picture_dot(step: Step, after: Graph) -> str:
    """DOT of the step's graph with its hazards in red, beside the rewritten graph (its API calls in green,
    any hazard left in red)."""
    from .core.render import side_by_side_dot

    before_marks = {f"op{f.node}": ("hazard", f.rule) for f in step.findings if f.node is not None}
    left = {f"op{f.node}": ("hazard", f.rule) for f in audit_graph(after).findings if f.node is not None}
    after_marks = {f"op{s.node}": ("call", "") for s in after.calls if s.node is not None} | left
    return side_by_side_dot(
        (step.graph, before_marks, f"{step.name}: as written, {step.summary()}"),
        (after, after_marks, f"after mlxrewrite.compile: {len(left)} hazard(s) left"))


def audit_graph(graph: Graph, rules: list[Rule] | None = None, backend: Backend | None = None,
                step: str = "graph", depends_on: Iterable[str] | None = None) -> Report:
    """Audit a traced graph as one step.

    `depends_on` (graph input names) restricts the audit to call sites whose result depends on one of
    them: a decode step traced together with the prefill that fills its cache reports only its own calls.
    """
    rules = select_rules() if rules is None else rules
    backend = backend or Backend.current()
    sites = graph.calls if depends_on is None else _sites_depending_on(graph, set(depends_on))
    findings = [finding for site in sites if (finding := _first_finding(site, graph, rules, backend, step))]
    declines = [f"{v.rule} did not fire at {short_location(v.where)}: {v.reason}"
                for entry in decide_graph(rules, graph, backend, list(sites), path="audit")
                for v in entry.verdicts if isinstance(v, Decline)]
    return Report([Step(step, graph, len(sites), findings, declines)], backend.kind)


def _sites_depending_on(graph: Graph, inputs: set[str]) -> list:
    return [site for site in graph.calls
            if site.output and (site.output in inputs or inputs & nx.ancestors(graph.nx, site.output))]


def _first_finding(site, graph: Graph, rules: list[Rule], backend: Backend, step: str) -> Finding | None:
    """The finding of the first rule that fires on `site` (the one mlxrewrite.compile would apply)."""
    decision = decide_site(rules, site, graph, backend)
    if decision is None:
        return None
    rule = next(r for r in rules if r.name == decision.rule)
    operands = {k: graph.values[v] for k, v in site.operands.items() if v}
    kernel_shapes, kernel_strides = _kernel_view(site.api, operands)
    return Finding(
        rule=rule.name, severity=rule.severity, op=site.api, location=site.where(), node=site.node,
        shapes={k: list(v.shape) for k, v in operands.items()},
        dtypes={k: dtype_name(v.dtype) for k, v in operands.items()},
        strides={k: list(v.strides) for k, v in operands.items()},
        why=f"{rule.hazard}. Here: {decision.reason}",
        fix=f"mlxrewrite.compile rewrites it with '{decision.rewrite}' (rule {rule.name})",
        rewrite=decision.rewrite, evidence=rule_evidence(rule), step=step,
        kernel_shapes=kernel_shapes, kernel_strides=kernel_strides,
    )


def _kernel_view(api: str, operands: dict) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """Shapes and strides of the operands with their batch dims (all but the last two) broadcast together,
    as a batched kernel reads them; as stored where the API does not broadcast or the shapes do not."""
    shapes = {k: list(v.shape) for k, v in operands.items()}
    strides = {k: list(v.strides) for k, v in operands.items()}
    if api not in BROADCAST_APIS or any(len(s) < 2 for s in shapes.values()):
        return shapes, strides
    try:
        batch = list(np.broadcast_shapes(*(tuple(s[:-2]) for s in shapes.values())))
    except ValueError:
        return shapes, strides
    kernel = {k: batch + s[-2:] for k, s in shapes.items()}
    return kernel, {k: list(broadcast_strides(shapes[k], strides[k], kernel[k])) for k in shapes}
