"""mlxrewrite.mlx_lm.wrap on tiny random-weight mlx-lm models (CPU, float32: CPU kernels are right, so the
wrapped model must give the unwrapped model's numbers while its rules fire)."""

import threading
import warnings

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.generate import generate_step, speculative_generate_step
from mlx_lm.models.cache import BatchKVCache, KVCache, QuantizedKVCache, RotatingKVCache, make_prompt_cache

import mlxrewrite.mlx_lm as mrl
from mlxrewrite.mlx_lm.tiny import TINY_CONFIGS, tiny

QMM = "quantized_matmul: quantized-matmul-broadcast-weights -> fold"
DROP = "scaled_dot_product_attention: sdpa-noop-mask -> drop_mask"
TOL = 1e-4


@pytest.fixture(autouse=True)
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a coverage or fallback warning fails the test
        yield


def tokens(n, batch=1, seed=1):
    mx.random.seed(seed)
    return mx.random.randint(0, 256, (batch, n))


def quantized_cache(model, bits=8):
    return [QuantizedKVCache(group_size=64, bits=bits) for _ in make_prompt_cache(model)]


def teacher_forced(model, toks, prompt, cache, chunk=None):
    """Logits of the last position of the prefill (in chunks of `chunk`), then of each forced decode step."""
    chunk = chunk or prompt
    for start in range(0, prompt, chunk):
        logits = model(toks[:, start:min(prompt, start + chunk)], cache=cache)
    outs = [logits[:, -1]]
    for t in range(prompt, toks.shape[1]):
        outs.append(model(toks[:, t:t + 1], cache=cache)[:, -1])
    return mx.stack(outs, axis=1)


def counts(model):
    return mrl.state(model).rewriter.calls


def assert_close(a, b, tol=TOL):
    assert a.shape == b.shape
    assert mx.max(mx.abs(a - b)).item() <= tol


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_quantized_kv_decode_matches_unwrapped(arch):
    model = tiny(arch)
    toks = tokens(28)
    expected = teacher_forced(model, toks, 20, quantized_cache(model))
    mrl.wrap(model)
    try:
        got = teacher_forced(model, toks, 20, quantized_cache(model))
        assert_close(got, expected)
        layers = len(make_prompt_cache(model))
        assert counts(model)[QMM] == 2 * layers * 9  # scores and values, every layer, prefill + 8 steps
        assert mrl.state(model).rewriter.traces == 4  # (prefill, decode) x (scores, values)
    finally:
        mrl.unwrap(model)


@pytest.mark.parametrize("bits", [4, 8])
def test_float_prefill_then_quantized_like_quantized_kv_start(bits):
    model = mrl.wrap(tiny("llama"))
    toks = tokens(30)
    mrl.unwrap(model)

    def run():
        cache = make_prompt_cache(model)
        model(toks[:, :16], cache=cache)  # float cache up to quantized_kv_start
        cache = [c.to_quantized(group_size=64, bits=bits) for c in cache]
        return teacher_forced(model, toks, 16, cache, chunk=16)[:, 1:]

    expected = run()
    mrl.wrap(model)
    assert_close(run(), expected)
    assert counts(model)[QMM] > 0


def test_generate_step_with_kv_bits_gives_the_same_tokens():
    model = tiny("qwen3")
    prompt = tokens(12)[0]

    def generated():
        steps = generate_step(prompt, model, max_tokens=12, kv_bits=8, kv_group_size=64, quantized_kv_start=0)
        return [int(t) for t, _ in steps]

    expected = generated()
    mrl.wrap(model)
    assert generated() == expected
    assert counts(model)[QMM] > 0


def test_speculative_decoding_verification_passes():
    model, draft = tiny("llama"), tiny("llama", seed=3, num_hidden_layers=1)
    prompt = tokens(10)[0]

    def generated(num_draft):
        steps = speculative_generate_step(prompt, model, draft, num_draft_tokens=num_draft, max_tokens=10,
                                          kv_bits=8, kv_group_size=64, quantized_kv_start=0)
        return [int(t) for t, _, _ in steps]

    expected = {n: generated(n) for n in (1, 3, 7)}
    mrl.wrap(model), mrl.wrap(draft)
    assert {n: generated(n) for n in (1, 3, 7)} == expected
    # verification passes of M = num_draft + 1 tokens went through the rule
    ms = {int(a.operands.split("x: float32[")[1].split(",")[3]) for a in mrl.state(model).rewriter.analyses()}
    assert {2, 4, 8} <= ms


