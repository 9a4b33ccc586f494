"""Semantics of mlxrewrite.compile: arguments, retracing, captured state, fallbacks, rules, threads."""

import threading
import warnings

import mlx.core as mx
import mlx.nn as nn
import mlx.utils
import numpy as np
import pytest

import mlxrewrite
from mlxrewrite.examples import gqa_quantized_attention as gqa
from mlxrewrite import CallPattern, Decision, Decline, FallbackWarning, RewrittenFunction, Rule, SignatureError, \
    TraceError
from mlxrewrite.core import rule as rule_module


X = mx.arange(6, dtype=mx.float32).reshape(2, 3)
Y = mx.ones((2, 3)) * 0.5


# ---- arguments and results -----------------------------------------------------------------------------

def test_pytrees_in_and_out():
    def fn(pair, table, scale=1.0):
        a, b = pair
        return {"sum": a + table["u"], "nested": (b * scale, [table["v"] - a])}

    rewritten = mlxrewrite.compile(fn)
    args = ((X, Y), {"u": Y, "v": X * 2})
    out = rewritten(*args, scale=3.0)
    expected = fn(*args, scale=3.0)
    assert set(out) == {"sum", "nested"}
    assert isinstance(out["nested"], tuple) and isinstance(out["nested"][1], list)
    assert mx.array_equal(out["sum"], expected["sum"]).item()
    assert mx.array_equal(out["nested"][0], expected["nested"][0]).item()
    assert mx.array_equal(out["nested"][1][0], expected["nested"][1][0]).item()


def test_array_kwargs():
    def fn(x, *, bias, gain=2.0):
        return x * gain + bias

    rewritten = mlxrewrite.compile(fn)
    assert mx.array_equal(rewritten(X, bias=Y), X * 2.0 + Y).item()
    assert mx.array_equal(rewritten(X, bias=Y * 4), X * 2.0 + Y * 4).item()  # new values, same signature
    assert rewritten.traces == 1
    assert mx.array_equal(rewritten(X, bias=Y, gain=5.0), X * 5.0 + Y).item()
    assert rewritten.traces == 2


def test_same_signature_does_not_retrace():
    rewritten = mlxrewrite.compile(lambda x, y: x * y + 1)
    for k in range(4):
        assert mx.array_equal(rewritten(X + k, Y), (X + k) * Y + 1).item()
    assert rewritten.traces == 1
    assert "1 trace(s)" in rewritten.explain() and "first call" in rewritten.explain()


def test_static_change_retraces_and_says_which():
    def fn(x, n):
        return x * n

    rewritten = mlxrewrite.compile(fn)
    assert mx.array_equal(rewritten(X, 2), X * 2).item()
    assert mx.array_equal(rewritten(X, 2), X * 2).item()
    assert rewritten.traces == 1
    assert mx.array_equal(rewritten(X, 3), X * 3).item()
    assert rewritten.traces == 2
    text = rewritten.explain()
    assert "trace #2: new signature: static argument #1 changed: 2 -> 3" in text, text
    assert mx.array_equal(rewritten(X, 2), X * 2).item()  # the first entry is still cached
    assert rewritten.traces == 2


def test_shape_change_retraces_and_says_why():
    rewritten = mlxrewrite.compile(lambda x: x.sum(axis=0))
    rewritten(X)
    big = mx.ones((4, 3))
    assert mx.array_equal(rewritten(big), big.sum(axis=0)).item()
    assert rewritten.traces == 2
    line = [ln for ln in rewritten.explain().splitlines() if "trace #2" in ln][0]
    assert "array argument #0" in line and "float32[2,3]" in line and "float32[4,3]" in line, line
    rewritten(X.astype(mx.float16))
    line = [ln for ln in rewritten.explain().splitlines() if "trace #3" in ln][0]
    assert "float16[2,3]" in line, line


@pytest.mark.parametrize("other", [mx.ones((4, 3)), X.astype(mx.float16), X.reshape(3, 2)],
                         ids=["shape", "dtype", "same_size"])
