"""quantized-matmul-broadcast-weights: matching, the rewrites (fold, copy, dequantize), numerics, audit, graphs."""


import dataclasses

import mlx.core as mx
import pytest

import mlxrewrite
from mlxrewrite.examples import gqa_quantized_attention as gqa
from mlxrewrite.core.decide import decide_site
from mlxrewrite.audit import audit_graph
from mlxrewrite.core.layout import is_dense, stride0_batch_dims
from mlxrewrite.backends.device import OK, Backend, Bucket, Measured, Profile
from mlxrewrite.rules import qmm_dispatch, quantized_matmul_broadcast as qmb
from mlxrewrite.rules.qmm_profile import ORIGINAL, QMM_REWRITES, QmmBucket

NAME = qmb.NAME
CPU = Backend("cpu")



# ---- helpers --------------------------------------------------------------------------------------------

def quantize(shape, bits, group=64, seed=0):
    """(w, scales, biases) of a random float matrix, and its dequantized float value."""
    mx.random.seed(seed)
    w = mx.random.normal(shape)
    q = mx.quantize(w, group_size=group, bits=bits)
    return q, mx.dequantize(*q, group_size=group, bits=bits)


def float_qmm(x, deq, transpose):
    """Reference: the float matmul (its batch broadcasting is correct) on the dequantized weights."""
    return x @ (mx.swapaxes(deq, -1, -2) if transpose else deq)


def assert_close_to(out, ref, rel=1e-3):
    assert out.shape == ref.shape, (out.shape, ref.shape)
    scale = max(mx.max(mx.abs(ref)).item(), 1e-6)
    err = mx.max(mx.abs(out - ref)).item()
    assert err <= rel * scale, f"max error {err:.3g} vs scale {scale:.3g}"


def qmm_sites(graph):
    return [s for s in graph.calls if s.source == "python" and s.api == "quantized_matmul"]


def decisions(graph, backend=CPU):
    return [decide_site([qmb.RULE], site, graph, backend) for site in qmm_sites(graph)]


def forced(rewrite):
    """The built-in rule, but always choosing `rewrite` where it fires (same name: replaces the builtin)."""
    return qmb.RULE.forcing(rewrite)


def kernel_stride0_dims(graph):
    """For each QuantizedMatmul node: the weight operands' stride-0 batch dims as the kernel sees them."""
    found = []
    for node in graph.find("QuantizedMatmul"):
        batch = graph.values[node.outputs[0]].shape[:-2]
        for name, strides in node.notes["kernel_strides"].items():
            shape = batch + graph.values[name].shape[-2:]
            found.append(stride0_batch_dims(shape, strides))
    return found


# ---- the GQA quantized-KV pattern of mlx-lm ------------------------------------------------------------

_GQA_CACHE = {}


def gqa_case(n, m):
    if (n, m) not in _GQA_CACHE:
        args = gqa.example_inputs(n, m)
        queries, k_w, k_s, k_b, v_w, v_s, v_b = args
        keys = mx.dequantize(k_w, k_s, k_b, group_size=gqa.GROUP, bits=8)
        values = mx.dequantize(v_w, v_s, v_b, group_size=gqa.GROUP, bits=4)
        ref = gqa.reference(queries, keys, values)
        mx.eval(args, ref)
        _GQA_CACHE.clear()  # keep one case alive at a time (the largest is ~70 MB)
        _GQA_CACHE[(n, m)] = (args, ref)
    return _GQA_CACHE[(n, m)]