@pytest.mark.parametrize("m", range(2, 9))
def test_small_m_verification_logits(m):
    model = tiny("mistral")
    toks = tokens(20 + m)

    def run():
        cache = quantized_cache(model)
        model(toks[:, :20], cache=cache)
        return model(toks[:, 20:], cache=cache)

    expected = run()
    mrl.wrap(model)
    assert_close(run(), expected)
    assert any(f"x: float32[1,2,2,{m},64]" in a.operands for a in mrl.state(model).rewriter.analyses())


def test_chunked_prefill():
    model = tiny("phi3")
    toks = tokens(40)
    expected = teacher_forced(model, toks, 33, quantized_cache(model), chunk=8)
    mrl.wrap(model)
    assert_close(teacher_forced(model, toks, 33, quantized_cache(model), chunk=8), expected)


def test_no_retrace_per_token_over_256_steps():
    model = mrl.wrap(tiny("llama", num_hidden_layers=1))
    toks = tokens(8 + 256)
    teacher_forced(model, toks, 8, quantized_cache(model))
    rewriter = mrl.state(model).rewriter
    assert rewriter.traces == 4
    assert counts(model)[QMM] == 2 * 257
    text = mrl.explain(model)
    assert "4 call trace(s), one per new set of facts the rules read" in text and "257 forward pass(es)" in text
    assert f"{QMM} x514" in text


def test_float_caches_no_rule_fires_and_nothing_is_traced():
    model = tiny("gemma3")
    toks = tokens(40)
    for make in (lambda: make_prompt_cache(model), lambda: [RotatingKVCache(max_size=24) for _ in range(2)],
                 lambda: [KVCache() for _ in range(2)]):
        mrl.unwrap(model)
        expected = teacher_forced(model, toks, 30, make())
        mrl.wrap(model)
        assert_close(teacher_forced(model, toks, 30, make()), expected, tol=0)  # bitwise: nothing rewritten
    assert not [what for what in counts(model) if "->" in what]  # no rewrite ran
    assert counts(model)["scaled_dot_product_attention: left as is"] > 0  # gemma3's window masks: analysed, kept


def batch_run(model, toks, padding, steps=4):
    cache = [BatchKVCache(left_padding=padding) for _ in make_prompt_cache(model)]
    prompt = toks.shape[1] - steps
    return teacher_forced(model, toks, prompt, cache)


@pytest.mark.parametrize("check", [True, False])
def test_batched_all_true_masks_dropped_only_when_checked(check):
    model = tiny("qwen3")
    toks = tokens(16, batch=4)
    expected = batch_run(model, toks, [0, 0, 0, 0])
    mrl.wrap(model, check_masks=check)
    got = batch_run(model, toks, [0, 0, 0, 0])
    assert (mx.argmax(got, -1) == mx.argmax(expected, -1)).all().item()
    assert_close(got, expected, tol=1e-4)
    dropped = counts(model).get(DROP, 0)
    if check:
        assert dropped == 2 * 4  # both layers, every decode step (the prefill is causal: its mask has False)
        checks = sum(n for what, n in counts(model).items() if what.startswith("value check"))
        assert checks == 5  # the cache's mask, once per forward pass (the cache made it: no in-place update)
        assert "was checked at run time" in mrl.explain(model) or "runtime" in mrl.explain(model)
    else:
        assert dropped == 0


def test_partly_padded_batch_keeps_its_mask():
    model = tiny("llama")
    toks = tokens(16, batch=3)
    padding = [0, 3, 5]
    expected = batch_run(model, toks, padding)
    mrl.wrap(model, check_masks=True)
    assert_close(batch_run(model, toks, padding), expected, tol=0)
    assert counts(model).get(DROP, 0) == 0
    assert counts(model)["scaled_dot_product_attention: left as is"] == 2 * 5


def test_wrap_is_idempotent_and_unwrap_restores():
    model = tiny("llama")
    cls = type(model)
    assert mrl.wrap(model) is model and mrl.wrap(model) is model
    assert isinstance(model, cls) and type(model) is not cls and type(model).__name__ == cls.__name__
    assert mrl.is_wrapped(model) and "lm_head" in dict(model.children())
    rewriter = mrl.state(model).rewriter
    mrl.wrap(model, check_masks=True)
    assert mrl.state(model).rewriter is rewriter  # the first wrap's options stay
    assert mrl.unwrap(model) is model and type(model) is cls and not mrl.is_wrapped(model)
    assert mrl.unwrap(model) is model
    with pytest.raises(ValueError, match="not wrapped"):
        mrl.explain(model)
    with pytest.raises(TypeError, match="expects an mlx.nn.Module"):
        mrl.wrap(lambda x: x)


