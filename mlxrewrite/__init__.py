"""mlxrewrite: trace an MLX function, find hazardous kernel paths, rewrite them, compile.

    @mlxrewrite.compile
    def attention(q, k, v, mask): ...

    graph = mlxrewrite.trace(fn, *args)      # print(graph); graph.to_networkx(); graph.to_dot()
    report = mlxrewrite.audit(fn, *args)     # print(report); report.to_json()
    fn = mlxrewrite.eager(fn)                # no compile: rules applied call by call (mlx-lm decode loops)
    mlxrewrite.doctor()                      # measure this backend; the rules consult the profile

Pipeline, one module per stage: trace.py -> graph.py (+ layout.py, constants.py) -> rules (rule.py,
rules/) -> lower.py -> compiler.py (mx.compile). eager.py applies the same rules call by call, for code
that changes shapes every step (mlx_lm/ wraps mlx-lm models with it).
"""

from . import doctor, intercept
from .audit import Finding, Report, audit, audit_graph
from .compiler import FallbackWarning, RewrittenFunction, compile
from .eager import EagerRewriter, eager
from .graph import Graph, Node, Value
from .facts import Facts, Read
from .pattern import CallPattern, GraphPattern
from .rule import Bound, Decision, Decline, Rule, default_rules, register_rule
from .signature import SignatureError
from .trace import CallSite, TraceError, trace

__version__ = "0.1.0"

__all__ = [
    "Bound", "CallPattern", "CallSite", "Decision", "Decline", "EagerRewriter", "Facts", "GraphPattern", "Read", "FallbackWarning", "Finding", "Graph", "Node", "Report", "RewrittenFunction", "Rule",
    "SignatureError", "TraceError", "Value", "audit", "audit_graph", "compile", "doctor", "eager", "default_rules", "intercept",
    "register_rule", "trace",
]
