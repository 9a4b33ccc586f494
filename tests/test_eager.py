"""mlxrewrite.eager: the rules applied call by call, decisions reused while the facts their guards read hold."""

import warnings

import mlx.core as mx
import pytest

import mlxrewrite
from mlxrewrite.examples import gqa_quantized_attention as gqa
from mlxrewrite import CallPattern, Decision, Decline, Read, Rule
from mlxrewrite.core.eager import EagerFallbackWarning



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
    assert fn.rewriter.traces == (2 if check else 1)  # checked values join the facts: all True, then not
    if check:
        assert "sdpa-noop-mask -> drop_mask x3" in text and "left as is x1" in text
        assert "value check (bool[1,1,1,1]) x4" in text
    else:
        assert "drop_mask" not in text and "left as is x4" in text


def sdpa_rule(name, guard, rewrite=lambda call, d: 2 * call.run_original(), **kwargs):
    return Rule(name, "warning", "test", CallPattern("scaled_dot_product_attention"), guard, {"double": rewrite},
                **kwargs)


def test_a_user_rule_is_keyed_by_the_facts_its_guard_read():
    """The guard reads q's whole shape: a new length is a new analysis; the same shape reuses the decision."""
    shapes = []

    def guard(facts):
        shapes.append(facts.shape("q"))
        return Decision("scale-twice", "double", "test")

    fn = mlxrewrite.eager(lambda q: mx.fast.scaled_dot_product_attention(q, q, q, scale=1.0),
                          rules=[sdpa_rule("scale-twice", guard)])
    for length in (1, 1, 2):
        q = mx.random.normal((1, 2, length, 8))
        assert mx.allclose(fn(q), 2 * mx.fast.scaled_dot_product_attention(q, q, q, scale=1.0)).item()
    assert shapes == [(1, 2, 1, 8), (1, 2, 2, 8)] and fn.rewriter.traces == 2


def test_a_fact_read_only_through_a_derived_bucket_does_not_split_the_key():
    def guard(facts):
        long = facts.derive("long", lambda shape: shape[-2] > 4, Read("shape", "q"))
        return Decision("bucketed", "double", f"long={long}")

    fn = mlxrewrite.eager(lambda q: mx.fast.scaled_dot_product_attention(q, q, q, scale=1.0),
                          rules=[sdpa_rule("bucketed", guard)])
    for length in (1, 2, 3, 5, 6):
        fn(mx.random.normal((1, 2, length, 8)))
    assert fn.rewriter.traces == 2  # lengths <= 4 and > 4


def test_a_guard_needing_values_eager_mode_cannot_see_declines_and_says_so():
    """A user rule that reads a mask's values fires in compile (constant mask) but in eager mode only with
    check_values=True; without, it declines visibly instead of silently doing nothing."""
    def guard(facts):
        summary = facts.const("mask")
        if summary is None:
            return Decline("all-false-rows", "mask values unknown")
        return Decision("all-false-rows", "double", "checked")

    rule = sdpa_rule("all-false-rows", guard)
    mask = mx.ones((1, 1, 1, 1), dtype=mx.bool_)
    q = mx.random.normal((1, 2, 1, 8))
    fn = mlxrewrite.eager(masked_sdpa, rules=[rule])
    fn(q, mask)
    assert "all-false-rows declined: mask values unknown" in fn.rewriter.explain(declines=True)
    checked = mlxrewrite.eager(masked_sdpa, rules=[rule], check_values=True, disable="sdpa-noop-mask")
    assert mx.allclose(checked(q, mask), 2 * masked_sdpa(q, mask)).item()
    compiled = mlxrewrite.compile(lambda q: masked_sdpa(q, mx.ones((1, 1, 1, 1), dtype=mx.bool_)), rules=[rule],
                                  disable="sdpa-noop-mask")
    assert mx.allclose(compiled(q), 2 * masked_sdpa(q, mask)).item()


def test_a_call_that_cannot_be_analysed_runs_as_written():
    def broken(facts):
        raise KeyError("boom")

    fn = mlxrewrite.eager(lambda q: mx.fast.scaled_dot_product_attention(q, q, q, scale=1.0),
                          rules=[sdpa_rule("broken", broken)])
    q = mx.random.normal((1, 2, 3, 8))
    with pytest.warns(EagerFallbackWarning, match="boom"):
        out = fn(q)
    assert mx.array_equal(out, mx.fast.scaled_dot_product_attention(q, q, q, scale=1.0)).item()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fn(q)  # remembered: no second analysis, no second warning
    assert "! rule broken raised KeyError in its guard: 'boom'" in fn.rewriter.explain()


def test_calls_no_rule_needs_pass_straight_through():
    """Rule.needs gates calls before they are bound: a linear layer's quantized_matmul (2-D weights) and an
    unmasked SDPA never reach a rule; the GQA call (5-D weights) does."""
    guarded = []

    def guard(facts):
        guarded.append(facts.ndim("w"))
        return Decline("spy", "test")

    spy = Rule("spy", "warning", "test", CallPattern("quantized_matmul"), guard,
               {"none": lambda call, d: call.run_original()}, needs={"x": 3, "w": 3})
    gqa_args = gqa.example_inputs(128, 2)
    linear = mx.quantize(mx.random.normal((64, 256)), group_size=64, bits=4)
    q = mx.random.normal((1, 2, 1, 8))

    def model(*args):
        h = mx.quantized_matmul(gqa_args[0].reshape(-1, 256), *linear, transpose=True, group_size=64, bits=4)
        return gqa.attention(*args), h, mx.fast.scaled_dot_product_attention(q, q, q, scale=1.0)

    fn = mlxrewrite.eager(model, rules=[spy], disable="quantized-matmul-broadcast-weights")
    fn(*gqa_args)
    assert guarded == [5]  # a GQA call; not the linear layer's (the values call asks the same: reused)
    assert fn.rewriter.traces == 1 and set(fn.rewriter.calls) == {"quantized_matmul: left as is"}


@pytest.mark.parametrize("name", ["quantized-matmul-broadcast-weights", "sdpa-noop-mask"])
def test_builtin_rules_decline_wherever_their_needs_fail(name):
    """`needs` may only skip calls the rule's guard would decline anyway."""
    from mlxrewrite import intercept
    from mlxrewrite.core.decide import call_facts
    from mlxrewrite.core.eager import trace_one_call
    from mlxrewrite.backends.device import Backend

    rule = next(r for r in mlxrewrite.core.rule.default_rules() if r.name == name)
    spec, gate = intercept.APIS[rule.api], intercept.Gate({rule.api: [rule.needs]})
    x3, x2 = mx.zeros((2, 4, 64)), mx.zeros((4, 64))
    w3, w2 = (mx.quantize(mx.zeros(s), group_size=64, bits=4) for s in ((2, 8, 64), (8, 64)))
    q = mx.zeros((1, 2, 3, 8))
    calls = {"quantized_matmul": [((x3, *w2), {}), ((x2, *w3), {}), ((x2, *w2), {})],
             "scaled_dot_product_attention": [((q, q, q), {"scale": 1.0}),
                                              ((q, q, q), {"scale": 1.0, "mask": "causal"})]}[rule.api]
    for args, kwargs in calls:
        assert not gate.admits(spec, args, kwargs)
        call = intercept.Call.intercepted(spec, args, kwargs, None)
        graph, site = trace_one_call(call)
        assert isinstance(rule.decide(call_facts(site, graph, Backend.current(), eager=True)), Decline)
