"""Test helpers: fail a test when a function has a hazardous MLX graph pattern.

    from mlxrewrite.testing import assert_no_hazards

    def test_attention_is_safe():
        assert_no_hazards(attention, *example_inputs())
"""

from __future__ import annotations

from typing import Any, Callable

from .audit import Report, audit


def assert_no_hazards(fn: Callable, *args: Any, **kwargs: Any) -> Report:
    """Audit `fn(*args, **kwargs)`; raise AssertionError listing every finding (rule, where, why, evidence,
    fix), or return the clean Report."""
    __tracebackhide__ = True  # pytest shows the caller's line, not this one
    report = audit(fn, *args, **kwargs)
    if not report.clean:
        raise AssertionError(f"{report.target} has {len(report.findings)} hazardous MLX call(s) "
                             f"(wrap it with mlxrewrite.compile to rewrite them):\n{report}")
    return report
