"""fused-quantized-attention: the subgraph is found in mlx-lm's attention in both paths, fires only where it
reproduces the graph, and its result matches float32 attention over the dequantized cache.

The kernel is CUDA-only; on CPU the rule runs (simulated CUDA backend) through `quantized_sdpa`'s reference,
the same algorithm in MLX ops (tests/test_quantized_sdpa_kernel.py checks that against the definition)."""

import mlx.core as mx
import pytest
from mlx_lm.models import base
from mlx_lm.models.cache import QuantizedKVCache

import mlxrewrite
import mlxrewrite.mlx_lm as mrl
from mlxrewrite.mlx_lm.tiny import tiny
from mlxrewrite.backend import Backend
from mlxrewrite.rules import fused_quantized_attention as fused

SCALE = 0.125


@pytest.fixture
def cuda(monkeypatch):
    monkeypatch.setattr(Backend, "current", classmethod(lambda cls: Backend("cuda", "sm_90")))


def cache_of(b, heads, n, d, bits, group, seed):
    mx.random.seed(seed)
    k, v = mx.random.normal((b, heads, n, d)), mx.random.normal((b, heads, n, d))
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
