"""mlxrewrite.compile never gives a result that mx.compile (or the plain function) would not: gradients
through closed-over operands, static arguments, captured state's layout, rules' results, growing state
(issue 15)."""

import warnings

import mlx.core as mx
import pytest

import mlxrewrite

W, S, B = mx.quantize(mx.random.normal((64, 64), key=mx.random.key(1)), group_size=32, bits=4)
X = mx.random.normal((2, 64), key=mx.random.key(2))


def _qmm(x, scales):
    return mx.quantized_matmul(x, W, scales, B, group_size=32, bits=4)


# ---- item 1: the gradient of closed-over operands ---------------------------------------------------

@pytest.mark.parametrize("wrap", [mx.compile, mlxrewrite.compile])
def test_closed_over_intermediate_keeps_its_gradient_outside(wrap):
    """An outer mx.grad intermediate that a compiled function closes over keeps its gradient for its
    uses outside that function (the exporter used to detach it: 0.0 where 3.0 is right)."""
    def loss(s):
        s3 = s * 3
        out = wrap(lambda x: _qmm(x, s3))(X)
        return mx.stop_gradient(out).sum() * 0 + s3[0, 0]

    assert mx.grad(loss)(S)[0, 0].item() == 3.0


def test_closed_over_sdpa_operand_keeps_its_gradient_outside():
    q = mx.random.normal((1, 2, 3, 8), key=mx.random.key(3))

    def loss(k):
        k2 = k * 3
        out = mlxrewrite.compile(lambda q: mx.fast.scaled_dot_product_attention(q, k2, k2, scale=1.0))(q)
        return mx.stop_gradient(out).sum() * 0 + k2.sum()

    k = mx.random.normal((1, 2, 5, 8), key=mx.random.key(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # traced, not a fallback
        assert mx.grad(loss)(k).tolist() == (mx.ones_like(k) * 3).tolist()


def test_closed_over_intermediate_gradient_matches_mx_compile():
    def loss(s, wrap):
        s3 = s * 3
        return wrap(lambda x: _qmm(x, s3))(X).sum() + s3.sum()

    reference = mx.grad(lambda s: loss(s, mx.compile))(S)
    assert mx.array_equal(mx.grad(lambda s: loss(s, mlxrewrite.compile))(S), reference).item()


def test_gather_qmm_grad_with_routed_calls():
    """MLX's test_gather_qmm_grad with each quantized_matmul routed through a compiled function: given its
    operands as arguments it matches the plain vjp; closed over, it matches mx.compile (which treats
    closed-over arrays as constants: its ds is off by 936 there too) and the gathered scales keep their
    gradient outside."""
    key = mx.random.key(0)
    k1, k2, k3, k4 = mx.random.split(key, 4)
    x = mx.random.normal((16, 1, 256), key=k1)
    w, s, b = mx.quantize(mx.random.normal((4, 256, 256), key=k2))
    indices = mx.sort(mx.random.randint(0, 4, shape=(16,), key=k3))
    cotan = mx.random.normal((16, 1, 256), key=k4)

    def by_arguments(wrap):
        def fn(x, s, b):
            return wrap(lambda *o: mx.quantized_matmul(*o, transpose=True))(x, w[indices], s[indices], b[indices])
        return mx.vjp(fn, [x, s, b], [cotan])

    def closed_over(wrap):
        def fn(x, s, b):
            operands = (x, w[indices], s[indices], b[indices])
            out = wrap(lambda: mx.quantized_matmul(*operands, transpose=True))()
            return out + operands[2].sum()  # an outside use of a closed-over operand
        return mx.vjp(fn, [x, s, b], [cotan])

    for trace in (by_arguments, closed_over):
        (expected,), want = trace(lambda f: f) if trace is by_arguments else trace(mx.compile)
        (out,), got = trace(mlxrewrite.compile)
        assert mx.array_equal(out, expected).item()
        for a, b_ in zip(got, want):
            assert mx.allclose(a, b_, atol=1e-4).item(), trace.__name__


# ---- item 2: static arguments are keyed by value, never by identity --------------------------------

class Settings:
    """A hashable (by identity) mutable object, as a config object passed as an argument."""

    gain = 1.0


def test_mutable_object_argument_is_never_replayed_stale():
    settings = Settings()
    rewritten = mlxrewrite.compile(lambda x, s: x * s.gain)
    with pytest.warns(mlxrewrite.FallbackWarning, match="neither an mx.array nor a hashable static value"):
        assert rewritten(X, settings).tolist() == (X * 1.0).tolist()
    settings.gain = 5.0
    assert rewritten(X, settings).tolist() == (X * 5.0).tolist()
    with pytest.raises(mlxrewrite.SignatureError):
        mlxrewrite.compile(lambda x, s: x * s.gain, strict=True)(X, settings)


def test_constant_arguments_are_keyed_by_value():
    rewritten = mlxrewrite.compile(lambda x, gain, dtype, name: (x * gain).astype(dtype))
    assert rewritten(X, 2.0, mx.float16, "a").dtype == mx.float16
    assert rewritten(X, 3.0, mx.float32, "a").tolist() == (X * 3.0).tolist()
    assert rewritten.traces == 2


# ---- item 3: layout guards cover captured (inputs=) state -----------------------------------------

def _max_err(out, ref):
    return mx.max(mx.abs(out - ref)).item()


def test_state_traced_as_a_broadcast_view_then_made_dense_retraces():
    """A cache held as module state, a stride-0 broadcast view when traced, then replaced by dense arrays
    of the same shape (model.update): the fold plan relied on stride 0 and must not be replayed."""
    n, k = 128, 128
    cache = mx.quantize(mx.random.normal((1, 2, 1, n, k), key=mx.random.key(7)), group_size=64, bits=8)
    x = mx.random.normal((1, 2, 4, 2, k), key=mx.random.key(8))
    state = {"kv": [mx.broadcast_to(a, (1, 2, 4) + a.shape[-2:]) for a in cache]}

    def attend(x):
        return mx.quantized_matmul(x, *state["kv"], transpose=True, group_size=64, bits=8)

    def reference(x):
        return x @ mx.dequantize(*state["kv"], group_size=64, bits=8).swapaxes(-1, -2)

    rewritten = mlxrewrite.compile(attend, inputs=state, outputs=state)
    assert _max_err(rewritten(x), reference(x)) < 1e-3
    assert "-> fold" in rewritten.explain()
    dense = mx.quantize(mx.random.normal((1, 2, 4, n, k), key=mx.random.key(9)), group_size=64, bits=8)
    mx.eval(dense)
    state["kv"] = list(dense)  # same shapes and dtypes, dense: a different value for every repeat
    assert _max_err(rewritten(x), reference(x)) < 1e-3
    assert rewritten.traces == 2 and "input layout (strides) changed" in rewritten.explain()


# ---- item 9: a function that grows its state retraces, as with mx.compile --------------------------

@pytest.mark.parametrize("separate_outputs", [False, True], ids=["inputs_is_outputs", "separate_outputs"])
def test_function_that_adds_state_keys_matches_mx_compile(separate_outputs):
    def run(wrap):
        state = {"a": mx.ones(3)}
        grown = {"o": mx.zeros(3)} if separate_outputs else state

        def fn(x):
            grown[f"k{len(state)}"] = x * len(state)  # a new key (a cache entry) on some calls
            return x + state["a"]

        compiled = wrap(fn, inputs=state, outputs=grown)
        results = [compiled(mx.ones(3) * i).tolist() for i in range(3)]
        return results, {k: v.tolist() for k, v in grown.items()}  # no key may hold a dead tracer

    assert run(mlxrewrite.compile) == run(mx.compile)
