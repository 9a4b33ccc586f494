"""fused-quantized-attention: the subgraph is found in mlx-lm's attention in both paths, fires only where it
reproduces the graph, and its result matches float32 attention over the dequantized cache.

The kernel is CUDA-only; on CPU the rule runs (simulated CUDA backend) through `quantized_sdpa`'s reference,
the same algorithm in MLX ops (tests/test_quantized_sdpa_kernel.py checks that against the definition)."""

import dataclasses

import mlx.core as mx
import pytest
from mlx_lm.models import base
from mlx_lm.models.cache import QuantizedKVCache

import mlxrewrite
import mlxrewrite.mlx_lm as mrl
from mlxrewrite.core.eager import EagerFallbackWarning
from mlxrewrite.mlx_lm.tiny import tiny
from mlxrewrite.backends.device import Backend
from mlxrewrite.rules import fused_quantized_attention as fused

SCALE = 0.125


@pytest.fixture
def cuda(monkeypatch):
    monkeypatch.setattr(Backend, "current", classmethod(lambda cls: Backend("cuda", "sm_90")))


def cache_of(b, heads, n, d, bits, group, seed, dtype=mx.float32):
    mx.random.seed(seed)
    k, v = mx.random.normal((b, heads, n, d)).astype(dtype), mx.random.normal((b, heads, n, d)).astype(dtype)
    kq, vq = mx.quantize(k, group, bits), mx.quantize(v, group, bits)
    mx.eval(kq, vq)
    return kq, vq, mx.dequantize(*kq, group, bits), mx.dequantize(*vq, group, bits)


def reference(q, kd, vd, mask):
    """Float32 attention over the dequantized cache (MLX's own SDPA on CPU, repeated heads for GQA)."""
    rep = q.shape[1] // kd.shape[1]
    kd, vd = mx.repeat(kd, rep, axis=1), mx.repeat(vd, rep, axis=1)
    return mx.fast.scaled_dot_product_attention(q, kd, vd, scale=SCALE, mask=mask)


MASKS = {
    "none": lambda m, n: None,
    "causal": lambda m, n: "causal",
    "bool": lambda m, n: mx.random.uniform(shape=(1, 1, m, n)) > 0.3,
    "additive": lambda m, n: mx.random.normal((1, 1, m, n)),
}


def fired(explain: str) -> bool:
    return "fused-quantized-attention -> fused" in explain


@pytest.mark.parametrize("heads", [(8, 2), (4, 4)], ids=["gqa", "mha"])
@pytest.mark.parametrize("mask_kind", sorted(MASKS))
def test_compile_fuses_mlx_lms_attention_and_matches_float_attention(cuda, heads, mask_kind):
    hq, hkv = heads
    kq, vq, kd, vd = cache_of(1, hkv, 300, 64, 8, 64, seed=1)
    q = mx.random.normal((1, hq, 3, 64))
    mask = MASKS[mask_kind](3, 300)
    mx.eval(q, mask if isinstance(mask, mx.array) else q)

    def attention(q):
        return base.quantized_scaled_dot_product_attention(q, kq, vq, scale=SCALE, mask=mask, group_size=64, bits=8)

    compiled = mlxrewrite.compile(attention)
    out = compiled(q)
    assert fired(compiled.explain()), compiled.explain()
    assert "inside the subgraph rewritten at call 1 (dead code)" in compiled.explain()
    assert mx.allclose(out, reference(q, kd, vd, mask), atol=2e-5).item()


def masked(q, kq, vq, mask=None, *, precise=True, v_bits=8, between=lambda s: s):
    """mlx-lm's pattern with one thing changed (the negative cases)."""
    scores = mx.quantized_matmul(q, *kq, transpose=True, group_size=64, bits=8)
    if mask is not None:
        scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
    probs = mx.softmax(between(scores), axis=-1, precise=precise)
    return mx.quantized_matmul(probs, *vq, transpose=False, group_size=64, bits=v_bits)