def test_threads_share_decisions_not_state():
    model = tiny("llama")
    seqs = [tokens(20, seed=s) for s in range(4)]
    mx.eval(seqs)  # arrays cross threads only evaluated (MLX streams are per thread)
    expected = [teacher_forced(model, t, 14, quantized_cache(model)) for t in seqs]
    mrl.wrap(model)
    results = [None] * 4

    def work(i):
        results[i] = teacher_forced(model, seqs[i], 14, quantized_cache(model))
        mx.eval(results[i])  # MLX streams are per thread: evaluate where it was built

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected):
        assert_close(got, want)
    assert mrl.state(model).rewriter.traces == 4


class HandRolledAttention(nn.Module):
    """A model whose attention uses plain matmuls: nothing for mlxrewrite to intercept."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def __call__(self, x, cache=None):
        h = self.proj(x.astype(mx.float32)[..., None] * mx.ones((8,)))
        k, v = cache[0].update_and_fetch(h[:, None], h[:, None])
        scores = mx.softmax(h[:, None] @ k.swapaxes(-1, -2), axis=-1)
        return (scores @ v)[:, 0]


def test_uncovered_attention_is_reported():
    model = mrl.wrap(HandRolledAttention())
    with pytest.warns(mrl.CoverageWarning, match="1 of 1 attention layers made no call"):
        model(mx.ones((1, 3)), cache=[KVCache()])
    assert "not covered: 1 of 1 attention layers" in mrl.explain(model)


def test_coverage_is_checked_once_per_route():
    """Observing every call costs time on every token: coverage is checked on the first pass of each route
    (cache types, one token or several), and again when the route changes (the cache is quantized)."""
    model = mrl.wrap(tiny("llama"))
    cache = make_prompt_cache(model)
    prompt = mx.array([[1, 2, 3, 4, 5]])
    model(prompt, cache=cache)
    for token in range(6):
        model(mx.array([[token + 1]]), cache=cache)
    assert mrl.state(model).routes_checked == {(tuple(map(type, cache)), False), (tuple(map(type, cache)), True)}
    cache = [c.to_quantized(group_size=64, bits=8) for c in cache]
    model(mx.array([[7]]), cache=cache)
    assert len(mrl.state(model).routes_checked) == 3
    assert "8 forward pass(es); coverage checked on 3 route(s)" in mrl.explain(model)
    assert mrl.state(model).coverage == []


def test_only_the_models_own_code_is_intercepted():
    """MLX is not patched while a wrapped model runs: a 4-bit model's linear layers (mlx.nn) call MLX
    directly; mlx-lm's attention (models/base.py) goes through the dispatchers. Unwrap restores it."""
    import mlx.core
    import mlx_lm.models.base as base
    import mlx_lm.models.llama as llama

    from mlxrewrite import CallPattern, Decline, Rule, intercept

    seen = []

    def guard(facts):
        seen.append(facts.ndim("w"))
        return Decline("spy", "test")

    spy = Rule("spy", "warning", "test", CallPattern("quantized_matmul"), guard, {"none": lambda c, d: c.run_original()})
    model = tiny("llama")
    nn.quantize(model, group_size=64, bits=4)
    other = tiny("llama", seed=2)
    mrl.wrap(model, rules=[spy], disable="quantized-matmul-broadcast-weights")
    mrl.wrap(other)
    assert base.mx is llama.mx is intercept.instrumented_mlx()
    cache = quantized_cache(model)
    model(tokens(5), cache=cache)
    assert mlx.core.quantized_matmul is intercept.original("quantized_matmul")
    assert seen == [5]  # one analysis serves scores and values of every layer (ndim is all it reads); no linear layer
    mrl.unwrap(model)
    assert base.mx is intercept.instrumented_mlx()  # `other` still uses it
    mrl.unwrap(other)
    assert base.mx is llama.mx is mlx.core


def test_a_wrapped_model_that_is_dropped_releases_its_modules():
    import gc

    import mlx.core
    import mlx_lm.models.base as base

    model = mrl.wrap(tiny("llama"))
    assert base.mx is not mlx.core
    del model
    gc.collect()
    assert base.mx is mlx.core


def _states(cache):
    return [a for c in cache for part in (c.keys, c.values) for a in part] + [mx.array([c.offset for c in cache])]


