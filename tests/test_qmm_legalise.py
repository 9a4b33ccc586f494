"""quantized-matmul-cuda-legalise on CPU with a simulated CUDA backend: which calls are legalised and how, that
the rewritten results equal the dequantize-then-float reference, that supported calls are untouched, and that a
tiny MHA mlx-lm model with a quantized KV cache decodes through the wrapper.

The simulation: `Backend.current` says CUDA, and the quantized_matmul the rules call (`intercept._ORIGINALS`)
first does what MLX's CUDA dispatch does with the real strides of the evaluated operands (`qmm_dispatch`): it
raises "No implementation" for weights that are not dense or that no kernel accepts, and fails the test where
a defective kernel (qmm_sm90 at group_size >= K, qmm_sm80 at K under 3 tiles) would run. Then it computes on CPU.
"""

import dataclasses
import math
import types

import mlx.core as mx
import pytest
from mlx_lm.models import base as mlx_lm_base
from mlx_lm.models.cache import QuantizedKVCache, make_prompt_cache

import mlxrewrite
import mlxrewrite.mlx_lm as mrl
from mlxrewrite import intercept
from mlxrewrite.core.decide import call_facts
from mlxrewrite.core.eager import trace_one_call
from mlxrewrite.core.facts import ArrayEnv
from mlxrewrite.core.graph import dtype_name
from mlxrewrite.core.layout import array_strides, is_dense, is_row_contiguous
from mlxrewrite.mlx_lm.tiny import tiny
from mlxrewrite.backends.device import OK, Backend, Bucket, Measured, Profile
from mlxrewrite.rules import qmm_dispatch
from mlxrewrite.rules.qmm_dispatch import qmm_mkn
from mlxrewrite.rules.qmm_profile import ORIGINAL, QMM_REWRITES, QmmBucket
from mlxrewrite.rules import quantized_matmul_legalise as qml
from mlxrewrite.rules.fused_quantized_attention import NAME as FUSED
from mlxrewrite.rules.quantized_matmul_broadcast import NAME as BROADCAST
from test_mlx_lm import teacher_forced

NAME = qml.NAME
SM90, SM80 = Backend("cuda", "sm_90"), Backend("cuda", "sm_80")


# ---- the simulated CUDA backend --------------------------------------------------------------------------

class NoImplementation(ValueError):
    pass


class SimulatedCuda:
    """MLX's CUDA dispatch facts applied to evaluated operands, then the CPU kernel; records the kernels run."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.real = intercept.original("quantized_matmul")
        self.kernels: list[str] = []

    def __call__(self, x, w, scales, biases=None, transpose=True, group_size=None, bits=None, mode="affine",
                 **kwargs):
        weights = [a for a in (w, scales, biases) if a is not None]
        strides = [array_strides(a) for a in weights]
        if all(s is not None for s in strides):  # real arrays (not tracers): do what the CUDA dispatch does
            self.check(x, weights, strides, {"transpose": transpose, "group_size": group_size, "bits": bits,
                                             "mode": mode})
        return self.real(x, w, scales, biases, transpose=transpose, group_size=group_size, bits=bits, mode=mode,
                         **kwargs)

    def check(self, x, weights, strides, params):
        x_shape = (1,) * (2 - x.ndim) + tuple(x.shape)
        m, k, n = qmm_mkn(x_shape, weights[0].shape, params)
        batch = math.prod(mx.broadcast_shapes(x_shape[:-2], weights[0].shape[:-2]))
        dense = all(is_dense(a.shape, s) and is_row_contiguous(a.shape[-2:], s[-2:]) for a, s in zip(weights, strides))
        dtype, rows = dtype_name(x.dtype), m * batch
        kernel = qmm_dispatch.cuda_qmm_kernel(self.backend, dtype, rows, k, params, n) if dense else None
        if kernel is None:
            raise NoImplementation(f"[quantized_matmul] No implementation for problem shape: {m}x{n}x{k}x{batch}")
        defect = (qmm_dispatch.cuda_qmm_wrong(self.backend, dtype, rows, k, params, n)
                  or qmm_dispatch.cuda_qmm_overreads(self.backend, dtype, rows, k, params, n))
        assert defect is None, defect
        self.kernels.append(kernel)


@pytest.fixture
def cuda(monkeypatch):
    """Simulate CUDA on an H200 (sm_90) for everything that runs in the test."""
    simulated = SimulatedCuda(SM90)
    monkeypatch.setattr(Backend, "current", classmethod(lambda cls: SM90))
    monkeypatch.setitem(intercept._ORIGINALS, "quantized_matmul", simulated)
    return simulated


# ---- helpers --------------------------------------------------------------------------------------------

def quantized(shape, bits, group=64, dtype=mx.float32, seed=0):
    mx.random.seed(seed)
    q = mx.quantize(mx.random.normal(shape).astype(dtype), group_size=group, bits=bits)
    return q, mx.dequantize(*q, group_size=group, bits=bits)


def sliced_cache(heads, n, d, bits, capacity=None, dtype=mx.float32, seed=0):
    """mlx-lm's QuantizedKVCache view: (w, scales, biases) of a buffer of `capacity` rows, sliced to n rows."""
    capacity = capacity or (n + 255) // 256 * 256
    q, deq = quantized((1, heads, capacity, d), bits, dtype=dtype, seed=seed)
    return tuple(a[..., :n, :] for a in q), deq[..., :n, :]