@pytest.mark.parametrize("change, reason", [
    (dict(precise=False), "not precise=True"),
    (dict(v_bits=4), "not one affine K/V pair"),
    (dict(between=lambda s: s * 2.0), "pattern does not match"),
])
def test_does_not_fire_on_what_it_cannot_reproduce(cuda, change, reason):
    kq, _, _, _ = cache_of(1, 2, 256, 64, 8, 64, seed=2)
    vq = mx.quantize(mx.random.normal((1, 2, 256, 64)), 64, change.get("v_bits", 8))
    q = mx.random.normal((1, 2, 2, 64)) * SCALE
    mx.eval(vq, q)
    compiled = mlxrewrite.compile(lambda q: masked(q, kq, vq, **change))
    out = compiled(q)
    verdicts = [v for call in compiled._entries[next(iter(compiled._entries))].plan.calls for v in call.verdicts
                if v.rule == fused.NAME]
    assert not fired(compiled.explain()) and any(reason in v.reason for v in verdicts), verdicts
    assert mx.array_equal(out, mx.compile(lambda q: masked(q, kq, vq, **change))(q)).item()


def test_declines_where_the_kernel_is_not_verified():
    """On CPU (and Metal, and CUDA architectures not checked) it declines and today's rewrites apply."""
    kq, vq, kd, vd = cache_of(1, 2, 256, 64, 8, 64, seed=3)
    q = mx.random.normal((1, 4, 1, 64))
    compiled = mlxrewrite.compile(lambda q: base.quantized_scaled_dot_product_attention(
        q, kq, vq, scale=SCALE, mask=None, group_size=64, bits=8))
    compiled(q)
    assert not fired(compiled.explain())
    assert "quantized-matmul-broadcast-weights -> fold" in compiled.explain()


def test_m_above_16_keeps_todays_rewrites(cuda):
    kq, vq, kd, vd = cache_of(1, 2, 256, 64, 8, 64, seed=4)
    q = mx.random.normal((1, 4, 17, 64))
    compiled = mlxrewrite.compile(lambda q: base.quantized_scaled_dot_product_attention(
        q, kq, vq, scale=SCALE, mask="causal", group_size=64, bits=8))
    assert mx.allclose(compiled(q), reference(q, kd, vd, "causal"), atol=2e-5).item()
    assert not fired(compiled.explain())


def decode(model, toks, prompt, bits=8):
    cache = [QuantizedKVCache(group_size=64, bits=bits) for _ in model.layers]
    logits = [model(toks[:, :prompt], cache=cache)[:, -1]]
    for t in range(prompt, toks.shape[1]):
        logits.append(model(toks[:, t:t + 1], cache=cache)[:, -1])
    return mx.stack(logits, axis=1)


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
@pytest.mark.parametrize("bits", [4, 8])
def test_eager_region_fuses_mlx_lm_decode_without_retracing(cuda, kv_heads, bits):
    model = tiny("llama", num_key_value_heads=kv_heads)
    mx.random.seed(5)
    toks = mx.random.randint(0, 256, (1, 8 + 24))
    expected = decode(model, toks, 8, bits)  # unwrapped: MLX's own kernels (correct on CPU)
    mrl.wrap(model)
    try:
        got = decode(model, toks, 8, bits)
        rewriter = mrl.state(model).rewriter
        assert mx.allclose(got, expected, atol=1e-4).item()
        traces = rewriter.traces
        decode(model, toks, 8, bits)  # another 24 steps: nothing new to trace
        assert rewriter.traces == traces == 2  # prefill (causal, M=8) and decode (no mask, M=1)
        fused_calls = rewriter.calls["region quantized_scaled_dot_product_attention: fused-quantized-attention -> fused"]
        assert fused_calls == 2 * len(model.layers) * 25
        assert not [key for key in rewriter.calls if key.startswith("quantized_matmul")]  # no unfused call left
    finally:
        mrl.unwrap(model)


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_a_packed_cache_reaches_the_kernel_as_its_buffer(cuda, kv_heads, monkeypatch):
    """A packed cache's fetch is lazy: the fused rule's direct form hands the kernel the cache's buffer
    (quantized_sdpa_packed), so after the first call of each analysis (traced and checked on the views) no
    fetch is made into views (the CPU reference then splits the buffer; the CUDA kernel reads it). The logits
    are bitwise those of mlx-lm's layout through the 256-step growth,
    with the same traces and every call fused."""
    from mlxrewrite.mlx_lm import packed_cache

    made = []  # fetches read as views (the first read of K's or V's makes both)
    real = packed_cache.Fetched.materialise
    monkeypatch.setattr(packed_cache.Fetched, "materialise",
                        lambda self: (made.append(1) if not self._pair else None) or real(self))
    model = tiny("llama", num_key_value_heads=kv_heads)
    mx.random.seed(6)
    toks = mx.random.randint(0, 256, (1, 250 + 12))
    runs = []
    for packed in (False, True):
        mrl.wrap(model, packed_cache=packed)
        try:
            made.clear()
            logits = decode(model, toks, 250)
            rewriter = mrl.state(model).rewriter
            runs.append((logits, rewriter.traces, rewriter.calls, len(made)))
        finally:
            mrl.unwrap(model)
    (plain, traces, calls, _), (packed_logits, packed_traces, packed_calls, views) = runs
    assert mx.array_equal(plain, packed_logits).item() and traces == packed_traces == 4  # 2 regions, 2 qmm
    assert packed_calls == calls
    assert calls["region quantized_scaled_dot_product_attention: fused-quantized-attention -> fused"] == \
        len(model.layers) * 12
    assert views == len(model.layers) + 1  # fetches made into views: the prefill's (M > 16: runs as written)
    # and the decode's first call (traced, its bound rewrite checked against the direct form); no other