def test_lean_cache_update_is_bitwise_mlx_lms_across_a_buffer_growth(monkeypatch):
    """The wrapper's cache update gives mlx-lm's logits and cache state bitwise, through the 256-step growth."""
    from mlxrewrite.mlx_lm import cache_update

    lean_calls = []
    real = cache_update.update_and_fetch
    monkeypatch.setattr(cache_update, "update_and_fetch", lambda *a: lean_calls.append(1) or real(*a))
    model = tiny("llama")
    toks = tokens(270)
    results = []
    for lean in (False, True):
        mrl.wrap(model, lean_cache=lean)
        try:
            cache = quantized_cache(model)
            results.append((teacher_forced(model, toks, 250, cache), _states(cache)))
        finally:
            mrl.unwrap(model)
    (plain, plain_state), (lean, lean_state) = results
    assert mx.array_equal(plain, lean).item()
    assert len(plain_state) == len(lean_state) and all(
        a.shape == b.shape and mx.array_equal(a, b).item() for a, b in zip(plain_state, lean_state))
    assert "update_and_fetch" not in vars(cache[0])  # hooked for the passes only
    assert len(lean_calls) == len(cache) * 21  # every layer of every pass after the prefill


def test_lean_cache_update_keeps_mlx_lms_own_method_for_another_mlx_lm(monkeypatch):
    from mlxrewrite.mlx_lm import cache_update

    calls = []
    monkeypatch.setattr(cache_update, "VERIFIED", set())
    monkeypatch.setattr(cache_update, "update_and_fetch", lambda *a: calls.append(a))
    cache_update.unavailable.cache_clear()
    model = mrl.wrap(tiny("llama"))
    try:
        teacher_forced(model, tokens(12), 10, quantized_cache(model))
        assert not calls
        assert "lean cache update not used: mlx-lm's QuantizedKVCache.update_and_fetch is not the one" in \
            mrl.explain(model)
    finally:
        mrl.unwrap(model)
        cache_update.unavailable.cache_clear()


# ---- the packed cache -------------------------------------------------------------------------------------
def _decode_packed(packed, toks, prompt=250, cache=None):
    model = mrl.wrap(tiny("llama"), packed_cache=packed)
    try:
        cache = cache or quantized_cache(model)
        return teacher_forced(model, toks, prompt, cache), cache, mrl.explain(model)
    finally:
        mrl.unwrap(model)


def test_packed_cache_is_bitwise_mlx_lms_across_a_buffer_growth():
    """One buffer instead of six changes no number: logits and every state array are mlx-lm's, through the
    256-step growth; the cache objects stay the ones passed (turned in place) and read as mlx-lm's. `nbytes`
    is the buffer's: mlx-lm's count where rows need no padding, more where they do."""
    from mlxrewrite.mlx_lm import packed_cache

    toks = tokens(270)
    (plain, plain_cache, _), (packed, packed_cache_list, explained) = _decode_packed(False, toks), \
        _decode_packed(True, toks)
    assert mx.array_equal(plain, packed).item()
    assert "quantized caches packed: 2 (mlxrewrite.mlx_lm.packed_cache; rows through mx.quantize)" in explained
    assert all(packed_cache.is_packed(c) and isinstance(c, QuantizedKVCache) for c in packed_cache_list)
    assert not any(packed_cache.is_packed(c) for c in plain_cache)
    a, b = _states(plain_cache), _states(packed_cache_list)
    assert len(a) == len(b) and all(x.shape == y.shape and mx.array_equal(x, y).item() for x, y in zip(a, b))
    assert [c.nbytes for c in packed_cache_list] == [c._kv.nbytes for c in packed_cache_list]
    row = packed_cache_list[0]._row
    assert [c.nbytes * (row.words + row.scale_words) for c in plain_cache] == \
        [c.nbytes * row.width for c in packed_cache_list]


@pytest.mark.skipif(mx.cuda.is_available(), reason="on CUDA the default packs")
def test_packed_cache_is_not_used_off_cuda_by_default():
    model = mrl.wrap(tiny("llama"))
    try:
        cache = quantized_cache(model)
        teacher_forced(model, tokens(12), 10, cache)
        assert all(type(c) is QuantizedKVCache for c in cache)
        assert "packed" not in mrl.explain(model)
    finally:
        mrl.unwrap(model)
    with pytest.raises(TypeError, match="packed_cache must be None, True or False, not 'yes'"):
        mrl.wrap(model, packed_cache="yes")


