"""mlxrewrite: trace an MLX function, find hazardous kernel paths, rewrite them, compile.

    @mlxrewrite.compile
    def attention(q, k, v, mask): ...

    graph = mlxrewrite.trace(fn, *args)      # print(graph); graph.to_networkx(); graph.to_dot()
    report = mlxrewrite.audit(fn, *args)     # print(report); report.to_json()
    fn = mlxrewrite.eager(fn)                # no compile: rules applied call by call (mlx-lm decode loops)
    mlxrewrite.doctor()                      # measure this backend; the rules consult the profile

Layout: core/ is the pipeline, one module per stage (its docstring names them); rules/ the built-in rules;
backends/ the device, its profile and the CUDA kernels; doctor/ the backend self-test; mlx_lm/ wraps mlx-lm
models with eager mode. audit.py, testing.py and cli.py are the entry points over the pipeline.
"""

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from .core import intercept
from .audit import Finding, Report, audit, audit_graph
from .core.compiler import FallbackWarning, RewrittenFunction, compile
from .core.eager import EagerRewriter, eager
from .core.graph import Graph, Node, Value
from .core.facts import Facts, Read
from .core.pattern import CallPattern, GraphPattern
from .core.rule import Bound, Decision, Decline, Rule, default_rules, register_rule
from .core.signature import SignatureError
from .core.trace import CallSite, TraceError, trace

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """`mlxrewrite.doctor` is imported on first use: `import mlxrewrite` does not load the doctor."""
    if name == "doctor":
        return importlib.import_module(f"{__name__}.doctor")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Bound", "CallPattern", "CallSite", "Decision", "Decline", "EagerRewriter", "Facts", "GraphPattern", "Read", "FallbackWarning", "Finding", "Graph", "Node", "Report", "RewrittenFunction", "Rule",
    "SignatureError", "TraceError", "Value", "audit", "audit_graph", "compile", "doctor", "eager", "default_rules", "intercept",
    "register_rule", "trace",
]


def _rules_from_checkout() -> None:
    """In a checkout, `mlxrewrite.rules` is the repository's `rules/` directory, as the build's package-dir
    mapping makes it for an install. That holds whatever else is installed: an editable install of another
    checkout (a git worktree run with PYTHONPATH) must not pair this package with that checkout's rules."""
    here = Path(__file__).resolve().parent
    rules = here.parent / "rules" / "__init__.py"
    found = importlib.util.find_spec(f"{__name__}.rules")
    installed = found is not None and here in Path(found.origin or "").resolve().parents  # a wheel: mlxrewrite/rules
    if not installed and rules.is_file():
        spec = importlib.util.spec_from_file_location(f"{__name__}.rules", rules,
                                                      submodule_search_locations=[str(rules.parent)])
        sys.modules[spec.name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        globals()["rules"] = module  # as an import of the subpackage would


_rules_from_checkout()