def test_the_direct_form_leaves_a_promoted_query_over_a_packed_fetch_to_the_bound_rewrite(monkeypatch):
    """As over mlx-lm's views: a float16 query over float32 scales is mlx-lm's matmul promoting it after the
    scaling, which the kernel (one float dtype) does not do; the bound rewrite takes it."""
    from mlxrewrite.core import regions
    from mlxrewrite.core.rule import Decision
    from mlxrewrite.mlx_lm import packed_cache

    monkeypatch.setattr(regions, "installed", lambda path: path == packed_cache.ATTENTION)
    k, v = mx.random.normal((1, 2, 40, 64)), mx.random.normal((1, 2, 40, 64))
    pk, pv = packed_cache.pack(QuantizedKVCache(group_size=64, bits=8)).update_and_fetch(k, v)
    decision = Decision(fused.NAME, "fused", "test", {"group_size": 64, "bits": 8, "fill": None})
    q = mx.random.normal((1, 4, 1, 64))
    assert fused.direct(decision, q.astype(mx.float16), pk, pv, SCALE, None, 64, 8) is None
    assert fused.direct(decision, q, pk, pv, SCALE, None, 64, 8) is not None  # float32 over float32: the kernel


def test_a_rule_without_a_direct_form_gets_a_packed_fetch_as_arrays(cuda):
    """The bound rewrite (no direct form) takes the region's arrays: a packed cache's lazy fetch reaches it
    made into views, decode after decode."""
    model = tiny("llama")
    mx.random.seed(7)
    toks = mx.random.randint(0, 256, (1, 8 + 6))
    expected = decode(model, toks, 8)
    mrl.wrap(model, rules=[_with_direct(None)], packed_cache=True)
    try:
        got = decode(model, toks, 8)
        calls = mrl.state(model).rewriter.calls
    finally:
        mrl.unwrap(model)
    assert mx.allclose(got, expected, atol=1e-4).item()
    assert calls["region quantized_scaled_dot_product_attention: fused-quantized-attention -> fused"] == \
        len(model.layers) * 7


def _with_direct(direct):
    """The fused rule with another direct form (None: the bound rewrite alone)."""
    return dataclasses.replace(fused.RULE, region=dataclasses.replace(fused.RULE.region, direct=direct))