def test_packed_cache_saves_and_loads_as_mlx_lms(tmp_path):
    from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

    _, cache, _ = _decode_packed(True, tokens(40), prompt=30)
    save_prompt_cache(str(tmp_path / "cache.safetensors"), cache)
    loaded = load_prompt_cache(str(tmp_path / "cache.safetensors"))
    assert all(type(c) is QuantizedKVCache for c in loaded)
    a, b = _states(cache), _states(loaded)
    assert all(x.shape == y.shape and mx.array_equal(x, y).item() for x, y in zip(a, b))


def test_packed_cache_trims_copies_and_takes_a_state_as_mlx_lms():
    """A speculative rejection (trim), a deep copy and an assigned state go on decoding as mlx-lm's cache."""
    import copy

    from mlx_lm.models.cache import QuantizedKVCache as MlxLm

    from mlxrewrite.mlx_lm import packed_cache

    mx.random.seed(3)
    rows = [(mx.random.normal((1, 2, n, 64)), mx.random.normal((1, 2, n, 64))) for n in (7, 1, 3, 1, 1)]
    plain, packed = MlxLm(group_size=32, bits=4), packed_cache.pack(MlxLm(group_size=32, bits=4))
    assert packed.empty() and packed.keys is None

    def same(x, y):  # a fetch may be lazy (packed_cache.Fetched): read as the tuple it stands for
        return all(p.shape == q.shape and mx.array_equal(p, q).item()
                   for p, q in zip((*x[0], *x[1]), (*y[0], *y[1])))

    for i, (k, v) in enumerate(rows):
        assert same(plain.update_and_fetch(k, v), packed.update_and_fetch(k, v)), i
        if i == 2:
            assert plain.trim(2) == packed.trim(2) == 2
    twin = copy.deepcopy(packed)
    taken = packed_cache.pack(MlxLm(group_size=32, bits=4))
    taken.state = plain.state
    k, v = rows[0]
    want = plain.update_and_fetch(k, v)
    assert same(want, twin.update_and_fetch(k, v)) and same(want, taken.update_and_fetch(k, v))
    assert packed.offset == 11 and twin.offset == taken.offset == 18
    half, half_plain = packed_cache.pack(MlxLm(group_size=32, bits=4)), MlxLm(group_size=32, bits=4)
    half.state = half_plain.state = plain.state  # float32 scales, then float16 rows: both keep float32 scales
    k16, v16 = (a.astype(mx.float16) for a in rows[1])
    assert same(half_plain.update_and_fetch(k16, v16), half.update_and_fetch(k16, v16))
    assert {a.dtype for a in (*half.keys[1:], *half.values[1:])} == {mx.float32}
    with pytest.raises(TypeError, match="pack expects mlx-lm's QuantizedKVCache, got KVCache"):
        packed_cache.pack(KVCache())
    odd = MlxLm(group_size=32, bits=4)
    odd.update_and_fetch(*rows[0])
    odd.values = (odd.values[0], odd.values[1].astype(mx.float16), odd.values[2])
    with pytest.raises(ValueError, match="with one scales dtype and words for its groups; got keys"):
        packed_cache.pack(odd)
    assert type(odd) is MlxLm  # left as it was
    narrow = packed_cache.pack(MlxLm(group_size=32, bits=4))
    state_k, state_v, *rest = plain.state
    narrow.state = (state_k, (state_v[0][..., :4], *state_v[1:]), *rest)  # V's words of a smaller head
    with pytest.raises(ValueError, match=r"\(4 bits, group size 32\) takes"):
        narrow.update_and_fetch(*rows[1])


def _in_place_on_cpu(monkeypatch, written: list) -> None:
    """kv_pack's in-place kernel as the CPU can show it: the rows written into the buffer's memory (every array
    sharing it sees them, as on the GPU), the row count returned; `written` gets each write's first row."""
    import numpy as np

    from mlxrewrite.backends.kernels import kv_pack
    from mlxrewrite.core import regions
    from mlxrewrite.mlx_lm import packed_cache

    def writer(keys, values, group_size, bits, row):
        def write(keys, values, kv, at):
            mx.eval(kv)
            start, n = at.item(), keys.shape[2]
            np.asarray(memoryview(kv))[:, :, start:start + n] = kv_pack.reference(keys, values, group_size, bits, row)
            written.append(start)
            return mx.array(start + n, dtype=mx.int32)

        return write

    monkeypatch.setattr(kv_pack, "in_place_writer", writer)
    monkeypatch.setattr(regions, "installed", lambda path: path == packed_cache.ATTENTION)