def test_a_second_signature_after_a_steady_one_is_caught_and_both_stay_cached(other):
    """The fast path builds no key while it has served one signature (mx.compile checks shapes and dtypes, the
    runner raises StaleState on its retrace): the second signature must still get its own trace, and then both
    alternate without a retrace."""
    rewritten = mlxrewrite.compile(lambda x: x.sum(axis=0) * 2)
    for _ in range(2):
        assert mx.array_equal(rewritten(X), X.sum(axis=0) * 2).item()
    for _ in range(2):
        for x in (other, X):
            assert mx.array_equal(rewritten(x), x.sum(axis=0) * 2).item()
    assert rewritten.traces == 2, rewritten.explain()


def test_a_new_cache_length_after_a_steady_one_gets_its_own_plan():
    rewritten = mlxrewrite.compile(gqa.attention)
    for n in (256, 256, 320, 256, 320):
        args = gqa.example_inputs(n, 2)
        assert mx.allclose(rewritten(*args), gqa.attention(*args), atol=1e-5).item()
    assert rewritten.traces == 2
    assert rewritten.explain().count("quantized-matmul-broadcast-weights:fold") == 4


def test_non_arrays_after_a_steady_signature_still_fall_back_or_retrace():
    rewritten = mlxrewrite.compile(lambda x, y: x * y)
    rewritten(X, Y)
    assert mx.array_equal(rewritten(X, 3.0), X * 3.0).item()  # a static leaf: its own signature
    with pytest.warns(FallbackWarning):
        assert mx.array_equal(rewritten(X, np.full((2, 3), 2.0, np.float32)), X * 2.0).item()
    assert rewritten.traces == 2


def test_structure_change_retraces():
    rewritten = mlxrewrite.compile(lambda *xs: sum(xs[1:], xs[0]))
    rewritten(X, Y)
    assert mx.array_equal(rewritten(X, Y, Y), X + Y + Y).item()
    assert "argument structure changed" in rewritten.explain()


def test_shapeless_keeps_one_trace_without_rewrites():
    rewritten = mlxrewrite.compile(lambda x: mx.exp(x) * 2, shapeless=True)
    for shape in [(2, 3), (5, 3), (7, 1)]:
        x = mx.ones(shape)
        assert mx.allclose(rewritten(x), mx.exp(x) * 2).item()
    assert rewritten.traces == 1


def test_shapeless_with_rewrites_keys_by_exact_shape():
    rewritten = mlxrewrite.compile(gqa.attention, shapeless=True)
    for n in (256, 320):
        args = gqa.example_inputs(n, 2)
        assert mx.allclose(rewritten(*args), gqa.attention(*args), atol=1e-5).item()
    assert "quantized-matmul-broadcast-weights -> fold" in rewritten.explain()


# ---- captured state ---------------------------------------------------------------------------------------

def test_inputs_state_is_read_at_call_time():
    params = {"w": mx.ones((3, 3)), "b": mx.zeros((3,))}

    def fn(x):
        return x @ params["w"] + params["b"]

    rewritten = mlxrewrite.compile(fn, inputs=params)
    first = rewritten(X)
    assert mx.array_equal(first, X @ mx.ones((3, 3))).item()
    params["w"] = params["w"] * 2
    params["b"] = mx.full((3,), 7.0)
    second = rewritten(X)
    assert mx.array_equal(second, X @ (mx.ones((3, 3)) * 2) + 7.0).item()
    assert rewritten.traces == 1


def test_closure_without_inputs_is_baked_in_like_mx_compile():
    params = {"w": mx.ones((3, 3))}

    def fn(x):
        return x @ params["w"]

    ours, theirs = mlxrewrite.compile(fn), mx.compile(fn)
    a, b = ours(X), theirs(X)
    params["w"] = params["w"] * 2
    assert mx.array_equal(ours(X), theirs(X)).item()
    assert mx.array_equal(ours(X), a).item() and mx.array_equal(theirs(X), b).item()


def test_module_parameters_are_read_at_call_time():
    model = nn.Linear(3, 2)
    rewritten = mlxrewrite.compile(model)
    assert isinstance(rewritten, RewrittenFunction)
    assert mx.allclose(rewritten(X), model(X)).item()
    model.weight = mx.ones((2, 3))
    model.bias = mx.array([1.0, -1.0])
    out = rewritten(X)
    assert mx.allclose(out, X @ mx.ones((3, 2)) + mx.array([1.0, -1.0])).item()
    assert rewritten.traces == 1