def _attention(rule, q, kq, vq, mask):
    run = mlxrewrite.eager(lambda q: base.quantized_scaled_dot_product_attention(
        q, kq, vq, scale=SCALE, mask=mask, group_size=64, bits=8), rules=[rule])
    return run, run(q)


@pytest.mark.parametrize("mask_kind", ["none", "causal", "bool", "bool 2d", "3d", "promoted query"])
def test_eager_direct_form_gives_the_bound_rewrites_numbers(cuda, mask_kind):
    """mlx-lm's own arguments straight to the kernel (query scaled in its dtype as mlx-lm does) equal the
    rewrite bound from the traced graph bitwise, and serve every call after the first; a mask whose view on
    the heads only the graph tells (3 axes), and a float16 query over float32 scales, are left to the bound rewrite."""
    promoted = mask_kind == "promoted query"
    kq, vq, kd, vd = cache_of(1, 2, 300, 64, 8, 64, seed=6, dtype=mx.float32 if promoted else mx.float16)
    q = mx.random.normal((1, 8, 3, 64)).astype(mx.float16) * 3.3  # a scale that rounds: 3.3 * 0.125 in float16
    mask = {"none": None, "causal": "causal", "bool": mx.random.uniform(shape=(1, 1, 3, 300)) > 0.3,
            "bool 2d": mx.random.uniform(shape=(3, 300)) > 0.3,
            "3d": mx.random.uniform(shape=(1, 3, 300)) > 0.3, "promoted query": None}[mask_kind]
    served = []

    def spy(decision, *arguments):
        out = fused.direct(decision, *arguments)
        served.append(out is not None)
        return out

    _, bound = _attention(_with_direct(None), q, kq, vq, mask)
    run, first = _attention(_with_direct(spy), q, kq, vq, mask)
    again = run(q)
    assert "fused-quantized-attention -> fused" in run.rewriter.explain()
    assert mx.array_equal(first, bound).item() and mx.array_equal(again, bound).item()
    # asked once per analysis: what it reads of a call is in the analysis's key, and its prepared form serves
    # the later calls
    assert served == ([False] if mask_kind in ("3d", "promoted query") else [True])
    expected = reference(q.astype(mx.float32), kd.astype(mx.float32), vd.astype(mx.float32), mask)
    assert mx.allclose(first.astype(mx.float32), expected, atol=2e-2).item()


def test_a_direct_form_that_differs_from_the_bound_rewrite_is_refused(cuda):
    kq, vq, _, _ = cache_of(1, 2, 300, 64, 8, 64, seed=7)
    q = mx.random.normal((1, 8, 1, 64))
    _, bound = _attention(_with_direct(None), q, kq, vq, None)
    wrong = _with_direct(lambda decision, *arguments: lambda queries, *rest: mx.zeros_like(queries))
    with pytest.warns(EagerFallbackWarning, match="direct form differs from its bound rewrite"):
        run, first = _attention(wrong, q, kq, vq, None)
    assert mx.array_equal(first, bound).item() and mx.array_equal(run(q), bound).item()
    assert "direct form differs" in run.rewriter.explain()


def test_region_keys_follow_each_argument_layout(cuda):
    """Each layout of the region's arguments (no mask, an array mask, "causal", K/V as a list) is keyed and
    analysed on its own, whatever order they come in; the KV length stays free within each."""
    q = mx.random.normal((1, 8, 2, 64)).astype(mx.float16)
    run = mlxrewrite.eager(lambda q, kq, vq, mask: base.quantized_scaled_dot_product_attention(
        q, kq, vq, scale=SCALE, mask=mask, group_size=64, bits=8))
    for n, mask_kind, as_list in [(300, "none", False), (300, "bool", False), (301, "causal", False),
                                  (302, "none", False), (303, "bool", False), (304, "none", True)]:
        kq, vq, kd, vd = cache_of(1, 2, n, 64, 8, 64, seed=n, dtype=mx.float16)
        mask = None if mask_kind == "none" else "causal" if mask_kind == "causal" else \
            mx.random.uniform(shape=(1, 1, 2, n)) > 0.3
        kq, vq = (list(kq), list(vq)) if as_list else (tuple(kq), tuple(vq))  # mlx-lm's cache hands tuples
        got = run(q, kq, vq, mask)
        expected = reference(q.astype(mx.float32), kd.astype(mx.float32), vd.astype(mx.float32), mask)
        assert mx.allclose(got.astype(mx.float32), expected, atol=2e-2).item(), (n, mask_kind, as_list)
    assert run.rewriter.traces == 4  # none, bool, causal, none with list K/V
    assert run.rewriter.calls == {"region quantized_scaled_dot_product_attention: fused-quantized-attention -> fused": 6}