def test_a_packed_cache_writes_rows_in_place_only_where_no_array_shows_them(monkeypatch):
    """On CUDA a token's rows go straight into the buffer (one kernel, no slice update), which MLX does not
    see: so only rows that no array shows are written so, and every array the cache handed out keeps its
    numbers. After a state read (views of the whole buffer), a trim below what a fetch showed, a fetch read
    as views, or a copy (which shares the buffer), the next update writes by ops (a buffer of its own where
    shared), and the one after goes back in place. Throughout, the rows are mlx-lm's."""
    import copy

    import numpy as np
    from mlx_lm.models.cache import QuantizedKVCache as MlxLm

    from mlxrewrite.mlx_lm import packed_cache

    written: list = []
    _in_place_on_cpu(monkeypatch, written)
    mx.random.seed(6)
    plain, packed = MlxLm(group_size=32, bits=4), packed_cache.pack(MlxLm(group_size=32, bits=4))
    plain.step = packed.step = 16  # a growth on the way

    def step(caches, n=1):
        k, v = mx.random.normal((1, 2, n, 64)), mx.random.normal((1, 2, n, 64))
        return [c.update_and_fetch(k, v) for c in caches]

    def rows_agree(plain, packed):
        want = plain.keys_and_values()
        got = packed_cache.kv_layout.Packed(packed._kv, packed.offset, packed._row).parts()
        return all(mx.array_equal(a, b).item() for a, b in zip((*want[0], *want[1]), (*got[0], *got[1])))

    step([plain, packed], 7)
    step([plain, packed])
    step([plain, packed])
    assert written == [0, 7, 8] and rows_agree(plain, packed)
    held = packed.state  # views of the whole buffer
    snapshot = [np.array(a) for a in (*held[0], *held[1])]
    step([plain, packed])
    step([plain, packed])  # a new buffer: in place again
    assert written == [0, 7, 8, 10]
    fetched = step([plain, packed], 6)[1]  # through a growth (to 11 + 16 rows)
    assert written[-1] == 11 and packed._kv.shape[2] == 27
    plain.trim(3), packed.trim(3)
    step([plain, packed])  # below what the fetch showed: by ops
    step([plain, packed])
    assert written[-1] == 15 and rows_agree(plain, packed)
    kept = [np.array(a) for a in (*fetched[0], *fetched[1])]  # a fetch read as views ...
    step([plain, packed])  # ... so this update writes by ops
    assert written[-1] == 15
    twin, plain_twin = copy.deepcopy(packed), copy.deepcopy(plain)
    step([plain, packed])
    step([plain_twin, twin])
    step([plain, packed]), step([plain_twin, twin])
    assert written[-2:] == [18, 18] and rows_agree(plain, packed) and rows_agree(plain_twin, twin)
    assert all(np.array_equal(np.array(a), b) for a, b in zip((*held[0], *held[1]), snapshot))
    assert all(np.array_equal(np.array(a), b) for a, b in zip((*fetched[0], *fetched[1]), kept))


def test_a_cache_that_cannot_be_packed_keeps_mlx_lms_layout_and_is_reported(monkeypatch):
    from mlxrewrite.mlx_lm import packed_cache

    def refuse(cache):
        raise ValueError("a packed QuantizedKVCache takes ... (test)")

    monkeypatch.setattr(packed_cache, "pack", refuse)
    model = mrl.wrap(tiny("llama"), packed_cache=True)
    try:
        cache = quantized_cache(model)
        plain = teacher_forced(model, tokens(12), 10, cache)
        assert all(type(c) is QuantizedKVCache for c in cache)
        assert mrl.explain(model).count("quantized cache not packed: a packed QuantizedKVCache takes ... (test)") == 1
    finally:
        mrl.unwrap(model)
    assert mx.array_equal(plain, _decode_packed(False, tokens(12), prompt=10)[0]).item()