@pytest.mark.parametrize("m", [1, 2, 4, 8])
@pytest.mark.parametrize("n", [512, 2048, 4096, 7358])
def test_gqa_quantized_attention_rewritten(n, m):
    args, ref = gqa_case(n, m)
    rewritten = mlxrewrite.compile(gqa.attention)
    out = rewritten(*args)
    assert out.shape == (gqa.B, gqa.N_KV * gqa.N_REP, m, gqa.D)
    assert_close_to(out, ref)

    text = rewritten.explain()
    assert text.count(f"{NAME} -> fold") == 2, text
    assert "no rule matched" not in text and "!" not in text, text

    graph = rewritten.graph(*args)
    sites = qmm_sites(graph)
    assert len(sites) == 2
    assert all(s.location and s.location.startswith(gqa.__file__) for s in sites)
    assert [s.params["bits"] for s in sites] == [8, 4]
    ds = decisions(graph)
    assert [d.rewrite for d in ds] == ["fold", "fold"]
    assert all(d.params["dims"] == (2,) and d.params["batch"] == (gqa.B, gqa.N_KV, gqa.N_REP) for d in ds)

    before = mlxrewrite.audit(gqa.attention, *args)
    assert len(before.findings) == 2
    assert {f.rule for f in before.findings} == {NAME}
    assert all(f.severity == "error" and f.node is not None for f in before.findings)
    assert [f.location for f in before.findings] == [s.location for s in sites]
    assert not before.clean
    after = mlxrewrite.audit(rewritten, *args)
    assert after.clean, str(after)
    assert rewritten.traces == 1


def test_gqa_graph_before_and_after():
    args, ref = gqa_case(512, 2)
    rewritten = mlxrewrite.compile(gqa.attention)
    rewritten(*args)
    before = rewritten.graph(*args)
    after = rewritten.trace_rewritten(*args)
    assert len(before.find("QuantizedMatmul")) == len(after.find("QuantizedMatmul")) == 2
    assert kernel_stride0_dims(before) == [(2,)] * 6  # w, scales, biases of both calls
    assert kernel_stride0_dims(after) == [()] * 6
    # fold moved the 4 repeats into M: the kernel multiplies (1, 4, 1, 4*M, D) by the weights as expanded
    # (1, 4, 1, N, D/pack): equal batch shapes, nothing broadcast
    first = after.find("QuantizedMatmul")[0]
    assert after.values[first.inputs[0]].shape == (1, gqa.N_KV, 1, gqa.N_REP * 2, gqa.D)
    assert after.values[first.inputs[1]].shape[:3] == (1, gqa.N_KV, 1)
    # mlxrewrite.trace of a compiled function gives the rewritten graph
    assert [n.op for n in mlxrewrite.trace(rewritten, *args).nodes] == [n.op for n in after.nodes]
    assert "QuantizedMatmul" in str(after)


# ---- variants: explicit broadcasts, other batch dims, transpose=False, bits -----------------------------

K, N = 128, 192  # N != K so that a transposition mistake changes shapes


def case_explicit_broadcast_to(m, bits=8):
    (q, deq) = quantize((1, 4, 1, N, K), bits)
    x = mx.random.normal((1, 4, 4, m, K))

    def fn(x, w, s, b):
        ws = [mx.broadcast_to(a, (1, 4, 4) + a.shape[-2:]) for a in (w, s, b)]
        return mx.quantized_matmul(x, *ws, transpose=True, group_size=64, bits=bits)

    return fn, (x, *q), float_qmm(x, deq, True), "fold", (2,)


def _implicit(x_batch, w_batch, bits=8, transpose=True):
    def build(m):
        w_shape = w_batch + ((N, K) if transpose else (K, N))
        (q, deq) = quantize(w_shape, bits)
        x = mx.random.normal(x_batch + (m, K))

        def fn(x, w, s, b):
            return mx.quantized_matmul(x, w, s, b, transpose=transpose, group_size=64, bits=bits)

        return fn, (x, *q), float_qmm(x, deq, transpose)

    return build


def case_non_adjacent(m):  # broadcast dim 1, with a real batch dim between it and M
    return (*_implicit((1, 2, 3), (1, 1, 3))(m), "fold", (1,))


def case_two_dims_apart(m):
    return (*_implicit((2, 3, 2), (1, 3, 1))(m), "fold", (0, 2))


def case_two_dims_adjacent(m):
    return (*_implicit((3, 2, 2), (3, 1, 1))(m), "fold", (1, 2))


def case_transpose_false(m):
    return (*_implicit((1, 2, 3), (1, 2, 1), transpose=False)(m), "fold", (2,))


def case_4bit(m):
    return (*_implicit((1, 2, 4), (1, 2, 1), bits=4)(m), "fold", (2,))


def case_4bit_transpose_false(m):
    return (*_implicit((1, 2, 4), (1, 2, 1), bits=4, transpose=False)(m), "fold", (2,))