def qmm(transpose, bits, group=64):
    return lambda x, *q: mx.quantized_matmul(x, *q, transpose=transpose, group_size=group, bits=bits)


def reference(x, deq, transpose):
    return x @ (mx.swapaxes(deq, -1, -2) if transpose else deq).astype(x.dtype)


def assert_close(out, ref, rel=1e-4):
    assert out.shape == ref.shape, (out.shape, ref.shape)
    err = mx.max(mx.abs(out.astype(mx.float32) - ref.astype(mx.float32))).item()
    assert err <= rel * max(mx.max(mx.abs(ref)).item(), 1e-6), err


def route(backend, x_shape, w_shape, transpose=True, bits=8, group=64, dtype="float32", dense=None):
    params = {"transpose": transpose, "group_size": group, "bits": bits, "mode": "affine"}
    found = qml.legal_route(backend, dtype, x_shape, w_shape, params, dense)
    return None if found is None else found.rewrite


# ---- which calls are legalised, and how (the pure decision) ----------------------------------------------

MHA = (1, 16)  # batch, heads == kv heads


@pytest.mark.parametrize("d,n,expected", [
    (64, 4097, "dense"),  # qmm_naive would run, but the sliced cache has no kernel (the 1x4097x64x16)
    (64, 4096, "pad"),  # N % 4 == 0: qmm_sm90, wrong at group 64 >= K = 64
    (128, 4094, "dense"),  # the 1x4094x128x16
    (128, 4096, "dense"),  # float32 x: not qmm_sm80, so no over-read
])
def test_mha_scores_call_on_h200(d, n, expected):
    assert route(SM90, (*MHA, 1, d), (*MHA, n, d // 4)) == expected


def test_mha_scores_call_over_read_is_padded_in_half_precision():
    assert route(SM90, (*MHA, 1, 128), (*MHA, 4096, 32), dtype="float16") == "pad"  # qmm_sm80, K = 2 tiles
    assert route(SM90, (*MHA, 1, 128), (*MHA, 4095, 32), dtype="float16") == "dense"  # N % 128: qmm_naive
    assert route(SM90, (*MHA, 1, 256), (*MHA, 4096, 64), dtype="float16") == "dense"  # K = 4 tiles: no over-read


@pytest.mark.parametrize("m", [1, 2, 5, 8, 16, 512])
@pytest.mark.parametrize("bits", [4, 8])
def test_every_m_of_decode_verification_and_prefill(m, bits):
    pack = 32 // bits
    assert route(SM90, (*MHA, m, 64), (*MHA, 1000, 64 // pack), bits=bits) == "pad"
    assert route(SM90, (*MHA, m, 1001), (*MHA, 1001, 64 // pack), transpose=False, bits=bits) == "dense"


def test_supported_calls_are_left_alone():
    assert route(SM90, (7, 4096), (4096, 512)) is None  # a linear layer: dense 2-D weights, qmm_naive
    assert route(SM90, (1, 4096), (11008, 512)) is None  # decode through a linear layer: qmv
    assert route(SM90, (*MHA, 1, 64), (*MHA, 4097, 16), dense=True) is None  # batched, known dense
    assert route(SM90, (1, 64), (4096, 16)) is None  # M = B = 1 at group >= K: qmv, not qmm_sm90


def test_linear_layers_with_defective_kernels_are_padded():
    assert route(SM90, (4, 64), (4096, 16)) == "pad"  # K = 64 = group: qmm_sm90
    assert route(SM80, (16, 128), (4096, 32), dtype="bfloat16") == "pad"  # K = 2 tiles: qmm_sm80 over-reads
    assert route(SM80, (1, 64), (4096, 16)) is None
    assert route(SM90, (1, 64), (32768, 16)) == "pad"  # N > 16384: qmm_sm90 even at M = B = 1


def test_broadcast_weights_are_the_broadcast_rules():
    assert route(SM90, (1, 4, 4, 1, 64), (1, 4, 1, 4097, 16)) is None
    assert route(SM90, (2, 1, 64), (1, 4097, 16)) is None


@pytest.mark.parametrize("backend", [Backend("cpu"), Backend("metal", "applegpu_g15s")])
def test_cpu_and_metal_are_left_alone(backend):
    assert route(backend, (*MHA, 1, 64), (*MHA, 4097, 16)) is None
    assert route(backend, (*MHA, 1, 64), (*MHA, 4096, 16)) is None


def test_a_profile_that_measured_a_bucket_failed_dequantizes_on_metal():
    metal = Backend("metal", "applegpu_g15s")
    x_shape, w_shape = (*MHA, 2, 64), (*MHA, 4096, 16)
    bucket = QmmBucket.of("float32", x_shape, w_shape, {"transpose": True, "group_size": 64, "bits": 8})
    ways = {way: Measured(OK) for way in QMM_REWRITES}
    measured = Bucket(dataclasses.asdict(bucket), 2, {**ways, ORIGINAL: Measured("wrong", 0.5)})
    profiled = Backend("metal", "applegpu_g15s", profile=Profile("m4", "metal", mx.__version__, "now",
                                                                   {BROADCAST: (measured,)}))
    assert route(profiled, x_shape, w_shape) == "dequantize"
    assert route(profiled, (*MHA, 2, 64), (*MHA, 100, 16)) is None  # another bucket
    assert route(metal, x_shape, w_shape) is None
    spec, kwargs = intercept.APIS["quantized_matmul"], {"group_size": 64, "bits": 8}
    calls = {n: intercept.Call.intercepted(spec, (mx.zeros(x_shape), *quantized((*MHA, n, 64), 8)[0]), kwargs, None)
             for n in (4096, 3968, 100)}
    graph, site = trace_one_call(calls[4096])
    facts = call_facts(site, graph, profiled, eager=True)
    assert qml.RULE.decide(facts).rewrite == "dequantize"
    env = {n: ArrayEnv(c.operands, c.params, {}, profiled) for n, c in calls.items()}
    assert facts.still_holds(env[3968]) and not facts.still_holds(env[100])  # keyed by the bucket, not by N


def test_no_kernel_even_dense_dequantizes():
    assert route(SM90, (16, 96), (256, 24), group=32) is None  # K % 64 != 0: no tiled kernel, but qmv accepts
    params = {"transpose": True, "group_size": 32, "bits": 8, "mode": "affine"}
    assert qmm_dispatch.cuda_qmm_kernel(SM90, "float32", 4, 100, params) is None  # K % 8 != 0: nothing
    assert qml.legal_route(SM90, "float32", (4, 100), (256, 25), params).rewrite == "dequantize"


@pytest.mark.parametrize("dtype,d", [("float16", 64), ("float16", 128), ("float32", 64)])
def test_eager_key_routes_as_the_exact_kv_length_would(dtype, d):
    """The route is looked up by `dispatch_rows` of the KV length, not the length: the same answers."""
    params = {"transpose": True, "group_size": 64, "bits": 8, "mode": "affine"}
    for n in [*range(1, 300), 16383, 16384, 16385, 16512, 32768, 32769]:
        for m in (1, 4):
            for transpose in (True, False):
                params["transpose"] = transpose
                x_shape, w_shape = (1, 16, m, d if transpose else n), (1, 16, n, d // 4)
                exact = qml.legal_route(SM90, dtype, x_shape, w_shape, params)
                keyed = qml._keyed_route(SM90, getattr(mx, dtype), *qml._kv_length_free(x_shape, w_shape, params),
                                         tuple(params.items()), None)
                assert exact == keyed, (n, m, transpose)


# ---- the rewrites, run: the reference, and kernels that accept them --------------------------------------

@pytest.mark.parametrize("d,n,bits,m,transpose,rewrite,kernel", [
    (64, 21, 8, 1, True, "dense", "qmv"),  # M * B = 4 < 8
    (64, 24, 8, 1, True, "pad", "qmv"),
    (64, 28, 4, 2, True, "pad", "qmm_naive"),
    (128, 23, 4, 1, True, "dense", "qmv"),
    (64, 24, 8, 1, False, "dense", "qmm_naive"),
    (128, 23, 4, 16, False, "dense", "qmm_naive"),
])
def test_eager_rewrites_match_the_reference_on_sliced_caches(cuda, d, n, bits, m, transpose, rewrite, kernel):
    q, deq = sliced_cache(4, n, d, bits)
    x = mx.random.normal((1, 4, m, d if transpose else n))
    fn = qmm(transpose, bits)
    with pytest.raises(NoImplementation):  # as shipped, on CUDA
        cuda(x, *q, transpose=transpose, group_size=64, bits=bits)
    rewritten = mlxrewrite.eager(fn)
    assert_close(rewritten(x, *q), reference(x, deq, transpose))
    assert rewritten.rewriter.calls == {f"quantized_matmul: {NAME} -> {rewrite}": 1}
    assert cuda.kernels == [kernel]


def test_half_precision_over_read_runs_qmm_naive_instead(monkeypatch):
    simulated = SimulatedCuda(SM80)
    monkeypatch.setattr(Backend, "current", classmethod(lambda cls: SM80))
    monkeypatch.setitem(intercept._ORIGINALS, "quantized_matmul", simulated)
    q, deq = sliced_cache(2, 128, 128, 8, capacity=128, dtype=mx.float16)  # a full, dense buffer
    x = mx.random.normal((1, 2, 8, 128)).astype(mx.float16)
    fn = qmm(True, 8)
    with pytest.raises(AssertionError, match="qmm_sm80 reads"):
        simulated(x, *q, group_size=64, bits=8)
    rewritten = mlxrewrite.eager(fn)
    assert_close(rewritten(x, *q), reference(x.astype(mx.float32), deq.astype(mx.float32), True), rel=5e-3)
    assert simulated.kernels == ["qmm_naive"]


def test_decode_loop_traces_a_handful_of_times(cuda):
    """N grows every step; decisions are keyed on the kernel N's alignment picks, not on N."""
    rewritten = mlxrewrite.eager(qmm(True, 8))
    for n in range(250, 262):
        q, deq = sliced_cache(2, n, 64, 8, capacity=512)
        x = mx.random.normal((1, 2, 1, 64))
        assert_close(rewritten(x, *q), reference(x, deq, True))
    assert rewritten.rewriter.traces == 2  # dense (N % 4 != 0) and pad (N % 4 == 0)
    assert rewritten.rewriter.calls == {f"quantized_matmul: {NAME} -> dense": 9,
                                        f"quantized_matmul: {NAME} -> pad": 3}


def test_compile_sees_the_slice_and_makes_the_kernel_operands_dense(cuda):
    (buffer, deq) = quantized((1, 4, 256, 64), 8)
    x = mx.random.normal((1, 4, 3, 64))

    def attention_scores(x, w, s, b):
        return mx.quantized_matmul(x, *(a[..., :37, :] for a in (w, s, b)), transpose=True, group_size=64, bits=8)

    rewritten = mlxrewrite.compile(attention_scores)
    assert_close(rewritten(x, *buffer), reference(x, deq[..., :37, :], True))
    assert f"{NAME} -> dense" in rewritten.explain() and "have holes" in rewritten.explain()
    after = rewritten.trace_rewritten(x, *buffer)
    (node,) = after.find("QuantizedMatmul")
    for name in node.inputs[1:]:
        value = after.values[name]
        assert is_dense(value.shape, value.strides) and is_row_contiguous(value.shape[-2:], value.strides[-2:])


def test_linear_layers_pass_straight_through_eager_mode(cuda):
    (q, deq) = quantized((512, 256), 4)
    x = mx.random.normal((3, 256))
    rewritten = mlxrewrite.eager(qmm(True, 4))
    assert mx.array_equal(rewritten(x, *q), cuda.real(x, *q, group_size=64, bits=4)).item()
    assert rewritten.rewriter.traces == 0 and rewritten.rewriter.calls == {}


def test_eager_mode_leaves_linear_layers_to_mlx(cuda):
    """A 2-D call with a defective kernel (K = 64 = group on sm90): compile pads it; eager mode's `needs` passes
    linear layers straight through (the documented exception: their cost would be every layer's, every token)."""
    (q, deq) = quantized((256, 64), 8)
    x = mx.random.normal((4, 64))
    spec, gate = intercept.APIS["quantized_matmul"], intercept.Gate({"quantized_matmul": [qml.RULE.needs]})
    args, kwargs = (x, *q), {"group_size": 64, "bits": 8}
    assert not gate.admits(spec, args, kwargs)
    rewritten = mlxrewrite.compile(qmm(True, 8))
    assert_close(rewritten(x, *q), reference(x, deq, True))
    assert f"{NAME} -> pad" in rewritten.explain()


def test_supported_batched_call_is_bitwise_unchanged_when_known_dense(cuda):
    (q, deq) = quantized((1, 4, 256, 128), 8)
    x = mx.random.normal((1, 4, 2, 128))

    def fn(x, w, s, b):  # weights computed in the function: their (dense) layout is known
        return mx.quantized_matmul(x, w + 0, s + 0, b + 0, transpose=True, group_size=64, bits=8)

    rewritten = mlxrewrite.compile(fn)
    assert mx.array_equal(rewritten(x, *q), mx.compile(fn)(x, *q)).item()
    assert "left as is (no rule matched)" in rewritten.explain()


# ---- mlx-lm: a tiny MHA model (16 heads == 16 kv heads) with a quantized KV cache ------------------------

def mha_model(head_dim):
    return tiny("llama", num_attention_heads=16, num_key_value_heads=16, head_dim=head_dim, hidden_size=128)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("bits,noise,agree", [(8, 0.03, 1.0), (4, 0.4, 0.75)])  # measured 0.009-0.011 / 0.15-0.23
def test_mha_model_decodes_through_the_wrapper_on_simulated_cuda(cuda, monkeypatch, head_dim, bits, noise, agree):
    model = mha_model(head_dim)
    mx.random.seed(1)
    toks = mx.random.randint(0, 256, (1, 28))
    quantized_cache = lambda: [QuantizedKVCache(group_size=64, bits=bits) for _ in make_prompt_cache(model)]
    with monkeypatch.context() as shipped:  # as shipped on CUDA: the sliced cache has no kernel
        shipped.setattr(mlx_lm_base, "mx", types.SimpleNamespace(**{**vars(mx), "quantized_matmul": cuda}))
        with pytest.raises(NoImplementation):
            mx.eval(teacher_forced(model, toks, 20, quantized_cache(), chunk=8))
    monkeypatch.setattr(mx, "quantized_matmul", cuda.real)
    exact = teacher_forced(model, toks, 20, quantized_cache(), chunk=8)  # the same cache, CPU kernels
    floating = teacher_forced(model, toks, 20, make_prompt_cache(model), chunk=8)
    monkeypatch.setattr(mx, "quantized_matmul", cuda)  # what the wrapper passes calls on to
    mrl.wrap(model, disable=FUSED)  # the safety net alone (the fused attention takes M <= 16 where verified)
    try:
        got = teacher_forced(model, toks, 20, quantized_cache(), chunk=8)  # chunked prefill, then 8 steps
        explained = mrl.explain(model)
    finally:
        mrl.unwrap(model)
    assert_close(got, exact)
    assert mx.max(mx.abs(got - floating)).item() <= noise
    assert mx.mean(mx.argmax(got, -1) == mx.argmax(floating, -1)).item() >= agree  # logits within ~2 of each other
    assert f"{NAME} -> dense" in explained and f"{BROADCAST} ->" not in explained
    assert (f"{NAME} -> pad" in explained) is (head_dim == 64)  # N % 4 == 0 steps meet qmm_sm90 at K = 64
    assert set(cuda.kernels) == {"qmm_naive"}


def test_gpu_legalise_script_on_a_tiny_grid(cuda):
    """bench/gpu_legalise.py's loop on simulated CUDA: every case recorded, wrapped runs legalised and close."""
    from bench import gpu_legalise

    grid = {**gpu_legalise.QUICK, "hidden": 64, "layers": 1, "kv_heads": [16], "head_dims": [64], "vocab": 64,
            "prompts": [20], "bits": [8], "chunk": 8, "steps": 2}
    rows = gpu_legalise.run(grid, mx.float32, budget_s=600)
    assert [r["variant"] for r in rows] == list(gpu_legalise.VARIANTS)
    wrapped, dequantized = rows[1], rows[2]
    assert wrapped["max_logit_diff"] < 0.03 and wrapped["argmax_agree"] == 1.0 and wrapped["tokens_per_s"] > 0
    assert {call.split(" -> ")[1] for call in wrapped["calls"]} == {"dense", "pad"}
    assert set(dequantized["calls"]) == {f"quantized_matmul: {NAME} -> dequantize"}
    assert abs(dequantized["max_logit_diff"] - wrapped["max_logit_diff"]) < 1e-3
    skipped = gpu_legalise.run(grid, mx.float32, budget_s=-1)
    assert [r["skipped"] for r in skipped] == ["time budget"] * 3
    checks = gpu_legalise.kernel_rows({**grid, "heads": 2, "prompts": [24]}, mx.float32)
    assert len(checks) == 8 and all(r["rel_err"] < 1e-4 for r in checks)
    rewrites = {(r["N"], r["transpose"]): {c.split(" -> ")[1] for c in r["calls"]} for r in checks}
    assert rewrites == {(24, True): {"pad"}, (25, True): {"dense"}, (24, False): {"dense"}, (25, False): {"dense"}}


def test_gqa_model_stays_with_the_broadcast_rule_on_simulated_cuda(cuda):
    model = tiny("llama", num_attention_heads=16, num_key_value_heads=4, hidden_size=128)
    mx.random.seed(1)
    toks = mx.random.randint(0, 256, (1, 24))
    cache = lambda: [QuantizedKVCache(group_size=64, bits=8) for _ in make_prompt_cache(model)]
    floating = teacher_forced(model, toks, 20, make_prompt_cache(model), chunk=8)
    mrl.wrap(model, disable=FUSED)
    try:
        got = teacher_forced(model, toks, 20, cache(), chunk=8)
        calls = mrl.state(model).rewriter.calls
    finally:
        mrl.unwrap(model)
    assert mx.max(mx.abs(got - floating)).item() <= 0.03
    assert {c.split(": ")[1].split(" -> ")[0] for c in calls} == {BROADCAST}