def test_packed_views_give_the_fused_algorithm_mlx_lms_numbers(monkeypatch):
    """The fused kernel reads the packed cache's views through their strides, or (quantized_sdpa_packed)
    the buffer itself, rows [:n] of a longer buffer; its algorithm (the CPU reference) gives the same
    output either way as from mlx-lm's six buffers. While mlx-lm's attention goes through a dispatcher, a
    fetch is lazy (`Fetched`: no view made until read); else it is mlx-lm's tuples."""
    from mlx_lm.models.cache import QuantizedKVCache as MlxLm

    from mlxrewrite.backends.kernels import quantized_sdpa, quantized_sdpa_packed
    from mlxrewrite.core import regions
    from mlxrewrite.mlx_lm import packed_cache

    monkeypatch.setattr(regions, "installed", lambda path: path == packed_cache.ATTENTION)
    mx.random.seed(4)
    k, v = mx.random.normal((1, 2, 300, 64)), mx.random.normal((1, 2, 300, 64))
    plain, packed = MlxLm(), packed_cache.pack(MlxLm())
    (pk, pv), (qk, qv) = plain.update_and_fetch(k, v), packed.update_and_fetch(k, v)
    assert type(qk) is packed_cache.Fetched and qk.packed is qv.packed and qk.packed.kv.shape[2] == 512
    assert len(qk) == 3 and [a.shape for a in (*qk, *qv)] == [a.shape for a in (*pk, *pv)]
    q = mx.random.normal((1, 4, 3, 64))
    common = dict(scale=0.125, group_size=64, bits=8, mask="causal", impl="reference")
    outs = [quantized_sdpa(q, kk, vv, **common) for kk, vv in ((pk, pv), (qk, qv))]
    outs.append(quantized_sdpa_packed(q, qk.packed, **common))
    assert all(mx.array_equal(outs[0], out).item() for out in outs[1:])
    monkeypatch.setattr(regions, "installed", lambda path: False)
    fetched = packed.update_and_fetch(k[:, :, :1], v[:, :, :1])
    assert all(type(half) is tuple for half in fetched)
    with pytest.raises(ValueError, match="600 rows asked of a buffer of 512"):
        quantized_sdpa_packed(q, qk.packed._replace(n=600), **common)
    with pytest.raises(ValueError, match="is not K and V of one shape with mlx.core.float32 scales"):
        quantized_sdpa_packed(q, qk.packed._replace(row=qk.packed.row._replace(v_groups=2)), **common)
    with pytest.raises(ValueError, match="is not K and V of one shape with mlx.core.float16 scales"):
        quantized_sdpa_packed(q.astype(mx.float16), qk.packed, **common)
    with pytest.raises(ValueError, match="is not K and V of one shape"):  # the cache's groups are of 64
        quantized_sdpa_packed(q, qk.packed, **{**common, "group_size": 32})


def test_a_packed_caches_fetches_share_one_kernel_chain_and_a_copy_gets_its_own(monkeypatch):
    """The fused kernel's launches over one cache are chained through their merge counters (no zero-fill),
    which it writes in place: every fetch of the cache carries the cache's one chain; a repack (state
    assigned, the buffers' shape may change) and a copy (deepcopy, pickle, copy: launches over the two could
    run at once) start a new one."""
    import copy
    import pickle

    from mlx_lm.models.cache import QuantizedKVCache as MlxLm

    from mlxrewrite.core import regions
    from mlxrewrite.mlx_lm import packed_cache

    monkeypatch.setattr(regions, "installed", lambda path: path == packed_cache.ATTENTION)
    k = mx.random.normal((1, 2, 5, 64))
    cache = packed_cache.pack(MlxLm())
    first, second = cache.update_and_fetch(k, k)[0], cache.update_and_fetch(k[:, :, :1], k[:, :, :1])[1]
    chain = first.packed.chain
    assert chain is second.packed.chain and chain.counters is None
    chain.counters = mx.zeros((32,), dtype=mx.int32)  # what a launch leaves there
    for twin in (copy.deepcopy(cache), pickle.loads(pickle.dumps(cache)), copy.copy(cache)):
        assert twin._chain is not chain and twin._chain.counters is None
    assert cache._chain is chain
    cache.state = cache.state
    third = cache.update_and_fetch(k[:, :, :1], k[:, :, :1])[0]
    assert third.packed.chain is not chain and third.packed.chain.counters is None


@pytest.mark.parametrize("dtype,D,bits,gs,width", [(mx.float16, 128, 8, 64, 68), (mx.float16, 64, 4, 64, 20),
                                                    (mx.bfloat16, 96, 4, 32, 32), (mx.float32, 128, 4, 128, 36)])