def case_x_rank3_w_broadcast_to_rank3(m):  # fold leaves 2-D weights and a 2-D x
    (q, deq) = quantize((1, N, K), 8)
    x = mx.random.normal((1, m, K))

    def fn(x, w, s, b):
        ws = [mx.broadcast_to(a, (4,) + a.shape[1:]) for a in (w, s, b)]
        return mx.quantized_matmul(x, *ws, transpose=True, group_size=64, bits=8)

    return fn, (x, *q), mx.broadcast_to(float_qmm(x, deq, True), (4, m, N)), "fold", (0,)


def case_w_only_broadcast(m):  # scales/biases carry real batch dims: fold cannot apply
    (q, deq) = quantize((1, 2, 1, N, K), 8)
    w, s, b = q
    s_full, b_full = (mx.concatenate([a] * 3, axis=2) for a in (s, b))
    x = mx.random.normal((1, 2, 3, m, K))

    def fn(x, w, s, b):
        w = mx.broadcast_to(w, s.shape[:-1] + w.shape[-1:])  # MLX wants one batch shape for w and scales
        return mx.quantized_matmul(x, w, s, b, transpose=True, group_size=64, bits=8)

    return fn, (x, w, s_full, b_full), float_qmm(x, deq, True), "copy", (2,)


def case_sliced_cache(m):  # a cache slice (unaligned length): fold on CPU, copy on CUDA (not dense)
    (q, deq) = quantize((1, 2, 160, K), 8)
    n = 100
    x = mx.random.normal((1, 2, 4, m, K))

    def fn(x, w, s, b):
        ws = [mx.expand_dims(a[:, :, :n], -3) for a in (w, s, b)]
        return mx.quantized_matmul(x, *ws, transpose=True, group_size=64, bits=8)

    return fn, (x, *q), float_qmm(x, mx.expand_dims(deq[:, :, :n], -3), True), "fold", (2,)


VARIANTS = {f.__name__.removeprefix("case_"): f for f in (
    case_explicit_broadcast_to, case_non_adjacent, case_two_dims_apart, case_two_dims_adjacent,
    case_transpose_false, case_4bit, case_4bit_transpose_false, case_x_rank3_w_broadcast_to_rank3,
    case_w_only_broadcast, case_sliced_cache)}


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_fires_and_is_correct(variant, m):
    fn, args, ref, expected, dims = VARIANTS[variant](m)
    mx.eval(args, ref)
    assert_close_to(fn(*args), ref)  # the original is correct on CPU: the reference is right

    rewritten = mlxrewrite.compile(fn)
    out = rewritten(*args)
    assert_close_to(out, ref)
    assert f"{NAME} -> {expected}" in rewritten.explain(), rewritten.explain()
    (decision,) = decisions(rewritten.graph(*args))
    assert decision.rewrite == expected and decision.params["dims"] == dims
    assert kernel_stride0_dims(rewritten.graph(*args)) != [()] * 3
    assert kernel_stride0_dims(rewritten.trace_rewritten(*args)) == [()] * 3
    assert mlxrewrite.audit(rewritten, *args).clean


@pytest.mark.parametrize("rewrite", ["fold", "copy"])
@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "w_only_broadcast"])
def test_forced_rewrite_is_exact(variant, rewrite):
    fn, args, ref, _, dims = VARIANTS[variant](2)
    rewritten = mlxrewrite.compile(fn, rules=[forced(rewrite)])
    assert [r.name for r in rewritten.rules].count(NAME) == 1  # replaced the builtin, not added beside it
    out = rewritten(*args)
    assert_close_to(out, ref)
    assert f"{NAME} -> {rewrite}: " in rewritten.explain() and f"forced {rewrite}" in rewritten.explain()
    assert kernel_stride0_dims(rewritten.trace_rewritten(*args)) == [()] * 3


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forced_dequantize_is_exact_and_runs_no_quantized_kernel(variant):
    """The fallback for shapes a backend's quantized kernels reject: also where fold cannot apply."""
    fn, args, ref, _, _ = VARIANTS[variant](2)
    rewritten = mlxrewrite.compile(fn, rules=[forced("dequantize")])
    out = rewritten(*args)
    assert_close_to(out, ref)
    assert out.dtype == fn(*args).dtype
    after = rewritten.trace_rewritten(*args)
    assert not after.find("QuantizedMatmul") and after.find("Matmul")


