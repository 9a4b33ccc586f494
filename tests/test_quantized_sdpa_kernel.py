"""The fused quantized-attention algorithm (CPU reference) against dequantize-then-float32 attention.

The CUDA kernel runs the same algorithm; bench/gpu_fused_attention.py checks it on a GPU.
"""

import mlx.core as mx
import pytest

from bench.gpu_fused_attention import cache, dense
from mlxrewrite.backends.kernels import chunk_size, quantized_sdpa


def _close(a, b, tol=2e-5):
    err = mx.abs(a - b).max().item()
    assert err < tol * max(1.0, mx.abs(b).max().item()), err


GRID = [  # B, Hq, Hkv, M, N, D, bits, gs, split
    (1, 4, 1, 1, 300, 64, 8, 64, 128),     # unaligned N, 3 chunks, the last short
    (2, 8, 2, 3, 2049, 128, 4, 32, None),  # default chunking, N one past a power of two
    (1, 2, 2, 5, 100, 96, 8, 32, 256),     # N < chunk: one partial chunk, MHA
    (1, 16, 1, 2, 257, 128, 4, 128, 64),   # n_rep 16, chunk boundary one key in
]


@pytest.mark.parametrize("B,Hq,Hkv,M,N,D,bits,gs,split", GRID)
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive", "causal"])
def test_reference_matches_dense(B, Hq, Hkv, M, N, D, bits, gs, split, mask_kind):
    mx.random.seed(N * 7 + M)
    q = mx.random.normal((B, Hq, M, D))
    k, v = cache(B, Hkv, N, D, bits, gs, mx.float32)  # views of a 256-step buffer, as mlx-lm's cache
    mask = {
        "none": None,
        "causal": "causal",
        "bool": mx.random.uniform(shape=(B, 1, M, N)) > 0.3,  # broadcast over heads
        "additive": mx.random.normal((1, Hq, M, N)) * 2.0,
    }[mask_kind]
    scale = D**-0.5
    out = quantized_sdpa(q, k, v, scale=scale, group_size=gs, bits=bits, mask=mask, split=split, impl="reference")
    assert out.shape == (B, Hq, M, D) and out.dtype == q.dtype
    _close(out, dense(q, k, v, scale=scale, gs=gs, bits=bits, mask=mask))


def test_fully_masked_row_is_the_uniform_average_and_sinks_join_the_denominator():
    mx.random.seed(3)
    q = mx.random.normal((1, 4, 2, 64))
    k, v = cache(1, 2, 700, 64, 8, 64, mx.float32)
    mask = mx.ones((1, 1, 2, 700), dtype=mx.bool_)
    mask[..., 1, :] = False  # row 1 sees nothing: mlx-lm's finite fill gives the mean of V
    sinks = mx.random.normal((4,))
    kw = dict(scale=0.125, group_size=64, bits=8)
    out = quantized_sdpa(q, k, v, mask=mask, sinks=sinks, split=256, impl="reference", **kw)
    _close(out, dense(q, k, v, gs=64, bits=8, mask=mask, sinks=sinks, scale=0.125))
    plain = quantized_sdpa(q, k, v, mask=mask, split=256, impl="reference", **kw)
    vd = mx.dequantize(*v, group_size=64, bits=8)
    _close(plain[:, :, 1], mx.repeat(vd.mean(axis=2), 2, axis=1))


@pytest.mark.parametrize("Hq,Hkv,D,bits,mask_kind", [(8, 2, 64, 8, "causal"), (4, 4, 128, 4, "bool")])
def test_reference_rows_are_bitwise_m_invariant(Hq, Hkv, D, bits, mask_kind):
    """Row i of a verification pass of M rows equals decoding row i alone (bitwise), for M = 2..16."""
    N = 1000
    mx.random.seed(11)
    k, v = cache(1, Hkv, N, D, bits, 64, mx.float32)
    q16 = mx.random.normal((1, Hq, 16, D))
    full_mask = mx.random.uniform(shape=(1, 1, 16, N)) > 0.2
    kw = dict(scale=D**-0.5, group_size=64, bits=bits, impl="reference")
    for M in (2, 5, 16):
        q = q16[:, :, :M]
        if mask_kind == "causal":
            mask, row_mask = "causal", lambda i: mx.arange(N)[None] <= N - M + i  # noqa: B023
        else:
            mask, row_mask = full_mask[:, :, :M], lambda i: full_mask[:, :, i : i + 1]  # noqa: B023
        many = quantized_sdpa(q, k, v, mask=mask, **kw)
        for i in range(M):
            one = quantized_sdpa(q[:, :, i : i + 1], k, v, mask=row_mask(i), **kw)
            assert mx.array_equal(many[:, :, i : i + 1], one).item(), (M, i)


