"""Guards that keep a rule's failure from reaching the user: a rule that raises, or a rewrite whose result
is not the call's, means "run the call as written", and the rule is reported.

Shared by `mlxrewrite.compile` (lowering) and eager mode, which decide and rewrite in different places
but must fail in the same way. Also here: telling whether a value check is possible at all (not on a
tracer inside `mx.compile`, `mx.vmap` or a gradient: MLX refuses to evaluate those).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from .graph import dtype_name
from .intercept import Call
from .rule import Decision, Rule


class RuleError(RuntimeError):
    """A rule raised or its rewrite was refused, under `mlxrewrite.compile(..., strict=True)`."""


def rule_failure(rule: Rule, what: str, error: BaseException) -> str:
    """One line naming the rule and what it raised."""
    return f"rule {rule.name} raised {type(error).__name__} in {what}: {error}"


def checked_rewrite(rule: Rule, call: Call, decision: Decision, matched: Any = None) -> tuple[mx.array, str | None]:
    """The rewrite's result, or the call as written with the reason when the rewrite raised or returned
    something else than the call would (not an array, another shape or dtype). `matched`: what the rewrite
    receives, when not the call itself (a subgraph's `Bound`; the call is its anchor).

    The call as written is built lazily for its shape and dtype and never evaluated when the rewrite is
    used, so no kernel of the original runs (the hazard stays avoided). Where MLX refuses to build it (the
    hazard the rule fixes: "No implementation for problem shape"), only the rewrite's type is checked, and a
    rewrite that fails there raises MLX's own error, as the call would."""
    try:
        expected = call.run_original()
    except Exception as refused:  # noqa: BLE001 - MLX's own refusal, raised again if the rewrite fails too
        expected = refused
    try:
        result = rule.apply(call if matched is None else matched, decision)
    except Exception as error:
        return _as_written(expected), rule_failure(rule, f"rewrite {decision.rewrite!r}", error)
    if not isinstance(result, mx.array):
        return _as_written(expected), (f"rule {rule.name} rewrite {decision.rewrite!r} returned "
                                       f"{type(result).__name__}, not an array")
    if isinstance(expected, Exception):
        return result, None
    if result.shape != expected.shape or result.dtype != expected.dtype:
        return expected, (f"rule {rule.name} rewrite {decision.rewrite!r} returned "
                          f"{_facts(result)} where the call gives {_facts(expected)}")
    return result, None


def _as_written(expected: mx.array | Exception) -> mx.array:
    if isinstance(expected, Exception):
        raise expected
    return expected


def _facts(array: mx.array) -> str:
    return f"{dtype_name(array.dtype)}[{','.join(map(str, array.shape))}]"


_TRANSFORM_ERROR = "during function transformations"  # MLX's message when asked to evaluate a tracer


def is_transformation_error(error: BaseException) -> bool:
    """Whether `error` is MLX refusing to evaluate a tracer (inside mx.compile, mx.vmap, mx.grad...)."""
    return isinstance(error, (RuntimeError, ValueError)) and _TRANSFORM_ERROR in str(error)