def test_forced_copy_on_gqa_matches_reference():
    args, ref = gqa_case(512, 4)
    rewritten = mlxrewrite.compile(gqa.attention, rules=[forced("copy")])
    assert_close_to(rewritten(*args), ref)
    assert rewritten.explain().count(f"{NAME} -> copy") == 2
    after = rewritten.trace_rewritten(*args)
    assert "Concatenate" in [n.op for n in after.nodes]
    assert kernel_stride0_dims(after) == [()] * 6


def test_w_only_broadcast_copy_only_touches_w():
    fn, args, ref, _, _ = case_w_only_broadcast(2)
    rewritten = mlxrewrite.compile(fn)
    (decision,) = decisions(rewritten.graph(*args))
    assert decision.params["operand_dims"] == {"w": (2,), "scales": (), "biases": ()}
    assert "not every weight operand is broadcast" in decision.reason


def test_sliced_cache_on_cuda_folds_onto_dense_weights(monkeypatch):
    """CUDA kernels raise on non-dense weights (a sliced cache): fold makes them dense (one copy of the
    un-broadcast cache), where CPU and Metal fold onto the sliced view as is."""
    fn, args, ref, _, _ = case_sliced_cache(2)
    graph = mlxrewrite.trace(fn, *args)
    assert decisions(graph, CPU)[0].params["densify"] is False
    (cuda,) = decisions(graph, Backend("cuda"))
    assert cuda.rewrite == "fold" and cuda.params["densify"] and "made dense" in cuda.reason

    monkeypatch.setattr(Backend, "current", classmethod(lambda cls: Backend("cuda")))
    rewritten = mlxrewrite.compile(fn)
    assert_close_to(rewritten(*args), ref)
    after = rewritten.trace_rewritten(*args)
    (node,) = after.find("QuantizedMatmul")
    for name, strides in node.notes["kernel_strides"].items():  # what the kernel reads: dense, row-major
        value = after.values[name]
        assert is_dense(value.shape, strides) and strides[-1] == 1, (name, value.shape, strides)
    before = graph.find("QuantizedMatmul")[0]
    assert not all(is_dense(graph.values[n].shape, st) for n, st in before.notes["kernel_strides"].items())


def case_scores_fp16(d, group, m=2, n=256):
    """The GQA scores call on a float16 cache at head dim d: K = d, which qmm_sm80 tiles by max(64, group)."""
    mx.random.seed(0)
    q = mx.quantize(mx.random.normal((1, 2, n, d)).astype(mx.float16), group_size=group, bits=4)
    deq = mx.dequantize(*q, group_size=group, bits=4).astype(mx.float32)
    x = mx.random.normal((1, 2, 4, m, d)).astype(mx.float16)

    def fn(x, w, s, b):
        return mx.quantized_matmul(x, *(mx.expand_dims(a, -3) for a in (w, s, b)), transpose=True,
                                   group_size=group, bits=4)

    ref = float_qmm(x.astype(mx.float32), mx.expand_dims(deq, -3), True)
    return fn, (x, *q), ref


def feeds_from_padded_buffer(graph, value):
    """Is `value` a view of a longer buffer, as `_with_slack` makes it (Concatenate -> Slice -> Reshape)?"""
    ops = []
    while value in graph.nx and next(graph.nx.predecessors(value), None) is not None:
        node = graph.nx.nodes[next(graph.nx.predecessors(value))]["node"]
        ops.append(node.op)
        if node.op not in ("Reshape", "Slice"):
            break
        value = node.inputs[0]
    return ops[-1] == "Concatenate" and "Slice" in ops