def test_chunking_depends_on_n_only_and_rejects_bad_input():
    assert chunk_size(1) == chunk_size(16384) == 256
    assert chunk_size(32768) == 512 and chunk_size(131072) == 2048 and chunk_size(32769) % 256 == 0
    q = mx.zeros((1, 4, 1, 64))
    k, v = cache(1, 2, 10, 64, 8, 64, mx.float32)
    with pytest.raises(ValueError):
        quantized_sdpa(q, k, v, scale=1.0, group_size=64, bits=4)  # packed width says 8 bits
    with pytest.raises(ValueError):
        quantized_sdpa(q, k, v, scale=1.0, group_size=64, bits=8, impl="metal")
    with pytest.raises(ValueError):  # the kernel indexes the mask by N: a wrong length must not reach it
        quantized_sdpa(q, k, v, scale=1.0, group_size=64, bits=8, mask=mx.ones((1, 9), dtype=mx.bool_))
    with pytest.raises(ValueError):
        quantized_sdpa(q, k, v, scale=1.0, group_size=64, bits=8, sinks=mx.zeros((2,)))
    k, v = cache(1, 2, 20000, 64, 8, 64, mx.float32)  # the CUDA kernel merges at most 128 chunks per row
    with pytest.raises(ValueError, match="split 128 cuts 20000 keys into more than 128 chunks"):
        quantized_sdpa(q, k, v, scale=1.0, group_size=64, bits=8, split=128, impl="cuda")
    with pytest.raises(ValueError, match="multiple of 128"):
        quantized_sdpa(q, k, v, scale=1.0, group_size=64, bits=8, split=192, impl="cuda")
    with pytest.raises(ValueError, match="32 query heads per kv head; the CUDA kernel takes at most 16"):
        quantized_sdpa(mx.zeros((1, 64, 1, 64)), k, v, scale=1.0, group_size=64, bits=8, impl="cuda")


