"""A rule's failure never reaches the user, in eager mode and in mlxrewrite.compile: a call MLX rejects,
a mask updated in place, a rewrite of the wrong shape or dtype, a mask that is a tracer, a rule that
raises (issue 15, items 4-8)."""

import warnings

import mlx.core as mx
import pytest

import mlxrewrite
from mlxrewrite import CallPattern, Decision, FallbackWarning, Rule
from mlxrewrite.core.eager import EagerFallbackWarning
from mlxrewrite.core.guard import RuleError


FOLD = "quantized-matmul-broadcast-weights -> fold"


def scores(q, w, s, b):
    """The GQA scores call of mlx-lm (expand_dims against n_rep query heads)."""
    keys = [mx.expand_dims(a, -3) for a in (w, s, b)]
    return mx.quantized_matmul(q, *keys, transpose=True, group_size=64, bits=8)


def gqa_scores_inputs(d=128, d_cache=128, n=256):
    q = mx.random.normal((1, 2, 2, 2, d), key=mx.random.key(1))
    return (q, *mx.quantize(mx.random.normal((1, 2, n, d_cache), key=mx.random.key(2)), group_size=64, bits=8))


# ---- item 4: one failing call does not poison the calls of its kind ----------------------------------------

def test_a_call_mlx_rejects_does_not_poison_later_valid_calls():
    fn = mlxrewrite.eager(scores)
    bad = gqa_scores_inputs(d=256)  # queries of another head dim than the cache: MLX raises
    with pytest.warns(EagerFallbackWarning), pytest.raises(ValueError):
        fn(*bad)
    good = gqa_scores_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no spurious warning for the valid call
        out = fn(*good)
    assert mx.allclose(out, scores(*good), atol=1e-4).item()
    assert f"{FOLD} x1" in fn.rewriter.explain()
    with pytest.raises(ValueError):  # the bad call is remembered: raised as written, no second analysis
        fn(*bad)
    assert fn.rewriter.traces == 2


# ---- item 5: a mask updated in place between two calls ---------------------------------------------

def test_mask_updated_in_place_is_checked_again():
    q = mx.random.normal((1, 2, 4, 8), key=mx.random.key(3))

    def two_calls(q, mask):
        first = mx.fast.scaled_dot_product_attention(q, q, q, scale=1.0, mask=mask)
        mask[..., 0] = False  # in place: the same Python object, other values
        return first, mx.fast.scaled_dot_product_attention(q, q, q, scale=1.0, mask=mask)

    fn = mlxrewrite.eager(two_calls, check_values=True)
    got = fn(q, mx.ones((1, 1, 4, 4), dtype=mx.bool_))
    expected = two_calls(q, mx.ones((1, 1, 4, 4), dtype=mx.bool_))
    for a, b in zip(got, expected):
        assert mx.allclose(a, b, atol=1e-6).item()
    counts = fn.rewriter.calls
    assert counts["scaled_dot_product_attention: sdpa-noop-mask -> drop_mask"] == 1
    assert counts["scaled_dot_product_attention: left as is"] == 1


# ---- item 6: a rewrite whose result is not the call's ----------------------------------------------

def wrong_result_rule(rewrite):
    return Rule("wrong", "warning", "test rule", CallPattern("quantized_matmul"),
                lambda facts: Decision("wrong", "bad", "test: always"), {"bad": rewrite})


WRONG = {
    "shape": lambda call, decision: call.run_original().reshape(-1)[:1],
    "dtype": lambda call, decision: call.run_original().astype(mx.float16),
    "not_array": lambda call, decision: 0.0,
}


@pytest.mark.parametrize("kind", list(WRONG))
def test_wrong_rewrite_result_runs_as_written_in_compile(kind):
    args = gqa_scores_inputs()
    rewritten = mlxrewrite.compile(scores, rules=[wrong_result_rule(WRONG[kind])],
                                   disable=("quantized-matmul-broadcast-weights",))
    with pytest.warns(FallbackWarning, match="rule wrong rewrite 'bad' returned"):
        out = rewritten(*args)
    assert out.shape == (1, 2, 2, 2, 256) and out.dtype == mx.float32
    assert mx.allclose(out, scores(*args), atol=1e-5).item()
    assert "rule wrong rewrite 'bad' returned" in rewritten.explain()