@pytest.mark.parametrize("rewrite", ["fold", "copy"])
def test_short_k_on_cuda_sm80_gets_slack_after_x_and_w(rewrite, monkeypatch):
    """qmm_sm80 reads up to 2 K-tiles past the ends of x and w when K spans fewer than 3 tiles (H100: an
    "unspecified launch failure"). Fold and copy pass views of buffers with zeros after them; numbers unchanged."""
    fn, args, ref = case_scores_fp16(d=128, group=64)
    sm80 = Backend("cuda", "sm_80")
    (decision,) = decisions(mlxrewrite.trace(fn, *args), sm80)
    assert "qmm_sm80 reads up to 1 K-tile(s) of 64 columns" in decision.params["slack"]
    assert f"{qmb.SLACK_BYTES} B of slack" in decision.reason

    monkeypatch.setattr(Backend, "current", classmethod(lambda cls: sm80))
    rewritten = mlxrewrite.compile(fn, rules=[forced(rewrite)])
    out = rewritten(*args)
    assert mx.array_equal(out, fn(*args)).item()  # the same dot products as the call (correct on CPU)
    assert_close_to(out.astype(mx.float32), ref, rel=1e-2)  # float16 rounding
    after = rewritten.trace_rewritten(*args)
    (node,) = after.find("QuantizedMatmul")
    assert feeds_from_padded_buffer(after, node.inputs[0]), "x"
    assert feeds_from_padded_buffer(after, node.inputs[1]), "w"
    assert not feeds_from_padded_buffer(after, node.inputs[2]), "scales are read within bounds"
    for name, strides in node.notes["kernel_strides"].items():  # dense: MLX passes the views, not copies
        assert is_dense(after.values[name].shape, strides), name


@pytest.mark.parametrize("arch,d,group", [("sm_80", 256, 64), ("sm_90", 256, 64), ("sm_90", 128, 64)])
def test_no_slack_where_the_quantized_kernel_stays_in_bounds(arch, d, group):
    """K of 3 tiles or more keeps qmm_sm80's pipeline in bounds; sm_90 at group < K runs qmm_sm80 too."""
    fn, args, ref = case_scores_fp16(d=d, group=group)
    (decision,) = decisions(mlxrewrite.trace(fn, *args), Backend("cuda", arch))
    assert decision.rewrite == "fold"
    assert bool(decision.params["slack"]) is (d == 128), decision.params["slack"]


@pytest.mark.parametrize("d,group", [(64, 64), (128, 128)])
def test_sm90_short_k_is_dequantized_whatever_a_profile_says(d, group, monkeypatch):
    """qmm_sm90 (H100) computes transposed calls with group_size >= K wrong for any weight layout (measured),
    so fold and copy are wrong too: dequantize, also where a profile measured fold right in the bucket."""
    fn, args, ref = case_scores_fp16(d=d, group=group)
    sm90 = Backend("cuda", "sm_90")
    (decision,) = decisions(mlxrewrite.trace(fn, *args), sm90)
    assert decision.rewrite == "dequantize" and "CUDA qmm_sm90 computes K=" in decision.reason

    x, w = args[0], args[1]
    bucket = QmmBucket.of("float16", x.shape, w.shape, {"transpose": True, "group_size": group, "bits": 4})
    ways = {way: Measured(OK, 0.0, 1.0) for way in (ORIGINAL, *QMM_REWRITES)}
    measured = Bucket(dataclasses.asdict(bucket), 2, {**ways, "fold": Measured(OK, 0.0, 0.5)})
    profiled = Backend("cuda", "sm_90", profile=Profile("x", "cuda", mx.__version__, "now", {NAME: (measured,)}))
    assert decisions(mlxrewrite.trace(fn, *args), profiled)[0].rewrite == "dequantize"

    monkeypatch.setattr(Backend, "current", classmethod(lambda cls: sm90))
    rewritten = mlxrewrite.compile(fn)
    assert_close_to(rewritten(*args).astype(mx.float32), ref, rel=1e-2)
    assert not rewritten.trace_rewritten(*args).find("QuantizedMatmul")


@pytest.mark.parametrize("m,transpose,fires", [
    (2, True, True), (13, True, True), (14, True, False), (32, True, False),
    (3, False, True), (4, False, False),
])
def test_metal_policy_follows_vector_kernel_limit(m, transpose, fires):
    # applegpu_g13s: get_qmv_batch_limit gives 14 for K, N <= 2048; transpose=False uses the qvm limit 4
    fn, args, _ = _implicit((1, 2, 2), (1, 2, 1), transpose=transpose)(m)
    graph = mlxrewrite.trace(fn, *args)
    report = audit_graph(graph, backend=Backend("metal", "applegpu_g13s"))
    assert (len(report.findings) == 1) == fires, str(report)
    # CUDA: wrong for every M
    assert len(audit_graph(graph, backend=Backend("cuda")).findings) == 1


