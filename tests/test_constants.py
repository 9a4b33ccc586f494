"""Constant summaries (mlxrewrite/core/constants.py): what the graph proves about values built from constants."""

import mlx.core as mx
import pytest

import mlxrewrite
from mlxrewrite.core.constants import evaluate, summarize

X = mx.random.normal((2, 8))


def summary_of_output(fn, x=X):
    graph = mlxrewrite.trace(fn, x)
    # the value of interest is the function's second output; the first keeps x used
    return graph, summarize(graph, graph.outputs[1])


def test_ones_bool_is_all_true():
    graph, s = summary_of_output(lambda x: (x, mx.ones((4, 8), dtype=mx.bool_)))
    assert s is not None
    assert s.all_true and not s.all_zero
    assert (s.min, s.max) == (1.0, 1.0)
    assert s.preview is None  # 32 elements: no preview


def test_full_true_is_all_true():
    graph, s = summary_of_output(lambda x: (x, mx.full((3, 5), True)))
    assert s.all_true and not s.all_zero


def test_zeros_additive_is_all_zero():
    graph, s = summary_of_output(lambda x: (x, mx.zeros((1, 1, 4, 8))))
    assert s.all_zero and not s.all_true
    assert (s.min, s.max) == (0.0, 0.0)


def test_comparison_of_constants_is_all_true():
    # regression: the exporter records Arange's bounds as floats; the replay must keep the int dtype
    graph, s = summary_of_output(lambda x: (x, mx.arange(8)[None] >= 0))
    out = graph.values[graph.outputs[1]]
    assert out.dtype == mx.bool_ and out.shape == (1, 8)
    assert s.all_true


def test_broadcast_scalar_true():
    graph, s = summary_of_output(lambda x: (x, mx.broadcast_to(mx.array(True), (4, 8))))
    assert s.all_true


@pytest.mark.parametrize("name,mask", [
    ("tril_ones", lambda: mx.tril(mx.ones((6, 6), dtype=mx.bool_))),
    ("arange_causal", lambda: mx.arange(6)[:, None] >= mx.arange(6)[None]),
    ("additive_causal", lambda: mx.where(mx.arange(6)[:, None] >= mx.arange(6)[None], 0.0, -1e9)),
])
def test_causal_mask_is_not_all_true(name, mask):
    graph, s = summary_of_output(lambda x: (x, mask()))
    assert s is not None, f"{name} is built from constants only: it must be evaluated"
    assert not s.all_true
    assert not s.all_zero
    expected = mask()
    assert s.min == pytest.approx(mx.min(expected.astype(mx.float32)).item())
    assert s.max == pytest.approx(mx.max(expected.astype(mx.float32)).item())


def test_causal_mask_values_match_mlx():
    graph = mlxrewrite.trace(lambda x: (x, mx.arange(6)[:, None] >= mx.arange(6)[None]), X)
    value = evaluate(graph, graph.outputs[1])
    assert value is not None
    assert mx.array_equal(value, mx.tril(mx.ones((6, 6), dtype=mx.bool_)))


def test_small_constant_has_preview():
    graph, s = summary_of_output(lambda x: (x, mx.arange(4) * 2 - 2))
    assert s.preview == (-2, 0, 2, 4)
    assert (s.min, s.max) == (-2.0, 4.0)
    assert not s.all_true and not s.all_zero  # one zero: neither


def test_all_true_means_every_element_nonzero():
    graph, s = summary_of_output(lambda x: (x, mx.arange(4) * 2 - 1))  # -1, 1, 3, 5
    assert s.all_true and not s.all_zero


@pytest.mark.parametrize("fn", [
    lambda x: (x, x > 0),
    lambda x: (x, mx.ones((2, 8), dtype=mx.bool_) & (x > -1e30)),  # always true, but depends on x
    lambda x: (x, mx.zeros((2, 8)) * x),
    lambda x: (x, mx.broadcast_to(x[:1] > 0, (4, 8))),
], ids=["compare_input", "and_with_input", "zeros_times_input", "broadcast_of_input"])
def test_mask_depending_on_input_is_unknown(fn):
    graph, s = summary_of_output(fn)
    assert s is None
    assert graph.depends_on_inputs(graph.outputs[1])


def test_captured_array_is_a_constant():
    captured = mx.ones((3, 3), dtype=mx.bool_)
    graph, s = summary_of_output(lambda x: (x, captured))
    assert s.all_true


def test_captured_state_declared_as_input_is_not_constant():
    state = {"mask": mx.ones((3, 3), dtype=mx.bool_)}
    rewritten = mlxrewrite.compile(lambda x: (x, state["mask"] & True), inputs=state)
    graph = rewritten.graph(X)
    assert summarize(graph, graph.outputs[1]) is None