def test_an_mlx_lm_model_with_non_array_state_compiles_like_mx_compile():
    """mlx-lm's llama keeps `layer_types` (strings) among its module items: restoring the state after the
    trace must put them back as items, not through nn.Module.update (which takes parameters only)."""
    from mlxrewrite.mlx_lm.tiny import tiny

    model = tiny("llama")
    tokens = mx.array([[1, 2, 3]])
    assert any(isinstance(v, str) for v in model.model.layer_types)
    expected = mx.compile(model, inputs=model.state, outputs=model.state)(tokens)
    assert mx.array_equal(mlxrewrite.compile(model)(tokens), expected).item()
    assert mx.array_equal(mlxrewrite.compile(lambda t: model(t))(tokens), expected).item()


def test_module_bound_method_captures_the_module():
    model = nn.Linear(3, 2)
    rewritten = mlxrewrite.compile(model.__call__)
    rewritten(X)
    model.update({"weight": model.weight * 0, "bias": model.bias * 0 + 3})
    assert mx.array_equal(rewritten(X), mx.full((2, 2), 3.0)).item()


def test_outputs_state_is_written_once_per_call():
    state = {"count": mx.array(0), "last": mx.zeros((2, 3))}

    def fn(x):
        state["count"] = state["count"] + 1
        state["last"] = x * 2
        return x + 1

    rewritten = mlxrewrite.compile(fn, inputs=state, outputs=state)
    for k in range(3):
        assert mx.array_equal(rewritten(X + k), X + k + 1).item()
        assert state["count"].item() == k + 1  # tracing must not count: restored after the trace
        assert mx.array_equal(state["last"], (X + k) * 2).item()
    assert rewritten.traces == 1


def test_state_in_a_tuple_is_rejected_clearly():
    state = (mx.zeros((1,)),)
    rewritten = mlxrewrite.compile(lambda x: x + state[0], inputs=state, strict=True)
    with pytest.raises(SignatureError, match="tuple"):
        rewritten(X)


# ---- captured state that changes between calls --------------------------------------------------------
# The steady state does not walk the module (StateTree.arrays checks the walked tree in a few C-level
# passes); each test below changes the module in one way a user may, and checks the call still matches
# the module run eagerly, retraces exactly when the state's shapes change, and leaves no tracer behind.

class Stack(nn.Module):
    def __init__(self, *dims: int):
        super().__init__()
        self.layers = [nn.Linear(a, b) for a, b in zip(dims, dims[1:])]

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def assert_matches_eager(rewritten, model, traces):
    out = rewritten(X)
    assert mx.allclose(out, model(X), atol=1e-5).item()
    mx.eval(model.parameters())  # a tracer left in the module would raise here
    assert rewritten.traces == traces, rewritten.explain()


@pytest.fixture
def walks(monkeypatch):
    """How often the state tree is walked (StateTree.walk), counted from now."""
    count = [0]
    walk = mlxrewrite.core.signature.StateTree.walk.__func__

    def counting(cls, tree):
        count[0] += 1
        return walk(cls, tree)

    monkeypatch.setattr(mlxrewrite.core.signature.StateTree, "walk", classmethod(counting))
    return count


def test_steady_state_does_not_walk_the_module(walks):
    model = Stack(3, 4, 3)
    rewritten = mlxrewrite.compile(model)
    assert_matches_eager(rewritten, model, traces=1)
    before = walks[0]
    for _ in range(5):
        rewritten(X)
    assert walks[0] == before


def test_update_in_place_same_shapes_is_read_without_a_retrace(walks):
    model = Stack(3, 4, 3)
    rewritten = mlxrewrite.compile(model)
    rewritten(X)
    before = walks[0]
    model.update({"layers": [{"weight": mx.ones((4, 3))}, {"bias": mx.full((3,), 5.0)}]})
    assert_matches_eager(rewritten, model, traces=1)
    assert walks[0] == before  # new arrays in the same places: no walk needed