# ---- must not fire ------------------------------------------------------------------------------------

def neg_equal_batch_dims():
    (q, _) = quantize((1, 2, 3, N, K), 8)
    return (lambda x, w, s, b: mx.quantized_matmul(x, w, s, b, transpose=True, group_size=64, bits=8),
            (mx.random.normal((1, 2, 3, 2, K)), *q))


def neg_2d_weights():  # nn.QuantizedLinear style
    (q, _) = quantize((N, K), 4)
    return (lambda x, w, s, b: mx.quantized_matmul(x, w, s, b, transpose=True, group_size=64, bits=4),
            (mx.random.normal((2, 5, K)), *q))


def neg_x_rank2():  # MLX does not broadcast a 2-D x against batched weights
    (q, _) = quantize((1, N, K), 8)

    def fn(x, w, s, b):
        ws = [mx.broadcast_to(a, (4,) + a.shape[1:]) for a in (w, s, b)]
        return mx.quantized_matmul(x, *ws, transpose=True, group_size=64, bits=8)

    return fn, (mx.random.normal((3, K)), *q)


def neg_expand_without_repeat():  # expand_dims(-3) but n_rep == 1: nothing is broadcast
    (q, _) = quantize((1, 2, N, K), 8)

    def fn(x, w, s, b):
        return mx.quantized_matmul(x, *[mx.expand_dims(a, -3) for a in (w, s, b)], transpose=True,
                                   group_size=64, bits=8)

    return fn, (mx.random.normal((1, 2, 1, 2, K)), *q)


@pytest.mark.parametrize("build", [neg_equal_batch_dims, neg_2d_weights, neg_x_rank2, neg_expand_without_repeat],
                         ids=lambda f: f.__name__.removeprefix("neg_"))
def test_must_not_fire(build):
    fn, args = build()
    rewritten = mlxrewrite.compile(fn)
    out = rewritten(*args)
    assert mx.array_equal(out, mx.compile(fn)(*args)).item()
    assert out.dtype == fn(*args).dtype and out.shape == fn(*args).shape
    text = rewritten.explain()
    assert "left as is (no rule matched)" in text and f"{NAME} ->" not in text, text
    assert decisions(rewritten.graph(*args)) == [None]
    assert mlxrewrite.audit(fn, *args).clean
    assert audit_graph(rewritten.graph(*args), rules=[qmb.RULE], backend=Backend("cuda")).clean  # legalise fires: inputs may be sliced views


def test_disable_keeps_the_hazard():
    args, ref = gqa_case(512, 2)
    rewritten = mlxrewrite.compile(gqa.attention, disable=(NAME,))
    out = rewritten(*args)
    assert mx.array_equal(out, mx.compile(gqa.attention)(*args)).item()
    assert NAME not in [r.name for r in rewritten.rules]
    assert kernel_stride0_dims(rewritten.trace_rewritten(*args)) == [(2,)] * 6


def test_weights_broadcast_outside_the_function_are_detected():
    (q, deq) = quantize((1, 2, 1, N, K), 8)
    ws = [mx.broadcast_to(a, (1, 2, 4) + a.shape[-2:]) for a in q]  # a broadcast KV cache handed in as is
    x = mx.random.normal((1, 2, 4, 2, K))

    def fn(x, w, s, b):
        return mx.quantized_matmul(x, w, s, b, transpose=True, group_size=64, bits=8)

    rewritten = mlxrewrite.compile(fn)
    assert_close_to(rewritten(x, *ws), float_qmm(x, deq, True))
    assert f"{NAME} -> fold" in rewritten.explain()
    # the plan relied on the inputs' stride 0: the same shapes with dense (different) weights must retrace,
    # never reuse "index 0 of the broadcast dim"
    dense_full = [mx.random.normal((1, 2, 4, N, K)) for _ in range(1)][0]
    dq = mx.quantize(dense_full, group_size=64, bits=8)
    mx.eval(dq)
    out = rewritten(x, *dq)
    reference = x @ mx.dequantize(*dq, group_size=64, bits=8).swapaxes(-1, -2)
    assert_close_to(out, reference)
    assert rewritten.traces == 2
    assert "input layout (strides) changed" in rewritten.explain()


