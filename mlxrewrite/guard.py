"""Guards that keep a rule's failure from reaching the user: a rule that raises, or a rewrite whose result
is not the call's, means "run the call as written", and the rule is reported.

Shared by `mlxrewrite.compile` (lowering) and eager mode, which decide and rewrite in different places
but must fail in the same way. Also here: telling whether a value check is possible at all (not on a
tracer inside `mx.compile`, `mx.vmap` or a gradient: MLX refuses to evaluate those).
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx

from .graph import Graph, dtype_name
from .intercept import Call
from .policy import Backend
from .rule import Decision, Rule, first_decision
from .trace import CallSite


class RuleError(RuntimeError):
    """A rule raised or its rewrite was refused, under `mlxrewrite.compile(..., strict=True)`."""


def rule_failure(rule: Rule, what: str, error: BaseException) -> str:
    """One line naming the rule and what it raised."""
    return f"rule {rule.name} raised {type(error).__name__} in {what}: {error}"


def guarded_decision(rules: list[Rule], site: CallSite, graph: Graph,
                     backend: Backend) -> tuple[Decision | None, str | None]:
    """The first rule's decision on `site`, or (None, why) when a rule raises: then no rule fires there."""
    for rule in rules:
        try:
            decision = first_decision([rule], site, graph, backend)
        except Exception as error:  # any bug in a rule: the call runs as written, and the rule is named
            return None, rule_failure(rule, "match", error)
        if decision is not None:
            return decision, None
    return None, None


def checked_rewrite(rule: Rule, call: Call, decision: Decision) -> tuple[mx.array, str | None]:
    """The rewrite's result, or the call as written with the reason when the rewrite raised or returned
    something else than the call would (not an array, another shape or dtype).

    The call as written is built lazily for its shape and dtype and never evaluated when the rewrite is
    used, so no kernel of the original runs (the hazard stays avoided)."""
    expected = call.run_original()
    try:
        result = rule.apply(call, decision)
    except Exception as error:
        return expected, rule_failure(rule, f"rewrite {decision.rewrite!r}", error)
    if not isinstance(result, mx.array):
        return expected, f"rule {rule.name} rewrite {decision.rewrite!r} returned {type(result).__name__}, not an array"
    if result.shape != expected.shape or result.dtype != expected.dtype:
        return expected, (f"rule {rule.name} rewrite {decision.rewrite!r} returned "
                          f"{_facts(result)} where the call gives {_facts(expected)}")
    return result, None


def guarded_key(rules: list[Rule], call: Call, backend: Backend,
                report: Callable[[str], None]) -> tuple | None:
    """Every rule's eager site key for `call`; None (nothing may fire) when a rule's `site_key` raises."""
    keys = []
    for rule in rules:
        try:
            keys.append(rule.key(call, backend))
        except Exception as error:
            report(rule_failure(rule, "site_key", error))
            return None
    return tuple(keys)


def _facts(array: mx.array) -> str:
    return f"{dtype_name(array.dtype)}[{','.join(map(str, array.shape))}]"


_TRANSFORM_ERROR = "during function transformations"  # MLX's message when asked to evaluate a tracer


def is_transformation_error(error: BaseException) -> bool:
    """Whether `error` is MLX refusing to evaluate a tracer (inside mx.compile, mx.vmap, mx.grad...)."""
    return isinstance(error, (RuntimeError, ValueError)) and _TRANSFORM_ERROR in str(error)