def test_load_weights_is_read_without_a_retrace():
    model, other = Stack(3, 4, 3), Stack(3, 4, 3)
    rewritten = mlxrewrite.compile(model)
    rewritten(X)
    model.load_weights(list(mlx.utils.tree_flatten(other.parameters())))
    assert_matches_eager(rewritten, model, traces=1)
    assert mx.allclose(rewritten(X), other(X), atol=1e-5).item()


def test_new_state_shapes_retrace_and_leave_no_tracers():
    model = Stack(3, 4, 3)
    rewritten = mlxrewrite.compile(model)
    rewritten(X)
    old = model.layers[1].parameters()
    model.layers[1].update({"weight": mx.ones((5, 4)), "bias": mx.zeros((5,))})  # same places, new shapes
    assert_matches_eager(rewritten, model, traces=2)
    assert "state array #2: float32[3,4] -> float32[5,4]" in rewritten.explain()
    model.layers[1].update(old)  # back: the first trace serves again
    assert_matches_eager(rewritten, model, traces=2)


def test_new_dtype_retraces():
    model = Stack(3, 4, 3)
    rewritten = mlxrewrite.compile(model)
    rewritten(X)
    model.set_dtype(mx.float16)
    assert_matches_eager(rewritten, model, traces=2)
    assert "state array #0: float32[4,3] -> float16[4,3]" in rewritten.explain()


def test_added_layer_retraces_and_is_read_at_call_time():
    model = Stack(3, 4, 3)
    rewritten = mlxrewrite.compile(model)
    rewritten(X)
    model.layers.append(nn.Linear(3, 3))
    assert_matches_eager(rewritten, model, traces=2)
    assert "number of state arrays changed: 4 -> 6" in rewritten.explain()
    model.layers[2].weight = mx.zeros((3, 3))  # the new layer's weights are inputs, not baked in
    assert_matches_eager(rewritten, model, traces=2)


def test_removed_parameter_retraces():
    model = Stack(3, 4, 3)
    rewritten = mlxrewrite.compile(model)
    rewritten(X)
    del model.layers[0]["bias"]
    assert_matches_eager(rewritten, model, traces=2)


def test_replaced_layer_is_read_and_a_later_shape_change_still_restores_it():
    model = Stack(3, 4, 3)
    rewritten = mlxrewrite.compile(model)
    rewritten(X)
    model.layers[1] = nn.Linear(4, 3)  # same shapes, a new module: same trace, its arrays
    assert_matches_eager(rewritten, model, traces=1)
    model.layers[1].update({"weight": mx.ones((2, 4)), "bias": mx.zeros((2,))})  # the new module changes shape
    assert_matches_eager(rewritten, model, traces=2)


def test_quantized_model_retraces():
    model = Stack(64, 64, 32)
    rewritten = mlxrewrite.compile(model)
    x = mx.ones((2, 64))
    rewritten(x)
    nn.quantize(model, group_size=32, bits=4)
    assert mx.allclose(rewritten(x), model(x), atol=1e-4).item()
    assert rewritten.traces == 2


def test_state_shapes_pick_the_plan():
    """A rule's decision depends on state shapes (a quantized KV cache as state): a new cache length gets its own
    trace and plan, not the old one replayed."""
    args = gqa.example_inputs(256, 2)
    state = {"kv": list(args[1:])}
    rewritten = mlxrewrite.compile(lambda q: gqa.attention(q, *state["kv"]), inputs=state)
    assert mx.allclose(rewritten(args[0]), gqa.attention(*args), atol=1e-5).item()
    longer = gqa.example_inputs(320, 2)
    state["kv"] = list(longer[1:])
    assert mx.allclose(rewritten(longer[0]), gqa.attention(*longer), atol=1e-5).item()
    assert rewritten.traces == 2
    assert rewritten.explain().count("quantized-matmul-broadcast-weights:fold") == 4


# ---- bad input and fallbacks --------------------------------------------------------------------------

def fn_with_numpy(x, table):
    return x * mx.array(table)


@pytest.mark.parametrize("bad", [np.full((2, 3), 2.0, np.float32), [np.float32(2.0), {3}]],
                         ids=["numpy_array", "list_with_set"])