@pytest.mark.parametrize("mode,group_size,bits", [("mxfp4", 32, 4), ("mxfp8", 32, 8), ("nvfp4", 16, 4)])
def test_floating_point_modes_fold_without_biases(mode, group_size, bits):
    w = mx.random.normal((1, 2, 1, 128, 64))
    q = mx.quantize(w, group_size=group_size, bits=bits, mode=mode)  # (w, scales): no biases in fp modes
    x = mx.random.normal((1, 2, 4, 2, 64))

    def fn(x, *q):
        return mx.quantized_matmul(x, *q, transpose=True, group_size=group_size, bits=bits, mode=mode)

    reference = x @ mx.dequantize(*q, group_size=group_size, bits=bits, mode=mode).swapaxes(-1, -2)
    rewritten = mlxrewrite.compile(fn)
    assert_close_to(rewritten(x, *q), reference)
    assert f"{NAME} -> fold" in rewritten.explain()
    assert_close_to(mlxrewrite.compile(fn, rules=[forced("dequantize")])(x, *q), reference)


@pytest.mark.parametrize("kind,arch,dtype,rows,k,group,transpose,mode,kernel", [
    ("cuda", "sm_80", "float16", 32, 128, 64, True, "affine", "qmm_sm80"),
    ("cuda", "sm_80", "bfloat16", 8, 64, 64, True, "affine", "qmm_sm80"),
    ("cuda", "sm_80", "float16", 32, 128, 128, True, "affine", "qmm_sm80"),  # sm90's kernel needs sm_90
    ("cuda", "sm_90", "float16", 32, 128, 64, True, "affine", "qmm_sm80"),  # group < K: not the sm90 kernel
    ("cuda", "sm_90", "float16", 32, 128, 128, True, "affine", "qmm_sm90"),
    ("cuda", "sm_90", "float32", 2, 64, 64, True, "affine", "qmm_sm90"),
    ("cuda", "sm_90", "float16", 1, 64, 64, True, "affine", "qmv"),  # M = B = 1: qmv
    ("cuda", "sm_90", "float16", 32, 64, 32, True, "mxfp4", "qmm_sm80"),  # sm90's kernel: affine only
    ("cuda", "", "float16", 32, 64, 64, True, "affine", "qmm_sm90"),  # unknown architecture: the wrong kernel
    ("cuda", "", "float16", 32, 128, 64, True, "affine", "qmm_sm80"),
    ("cuda", "sm_80", "float16", 32, 96, 64, True, "affine", "qmv"),  # K % tile: not qmm_naive either
    ("cuda", "sm_80", "float16", 4, 128, 64, True, "affine", "qmv"),  # rows < 8: qmv
    ("cuda", "sm_80", "float32", 32, 128, 64, True, "affine", "qmm_naive"),
    ("cuda", "sm_80", "float16", 32, 128, 64, False, "affine", "qmm_naive"),
    ("cuda", "sm_75", "float16", 32, 128, 64, True, "affine", "qmm_naive"),
    ("metal", "applegpu_g15s", "float16", 32, 128, 64, True, "affine", None),
    ("cpu", "", "float16", 32, 128, 64, True, "affine", None),
])
def test_cuda_qmm_kernel_mirrors_mlx_dispatch(kind, arch, dtype, rows, k, group, transpose, mode, kernel):
    params = {"transpose": transpose, "group_size": group, "bits": 4, "mode": mode}
    backend = Backend(kind, arch)
    assert qmm_dispatch.cuda_qmm_kernel(backend, dtype, rows, k, params) == kernel
    assert bool(qmm_dispatch.cuda_qmm_wrong(backend, dtype, rows, k, params)) is (kernel == "qmm_sm90")
    overreads = kernel == "qmm_sm80" and k < 3 * max(64, group)
    assert bool(qmm_dispatch.cuda_qmm_overreads(backend, dtype, rows, k, params)) is overreads