def test_a_regions_generated_binder_binds_and_keys_each_way_of_calling_as_the_general_way(cuda):
    """The binder generated for a way of calling (how many positional arguments, which named) gives the values,
    arrays and key the general way gives, defaults filled in; another way of calling gets its own binder,
    and arguments the function does not take are refused (TypeError: the call runs as written)."""
    from mlxrewrite.core import eager

    signature = eager._region_signature(base.quantized_scaled_dot_product_attention, [fused.RULE])
    (kq, vq, _, _), q = cache_of(1, 2, 40, 64, 8, 64, seed=3), mx.zeros((1, 4, 1, 64))
    calls = [((q, kq, vq), dict(scale=SCALE, mask=None, group_size=64, bits=8)),
             ((q, kq, vq), dict(bits=8, group_size=64, mask=None, scale=SCALE)),  # another order: the same binder
             ((q, kq, vq, SCALE, None), {}),  # the rest by default
             ((q,), dict(q_keys=kq, q_values=vq, scale=SCALE, mask=None))]
    for args, kwargs in calls:
        values = signature.values(args, kwargs)
        arrays, key, _ = signature.describe(values)
        for _ in range(2):  # the general way (making the binder), then the binder
            got_values, got_arrays, got_key = signature.split(args, kwargs)
            assert got_values == values and got_key == key and all(a is b for a, b in zip(got_arrays, arrays))
    assert len(signature._binders) == 3
    assert signature._binders[0](calls[2][0], {}) is None  # not its way of calling
    assert signature.values(*calls[2])[-3:] == (None, 64, 8)  # mlx-lm's defaults
    for args, kwargs in [((q, kq, vq, SCALE), {}), ((q, kq, vq), dict(scale=SCALE, mask=None, sinks=None))]:
        with pytest.raises(TypeError):
            signature.split(args, kwargs)


def test_a_decided_region_call_is_served_without_a_region_call_or_a_frame(cuda, monkeypatch):
    """Past a kind's first call (traced, decided, its direct form checked) the forward pass's `region_fast`
    serves it: no `RegionCall` is made; a new kind, or a pass with an observer, takes the slow way."""
    from mlxrewrite.core import regions

    made = []
    real = regions.RegionCall.__init__
    monkeypatch.setattr(regions.RegionCall, "__init__", lambda self, *a: made.append(1) or real(self, *a))
    kq, vq, _, _ = cache_of(1, 2, 300, 64, 8, 64, seed=8)
    run = mlxrewrite.eager(lambda q: [base.quantized_scaled_dot_product_attention(
        q, kq, vq, scale=SCALE, mask=None, group_size=64, bits=8) for _ in range(5)][-1])
    q = mx.random.normal((1, 8, 1, 64))
    first = run(q)
    assert made == [1]  # the first call only (traced, its bound rewrite and direct form checked)
    made.clear()
    assert mx.array_equal(run(q), first).item() and made == []
    run.rewriter.run(lambda: base.quantized_scaled_dot_product_attention(q, kq, vq, scale=SCALE, mask=None,
                                                                          group_size=64, bits=8), (), {},
                     observer=lambda call: None)
    assert made == [1]  # an observer sees every call: the slow way
    assert run.rewriter.calls["region quantized_scaled_dot_product_attention: fused-quantized-attention -> fused"] == 11