def test_unhashable_argument_falls_back(bad):
    def fn(x, extra):
        return x * (mx.array(extra) if isinstance(extra, np.ndarray) else float(extra[0]))

    rewritten = mlxrewrite.compile(fn)
    with pytest.warns(FallbackWarning, match="neither an mx.array nor a hashable static value"):
        out = rewritten(X, bad)
    assert mx.array_equal(out, fn(X, bad)).item()
    assert rewritten.traces == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same fallback warns once
        assert mx.array_equal(rewritten(X, bad), fn(X, bad)).item()
    assert "fallback:" in rewritten.explain()


def test_unhashable_argument_strict_raises():
    rewritten = mlxrewrite.compile(fn_with_numpy, strict=True)
    with pytest.raises(SignatureError) as info:
        rewritten(X, np.ones((2, 3), np.float32))
    message = str(info.value)
    assert "argument leaf #1" in message and "ndarray" in message and "hashable" in message


class Boom(Exception):
    pass


def raises_boom(x):
    raise Boom("inside the function")


@pytest.mark.parametrize("fn,error,match", [
    (raises_boom, Boom, "inside the function"),
    (lambda x: {}["missing"], KeyError, "missing"),
    (lambda x: x @ mx.ones((4, 4)), ValueError, "matmul"),
], ids=["custom", "key_error", "mlx_value_error"])
def test_exception_inside_propagates_unchanged(fn, error, match):
    with pytest.raises(error, match=match):
        fn(X)
    with pytest.raises(error, match=match):
        mlxrewrite.compile(fn)(X)
    with pytest.raises(error, match=match):
        mlxrewrite.compile(fn, strict=True)(X)


def test_unexportable_function_falls_back():
    def fn(x):
        return mx.contiguous(x.T) * 2

    rewritten = mlxrewrite.compile(fn)
    with pytest.warns(FallbackWarning, match="exporter") as record:
        out = rewritten(X)
    assert "Contiguous" in str(record[0].message)
    assert mx.array_equal(out, X.T * 2).item()
    traced = rewritten.traces
    assert mx.array_equal(rewritten(X), X.T * 2).item()  # same signature: falls back without tracing again
    assert rewritten.traces == traced
    assert "fallback:" in rewritten.explain()
    with pytest.raises(TraceError, match="exporter"):
        mlxrewrite.compile(fn, strict=True)(X)


def test_non_array_result_falls_back_with_a_clear_message():
    def fn(x):
        return "not an array"

    with pytest.warns(FallbackWarning, match=r"must return arrays .* got \['str'\]"):
        assert mlxrewrite.compile(fn)(X) == "not an array"
    with pytest.raises(TraceError, match=r"must return arrays .* got \['str'\]"):
        mlxrewrite.compile(fn, strict=True)(X)


def test_not_callable():
    with pytest.raises(TypeError, match="expects a callable"):
        mlxrewrite.compile(42)


# ---- decorator forms and rule selection ---------------------------------------------------------------

def test_decorator_forms():
    @mlxrewrite.compile
    def plain(x):
        return x * 2

    @mlxrewrite.compile(disable=("sdpa-noop-mask",))
    def attention(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mx.ones((4, 4), dtype=mx.bool_))

    assert isinstance(plain, RewrittenFunction) and plain.__name__ == "plain"
    assert mx.array_equal(plain(X), X * 2).item()
    q = mx.random.normal((1, 2, 4, 8))
    assert mx.array_equal(attention(q, q, q), mx.compile(attention.fn)(q, q, q)).item()
    assert [r.name for r in attention.rules] == ["fused-quantized-attention", "quantized-matmul-broadcast-weights",
                                                 "quantized-matmul-cuda-legalise"]
    assert "no rule matched" in attention.explain()


def test_unknown_rule_in_disable():
    with pytest.raises(ValueError) as info:
        mlxrewrite.compile(lambda x: x, disable=("no-such-rule",))
    message = str(info.value)
    assert "no-such-rule" in message
    assert "quantized-matmul-broadcast-weights" in message and "sdpa-noop-mask" in message


def test_rules_argument_type_checked():
    with pytest.raises(TypeError, match="Rule"):
        mlxrewrite.compile(lambda x: x, rules=["sdpa-noop-mask"])


QUANT_W = mx.quantize(mx.random.normal((64, 128)), group_size=64, bits=8)


def linear_qmm(x, w, s, b):
    return mx.quantized_matmul(x, w, s, b, transpose=True, group_size=64, bits=8)