def test_cuda_launch_plan_writes_its_constants_and_sizes_its_work_buffer(monkeypatch):
    """What one CUDA launch is given (checked without a GPU: the kernel object is recorded, not built): the
    template arguments as constants in the source, one work buffer holding (max, sum) and the partial outputs
    of every row and chunk plus one counter per row group, zeroed by MLX, and a grid of chunks x row groups."""
    import importlib

    cuda = importlib.import_module("mlxrewrite.backends.kernels.quantized_sdpa_cuda")
    monkeypatch.setattr(mx.fast, "cuda_kernel", lambda **kernel: kernel)
    cuda._kernel.cache_clear()
    B, Hq, Hkv, M, D, N, chunk = 2, 16, 4, 3, 128, 4093, 256
    kernel, launch = cuda.plan(B, Hq, Hkv, M, D, N, chunk, 8, 64, mx.bfloat16, cuda.MASK_BOOL, mx.bool_, mx.float32)
    cuda._kernel.cache_clear()
    _, mbmax, mbe = cuda.geometry(D, Hq // Hkv, M)
    nc, groups = -(-N // chunk), -(-M // mbe)
    assert launch["output_shapes"] == [(B, Hq, M, D), (B * Hq * M * nc * (D + 2) + B * Hkv * groups,)]
    assert launch["output_dtypes"] == [mx.bfloat16, mx.float32] and launch["init_value"] == 0
    assert launch["grid"] == (groups * nc * cuda.THREADS, Hkv, B) and "template" not in launch
    for line in ("using T = __nv_bfloat16;", "using MT = bool;", "using ST = float;", "constexpr int D = 128;",
                 f"constexpr int MBE = {mbe};", f"constexpr int MASK = {cuda.MASK_BOOL};", "constexpr bool SINKS = true;"):
        assert line in kernel["source"].splitlines()
    assert kernel["input_names"] == ["q", "kw", "ks", "kb", "vw", "vs", "vb", "mask", "sinks", "params"]
    assert kernel["output_names"] == ["out", "work"] and not kernel["ensure_row_contiguous"]
    packed, _ = cuda.plan(B, Hq, Hkv, M, D, N, chunk, 8, 64, mx.float16, cuda.MASK_NONE, None, None, packed=True)
    cuda._kernel.cache_clear()
    assert packed["input_names"] == ["q", "kv", "params", "rows"] and "qsdpa::split_packed<" in packed["source"]
    assert packed["name"].startswith("qsdpa_packed_") and packed["header"] == kernel["header"]


def test_the_kernel_source_includes_its_device_code_by_path():
    """MLX hashes each kernel's whole source at every evaluation: the 11 KB of device code are #included
    (qsdpa.cuh, shipped in the wheel) with their hash, so an edited file is a new kernel."""
    import hashlib
    import importlib

    cuda = importlib.import_module("mlxrewrite.backends.kernels.quantized_sdpa_cuda")
    text = cuda.HEADER_PATH.read_text()
    assert "__device__ void split_packed(" in text and len(cuda._HEADER) < 200
    assert cuda._HEADER == (f'#include "{cuda.HEADER_PATH.resolve()}"  '
                            f'// sha256 {hashlib.sha256(text.encode()).hexdigest()[:16]}\n')  # MLX appends to it


def test_a_decode_loop_over_a_packed_cache_plans_once_per_chunk_and_makes_one_small_scalar_per_token(monkeypatch):
    """A packed cache's row count changes every token; the launch depends on it only through the count of
    chunks (the row count itself comes in a scalar), so 100 tokens cost one plan per 256 of them. The row
    count is the one array made per token, of 4 bytes: MLX takes those from a pool, while a 16-byte array
    costs an allocation of host-visible memory (145-180 us on an H200 host); the float scalars are made
    once per chunk size."""
    import importlib

    from mlxrewrite.backends.kernels import clear_caches, kv_layout, quantized_sdpa_packed

    sdpa = importlib.import_module("mlxrewrite.backends.kernels.quantized_sdpa")
    cuda = importlib.import_module("mlxrewrite.backends.kernels.quantized_sdpa_cuda")
    launches = []

    def kernel(**_):
        def call(inputs, output_shapes, output_dtypes, grid, **__):
            launches.append((grid, inputs[-2].tolist(), inputs[-1]))  # the float scalars, then the row count
            return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes)]
        return call

    monkeypatch.setattr(mx.fast, "cuda_kernel", kernel)
    clear_caches()
    D, bits, gs = 128, 8, 64
    row = kv_layout.Row.of(D, D, gs, bits, mx.float16)
    kv = mx.zeros((1, 4, 4352, row.width), mx.uint32)
    q = mx.zeros((1, 16, 1, D), mx.float16)
    try:
        for n in range(4000, 4100):
            quantized_sdpa_packed(q, kv_layout.Packed(kv, n, row), scale=0.125, group_size=gs, bits=bits,
                                  impl="cuda")
        counts = [count for *_, count in launches]
        assert all(c.dtype == mx.int32 and c.nbytes == 4 for c in counts)
        assert [c.item() for c in counts] == list(range(4000, 4100))
        assert all(params == [0.125, float(mx.finfo(mx.float16).min), 256.0] for _, params, _ in launches)
        assert all(grid[0] == -(-c.item() // 256) * cuda.THREADS for grid, _, c in launches)
        prepared = sdpa.packed_attention(q.shape, q.dtype, kv_layout.Packed(kv, 4000, row), scale=0.125,
                                         group_size=gs, bits=bits, impl="cuda")
        assert sdpa._prepared_packed.cache_info().currsize == 1 and prepared.rows[0] == 4099  # one for every n
        assert sdpa._cuda_plan.cache_info().misses == 2  # 16 chunks up to 4096 rows, 17 after
        assert sdpa._params.cache_info().currsize == 1  # one float scalars array for the whole loop
        # a mask's last axis is n itself, not whole chunks: planning this call for 4096 rows used to raise
        quantized_sdpa_packed(q, kv_layout.Packed(kv, 4050, row), scale=0.125, group_size=gs, bits=bits,
                              mask=mx.ones((1, 1, 1, 4050), dtype=mx.bool_), impl="cuda")
        assert launches[-1][2].item() == 4050
        with pytest.raises(ValueError, match="4353 rows asked of a buffer of 4352"):
            quantized_sdpa_packed(q, kv_layout.Packed(kv, 4353, row), scale=0.125, group_size=gs, bits=bits,
                                  impl="cuda")
        with pytest.raises(ValueError, match="a mask over 4049 keys for 4050 rows"):  # the kernel would read past it
            quantized_sdpa_packed(q, kv_layout.Packed(kv, 4050, row), scale=0.125, group_size=gs, bits=bits,
                                  mask=mx.ones((1, 4049), dtype=mx.bool_), impl="cuda")
        with pytest.raises(ValueError, match="unknown mask 'causual'"):
            quantized_sdpa_packed(q, kv_layout.Packed(kv, 4050, row), scale=0.125, group_size=gs, bits=bits,
                                  mask="causual", impl="cuda")
        with pytest.raises(ValueError, match="17 query heads per kv head"):  # the kernel's limits, as unpacked
            quantized_sdpa_packed(mx.zeros((1, 68, 1, D), mx.float16), kv_layout.Packed(kv, 4050, row),
                                  scale=0.125, group_size=gs, bits=bits, impl="cuda")
        assert len(launches) == 101  # no refused call launched
    finally:
        clear_caches()  # no stub kernel left behind for later tests


def test_launches_over_a_packed_cache_chain_their_counters_and_ask_mlx_to_fill_nothing(monkeypatch):
    """A packed cache's launches take their row groups' counters from the previous launch's third output
    (which that launch zeroes), so MLX zero-fills no output of theirs (two fill nodes fewer per call); the
    chain is also their order on the GPU. The first launch starts from zeros; a query with more row groups
    than the chain's counters hold, or buffers without a chain, launch as before (zero-filled work)."""
    import importlib

    from mlxrewrite.backends.kernels import clear_caches, kv_layout, quantized_sdpa_packed

    cuda = importlib.import_module("mlxrewrite.backends.kernels.quantized_sdpa_cuda")
    launches = []

    def kernel(**made):
        def call(inputs, output_shapes, output_dtypes, init_value, **__):
            outs = [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes)]
            launches.append((made, inputs, outs, init_value))
            return outs
        return call

    monkeypatch.setattr(mx.fast, "cuda_kernel", kernel)
    clear_caches()
    D, bits, gs, B, Hkv = 128, 8, 64, 2, 4
    row = kv_layout.Row.of(D, D, gs, bits, mx.float16)
    kv = mx.zeros((B, Hkv, 512, row.width), mx.uint32)
    chain = kv_layout.Chain()
    try:
        for n, M in ((300, 1), (301, 1), (305, 4), (306, 1)):
            q = mx.zeros((B, 16, M, D), mx.float16)
            quantized_sdpa_packed(q, kv_layout.Packed(kv, n, row, chain), scale=0.125, group_size=gs,
                                  bits=bits, impl="cuda")
            made, inputs, outs, init = launches[-1]
            assert init is None and made["output_names"] == ["out", "work", "next"] and chain.counters is outs[2]
            assert made["input_names"][-1] == "counters" and "const_cast<int*>(counters), next" in made["source"]
            assert outs[2].shape == (B * Hkv * cuda.CHAIN_SLOTS,) and outs[2].dtype == mx.int32
        assert mx.array_equal(launches[0][1][-1], mx.zeros((B * Hkv * cuda.CHAIN_SLOTS,), mx.int32)).item()
        assert all(later[1][-1] is earlier[2][2] for earlier, later in zip(launches, launches[1:]))
        for q, packed in ((mx.zeros((B, 16 * Hkv, 17, D), mx.float16), kv_layout.Packed(kv, 300, row, chain)),
                          (mx.zeros((B, 16, 1, D), mx.float16), kv_layout.Packed(kv, 300, row))):
            before = chain.counters
            quantized_sdpa_packed(q, packed, scale=0.125, group_size=gs, bits=bits, impl="cuda")
            made, inputs, outs, init = launches[-1]
            assert init == 0 and made["output_names"] == ["out", "work"] and len(outs) == 2 and chain.counters is before
    finally:
        clear_caches()