@pytest.mark.parametrize("kind", list(WRONG))
def test_wrong_rewrite_result_runs_as_written_in_eager(kind):
    args = gqa_scores_inputs()
    fn = mlxrewrite.eager(scores, rules=[wrong_result_rule(WRONG[kind])],
                          disable=("quantized-matmul-broadcast-weights",))
    with pytest.warns(EagerFallbackWarning, match="rule wrong rewrite 'bad' returned"):
        out = fn(*args)
    assert out.dtype == mx.float32 and mx.allclose(out, scores(*args), atol=1e-5).item()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once
        assert fn(*args).dtype == mx.float32
    assert "rule wrong rewrite 'bad' returned" in fn.rewriter.explain()


# ---- item 7: check_values where the mask is a tracer ----------------------------------------------

def masked(q, mask):
    return mx.fast.scaled_dot_product_attention(q, q, q, scale=1.0, mask=mask)


@pytest.mark.parametrize("transform", ["compile", "vmap"])
def test_value_check_is_skipped_on_tracers(transform):
    fn = mlxrewrite.eager(masked, check_values=True)
    q = mx.random.normal((1, 2, 4, 8), key=mx.random.key(4))
    mask = mx.ones((1, 1, 4, 4), dtype=mx.bool_)
    if transform == "compile":
        got, expected = mx.compile(fn)(q, mask), masked(q, mask)
    else:
        qs, masks = mx.stack([q, q * 2]), mx.stack([mask, mask])
        got, expected = mx.vmap(fn)(qs, masks), mx.vmap(masked)(qs, masks)
    assert mx.allclose(got, expected, atol=1e-6).item()
    assert "value check skipped" in fn.rewriter.explain()
    assert fn.rewriter.calls["scaled_dot_product_attention: left as is"] >= 1


# ---- item 8: any exception from a rule means "run as written, reported once" ------------------------

def raising(where, error):
    def fail(*args):
        raise error("bug in the rule")

    def guard(facts):
        facts.ndim("x")
        return fail() if where == "guard" else Decision("raising", "r", "test")

    return Rule("raising", "warning", "test rule", CallPattern("quantized_matmul"), guard,
                {"r": fail if where == "rewrite" else (lambda call, d: call.run_original())})


CASES = [("guard", KeyError), ("guard", IndexError), ("rewrite", AttributeError), ("rewrite", ZeroDivisionError)]


@pytest.mark.parametrize("where,error", CASES)
def test_a_raising_rule_runs_as_written_in_eager(where, error):
    args = gqa_scores_inputs()
    fn = mlxrewrite.eager(scores, rules=[raising(where, error)], disable=("quantized-matmul-broadcast-weights",))
    with pytest.warns(EagerFallbackWarning, match=f"rule raising raised {error.__name__} in"):
        out = fn(*args)
    assert mx.allclose(out, scores(*args), atol=1e-5).item()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once
        fn(*args)
    assert "rule raising raised" in fn.rewriter.explain()


@pytest.mark.parametrize("where,error", CASES)
def test_a_raising_rule_runs_as_written_in_compile_or_raises_when_strict(where, error):
    args = gqa_scores_inputs()
    options = dict(rules=[raising(where, error)], disable=("quantized-matmul-broadcast-weights",))
    with pytest.warns(FallbackWarning, match=f"rule raising raised {error.__name__} in"):
        out = mlxrewrite.compile(scores, **options)(*args)
    assert mx.allclose(out, scores(*args), atol=1e-5).item()
    with pytest.raises(RuleError, match="rule raising raised"):
        mlxrewrite.compile(scores, strict=True, **options)(*args)