def doubling_rule(name="double-2d-qmm", rewrite="double"):
    def guard(facts):
        if facts.ndim("w") != 2:
            return Decline(name, "weights are not 2-D")
        return Decision(name, rewrite, f"2-D weights {facts.shape('w')}")

    return Rule(name=name, severity="warning", hazard="test rule", pattern=CallPattern("quantized_matmul"),
                guard=guard, rewrites={"double": lambda call, decision: call.run_original() * 2})


@pytest.fixture
def clean_registry():
    saved = dict(rule_module._REGISTRY)
    yield
    rule_module._REGISTRY.clear()
    rule_module._REGISTRY.update(saved)


def test_registered_rule_fires(clean_registry):
    x = mx.random.normal((1, 3, 128))
    expected = linear_qmm(x, *QUANT_W)
    assert mx.array_equal(mlxrewrite.compile(linear_qmm)(x, *QUANT_W), expected).item()  # not registered yet

    mlxrewrite.register_rule(doubling_rule())
    assert "double-2d-qmm" in [r.name for r in mlxrewrite.default_rules()]
    rewritten = mlxrewrite.compile(linear_qmm)
    assert mx.allclose(rewritten(x, *QUANT_W), expected * 2).item()
    assert "double-2d-qmm -> double: 2-D weights (64, 32)" in rewritten.explain()
    report = mlxrewrite.audit(linear_qmm, x, *QUANT_W)
    assert [f.rule for f in report.findings] == ["double-2d-qmm"]

    disabled = mlxrewrite.compile(linear_qmm, disable=("double-2d-qmm",))
    assert mx.array_equal(disabled(x, *QUANT_W), expected).item()


def test_register_rule_type_checked(clean_registry):
    with pytest.raises(TypeError, match="mlxrewrite.Rule"):
        mlxrewrite.register_rule(lambda site, graph, backend: None)


def test_rule_passed_to_compile_fires_without_registering():
    x = mx.random.normal((2, 128))
    rewritten = mlxrewrite.compile(linear_qmm, rules=[doubling_rule("local-double")])
    assert mx.allclose(rewritten(x, *QUANT_W), linear_qmm(x, *QUANT_W) * 2).item()
    assert "local-double" not in [r.name for r in mlxrewrite.default_rules()]


def test_rule_choosing_unknown_rewrite_runs_as_written_or_raises_when_strict():
    x = mx.random.normal((2, 128))
    rewritten = mlxrewrite.compile(linear_qmm, rules=[doubling_rule("bad", rewrite="triple")])
    with pytest.warns(FallbackWarning, match="rule bad raised ValueError in its guard: rule bad chose unknown rewrite"):
        assert mx.array_equal(rewritten(x, *QUANT_W), linear_qmm(x, *QUANT_W)).item()
    strict = mlxrewrite.compile(linear_qmm, rules=[doubling_rule("bad", rewrite="triple")], strict=True)
    with pytest.raises(mlxrewrite.core.guard.RuleError, match="rule bad chose unknown rewrite 'triple'"):
        strict(x, *QUANT_W)


# ---- threads ----------------------------------------------------------------------------------------------

def test_threads_share_one_trace():
    args = gqa.example_inputs(512, 2)
    expected = gqa.attention(*args)
    mx.eval(expected)
    rewritten = mlxrewrite.compile(gqa.attention)
    barrier = threading.Barrier(4)
    results, errors = [None] * 4, []

    def work(i):
        try:
            barrier.wait()
            for _ in range(3):
                out = rewritten(*args)
                mx.eval(out)
            results[i] = out
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert rewritten.traces == 1
    assert all(r is not None and mx.allclose(r, expected, atol=1e-5).item() for r in results)
    text = rewritten.explain()
    assert text.count("quantized-matmul-broadcast-weights -> fold") == 2 and "!" not in text, text


def test_a_rule_on_an_api_that_is_not_intercepted_is_refused_at_construction():
    with pytest.raises(ValueError, match="'matmul' is not intercepted"):
        Rule("r", "warning", "h", CallPattern("matmul"), lambda facts: Decline("r", "x"),
             {"none": lambda call, d: call.run_original()})
