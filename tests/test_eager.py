"""mlxrewrite.eager: the rules applied call by call, decisions cached per rule site key."""

import importlib.util
import warnings
from pathlib import Path

import mlx.core as mx
import pytest

import mlxrewrite
from mlxrewrite import Decision, Rule
from mlxrewrite.eager import EagerFallbackWarning

spec = importlib.util.spec_from_file_location("gqa", Path(__file__).parent.parent / "mlxrewrite/examples/gqa_quantized_attention.py")
gqa = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gqa)


def test_decisions_are_reused_across_kv_lengths():
    fn = mlxrewrite.eager(gqa.attention)
    for n in (128, 192, 320, 4160):  # the KV length grows as in a decode loop
        args = gqa.example_inputs(n, 2)
        out = fn(*args)
        assert mx.allclose(out, gqa.attention(*args), atol=1e-5).item()
    assert fn.rewriter.traces == 2  # one per call site (scores, values), not per length
    assert "quantized-matmul-broadcast-weights -> fold x8" in fn.rewriter.explain()
    fn(*gqa.example_inputs(128, 3))  # a new M is a new key
    assert fn.rewriter.traces == 4


def test_rewritten_calls_have_no_broadcast_weights():
    seen = []
    fn = mlxrewrite.eager(gqa.attention)
    fn(*gqa.example_inputs(128, 2))  # the first call also traces each call site alone (as written)
    from mlxrewrite import intercept  # the dispatcher runs the originals; spy on what reaches MLX

    original = intercept.original("quantized_matmul")

    def spy(*args, **kwargs):
        seen.append(tuple(a.shape for a in args[:2]))
        return original(*args, **kwargs)

    intercept._ORIGINALS["quantized_matmul"] = spy
    try:
        fn(*gqa.example_inputs(128, 2))
    finally:
        intercept._ORIGINALS["quantized_matmul"] = original
    assert seen == [((1, 4, 1, 8, 256), (1, 4, 1, 128, 64)), ((1, 4, 1, 8, 128), (1, 4, 1, 128, 32))]


def masked_sdpa(q, mask):
    return mx.fast.scaled_dot_product_attention(q, q, q, scale=1.0, mask=mask)


@pytest.mark.parametrize("check", [False, True])
def test_runtime_masks_are_dropped_only_when_checked(check):
    fn = mlxrewrite.eager(masked_sdpa, check_values=check)
    q = mx.random.normal((1, 2, 1, 8))
    for n in range(3):
        fn(q, mx.ones((1, 1, 1, 1), dtype=mx.bool_))
    fn(q, mx.zeros((1, 1, 1, 1), dtype=mx.bool_) | mx.array([[[[False]]]]))  # all False: kept
    text = fn.rewriter.explain()
    assert fn.rewriter.traces == 1
    if check:
        assert "sdpa-noop-mask -> drop_mask x3" in text and "left as is x1" in text
        assert "value check (bool[1,1,1,1]) x4" in text
    else:
        assert "drop_mask" not in text and "left as is x4" in text


def test_user_rule_without_site_key_is_keyed_by_exact_shapes():
    calls = []

    def match(site, graph, backend):
        calls.append(graph.values[site.operands["q"]].shape)
        return Decision("scale-twice", "double", "test")

    rule = Rule("scale-twice", "scaled_dot_product_attention", "warning", "test", match,
                {"double": lambda call, d: 2 * call.run_original()})
    fn = mlxrewrite.eager(lambda q: mx.fast.scaled_dot_product_attention(q, q, q, scale=1.0), rules=[rule])
    for length in (1, 1, 2):
        q = mx.random.normal((1, 2, length, 8))
        assert mx.allclose(fn(q), 2 * mx.fast.scaled_dot_product_attention(q, q, q, scale=1.0)).item()
    assert calls == [(1, 2, 1, 8), (1, 2, 2, 8)] and fn.rewriter.traces == 2


def test_a_call_that_cannot_be_analysed_runs_as_written():
    def broken(site, graph, backend):
        raise RuntimeError("boom")

    rule = Rule("broken", "scaled_dot_product_attention", "warning", "test", broken, {})
    fn = mlxrewrite.eager(lambda q: mx.fast.scaled_dot_product_attention(q, q, q, scale=1.0), rules=[rule])
    q = mx.random.normal((1, 2, 3, 8))
    with pytest.warns(EagerFallbackWarning, match="boom"):
        out = fn(q)
    assert mx.array_equal(out, mx.fast.scaled_dot_product_attention(q, q, q, scale=1.0)).item()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fn(q)  # remembered: no second analysis, no second warning
    assert "not analysed, runs as written: boom" in fn.rewriter.explain()


def test_calls_no_rule_needs_pass_straight_through():
    """Rule.needs gates calls before they are bound: a linear layer's quantized_matmul (2-D weights) and an
    unmasked SDPA never reach a rule; the GQA call (5-D weights) does."""
    keyed = []

    def site_key(call, backend):
        keyed.append(call.operands["w"].ndim)
        return None

    spy = Rule("spy", "quantized_matmul", "warning", "test", lambda *a: None, {}, site_key=site_key,
               needs={"x": 3, "w": 3})
    gqa_args = gqa.example_inputs(128, 2)
    linear = mx.quantize(mx.random.normal((64, 256)), group_size=64, bits=4)
    q = mx.random.normal((1, 2, 1, 8))

    def model(*args):
        h = mx.quantized_matmul(gqa_args[0].reshape(-1, 256), *linear, transpose=True, group_size=64, bits=4)
        return gqa.attention(*args), h, mx.fast.scaled_dot_product_attention(q, q, q, scale=1.0)

    fn = mlxrewrite.eager(model, rules=[spy], disable=("quantized-matmul-broadcast-weights",))
    fn(*gqa_args)
    assert keyed == [5, 5]  # the two GQA calls (scores, values); not the linear layer's
    assert fn.rewriter.traces == 0 and fn.rewriter.calls == {}


@pytest.mark.parametrize("name", ["quantized-matmul-broadcast-weights", "sdpa-noop-mask"])
def test_builtin_rule_keys_are_none_wherever_their_needs_fail(name):
    """`needs` may only skip calls the rule's site_key would decline anyway."""
    from mlxrewrite import intercept
    from mlxrewrite.policy import Backend

    rule = next(r for r in mlxrewrite.rule.default_rules() if r.name == name)
    spec, gate = intercept.APIS[rule.api], intercept.Gate({rule.api: [rule.needs]})
    x3, x2 = mx.zeros((2, 4, 64)), mx.zeros((4, 64))
    w3, w2 = (mx.quantize(mx.zeros(s), group_size=64, bits=4) for s in ((2, 8, 64), (8, 64)))
    q = mx.zeros((1, 2, 3, 8))
    calls = {"quantized_matmul": [((x3, *w2), {}), ((x2, *w3), {}), ((x2, *w2), {})],
             "scaled_dot_product_attention": [((q, q, q), {"scale": 1.0}),
                                              ((q, q, q), {"scale": 1.0, "mask": "causal"})]}[rule.api]
    for args, kwargs in calls:
        assert not gate.admits(spec, args, kwargs)
        assert rule.key(intercept.Call.intercepted(spec, args, kwargs, None), Backend.current()) is None
