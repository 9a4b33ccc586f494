"""mlxrewrite: trace an MLX function, find hazardous kernel paths, rewrite them, compile.

    @mlxrewrite.compile
    def attention(q, k, v, mask): ...

    graph = mlxrewrite.trace(fn, *args)      # print(graph); graph.to_networkx(); graph.to_dot()
    report = mlxrewrite.audit(fn, *args)     # print(report); report.to_json()

Pipeline, one module per stage: trace.py -> graph.py (+ layout.py, constants.py) -> rules (rule.py,
rules/) -> lower.py -> compiler.py (mx.compile).
"""

from . import intercept
from .audit import Finding, Report, audit, audit_graph
from .compiler import FallbackWarning, RewrittenFunction, compile
from .graph import Graph, Node, Value
from .rule import Decision, Rule, default_rules, register_rule
from .signature import SignatureError
from .trace import CallSite, TraceError, trace

__version__ = "0.1.0"

__all__ = [
    "CallSite", "Decision", "FallbackWarning", "Finding", "Graph", "Node", "Report", "RewrittenFunction", "Rule",
    "SignatureError", "TraceError", "Value", "audit", "audit_graph", "compile", "default_rules", "intercept",
    "register_rule", "trace",
]