def test_a_packed_row_holds_mlx_lms_parts_on_16_bytes(dtype, D, bits, gs, width):
    """A packed row is K's words, V's, then the four scales and biases as the cache's dtype, zero-padded to
    whole 16 bytes (the kernel's loads): `split` gives mlx-lm's parts back bitwise, as views of any rows."""
    from mlxrewrite.backends.kernels import kv_layout

    row = kv_layout.Row.of(D, D, gs, bits, dtype)
    k, v = (mx.quantize(mx.random.normal((2, 3, 7, D)).astype(dtype), gs, bits) for _ in range(2))
    rows = row.join(k, v)
    assert row.width == width and rows.shape == (2, 3, 7, width) and rows.dtype == mx.uint32 and width % 4 == 0
    assert mx.array_equal(rows[..., row.words + row.scale_words:], mx.zeros_like(rows[..., :width - row.words -
                                                                                       row.scale_words])).item()
    for got, want in zip((*kv_layout.Packed(rows, 5, row).parts()[0], *kv_layout.Packed(rows, 5, row).parts()[1]),
                         (*k, *v)):
        assert got.dtype == want.dtype and mx.array_equal(got, want[:, :, :5]).item()
    wide = row.join(k, (v[0], v[1].astype(mx.float32), v[2].astype(mx.float32)))  # another dtype: cast to the row's
    assert mx.array_equal(wide, rows).item()


def test_kv_pack_kernel_writes_whole_rows_and_serves_only_its_dtypes_row(monkeypatch):
    """The row kernel's launch (checked without a GPU: the kernel object is recorded, not built) writes one
    output of the row's width, padding included, a warp per group; a cache row of another dtype (a state
    assigned with float32 scales, float16 rows added) is packed by `reference`, which casts the scales."""
    import importlib

    from mlxrewrite.backends.kernels import kv_layout, kv_pack

    cuda = importlib.import_module("mlxrewrite.backends.kernels.kv_pack_cuda")
    monkeypatch.setattr(mx.fast, "cuda_kernel", lambda **kernel: kernel)
    cuda._kernel.cache_clear()
    try:
        kernel, launch = cuda.plan(2, 3, 5, 64, 64, mx.float16, 64, 4)
        assert launch["output_shapes"] == [(2, 3, 5, 20)] and launch["output_dtypes"] == [mx.uint32]
        assert launch["grid"] == (-(-2 * 3 * 5 * 2 * 32 // cuda.THREADS) * cuda.THREADS, 1, 1)
        assert kernel["output_names"] == ["rows"] and "WIDTH = 20, PAD = 2;" in kernel["source"]
    finally:
        cuda._kernel.cache_clear()
    launched = []
    monkeypatch.setattr(kv_pack, "on_cuda", lambda: True)
    monkeypatch.setattr(kv_pack, "_launcher", lambda *key: lambda k, v: launched.append(key) or "kernel rows")
    keys = mx.random.normal((1, 2, 1, 64)).astype(mx.float16)
    assert kv_pack.kv_pack(keys, keys, 64, 4, kv_layout.Row.of(64, 64, 64, 4, mx.float16)) == "kernel rows"
    row32 = kv_layout.Row.of(64, 64, 64, 4, mx.float32)
    wide = kv_pack.kv_pack(keys, keys, 64, 4, row32)
    assert len(launched) == 1 and wide.shape == (1, 2, 1, 20)  # 16 words, 4 float32 scales
    q16 = mx.quantize(keys, 64, 4)
    assert mx.array_equal(row32.split(wide)[0][1], q16[1].astype(mx.float32)).item()  # float16's scales, widened
    assert mx.array_equal(wide, row32.join(q16, q16)).item()


def test_kv_pack_rows_are_mx_quantizes_and_its_kernel_waits_for_verification():
    from mlxrewrite.backends.kernels import kv_pack

    mx.random.seed(5)
    keys, values = mx.random.normal((2, 3, 4, 64)), mx.random.normal((2, 4, 3, 128)).swapaxes(1, 2)
    rows = kv_pack.kv_pack(keys, values, group_size=32, bits=8)
    kq, vq = mx.quantize(keys, 32, 8), mx.quantize(values, 32, 8)
    assert rows.shape == (2, 3, 4, 16 + 32 + 2 * (2 + 4)) and rows.dtype == mx.uint32  # float32 scales: a word each
    assert mx.array_equal(rows[..., :48], mx.concatenate([kq[0], vq[0]], -1)).item()
    assert mx.array_equal(rows[..., 48:].view(mx.float32), mx.concatenate([kq[1], kq[2], vq[1], vq[2]], -1)).item()
    if not mx.cuda.is_available():  # off CUDA the kernel cannot pass its battery, and says why
        assert not kv_pack.verified(mx.float16, 8, 64, 128, 128)
        assert "CUDA" in kv_pack.NOT_VERIFIED[mx.float16, 8, 64, 128, 128]
    assert not kv_pack.verified(mx.float16, 3, 64, 128, 128)
    assert kv_pack.NOT_VERIFIED[mx.float16, 3, 64, 128, 128] == "outside what the kernel covers"
