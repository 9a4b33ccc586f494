"""A wrapped mlx-lm model behaves like a model: it deep-copies and pickles (wrapped again), composes with
speculative decoding, leaves unwrapped models of its architecture alone, checks only the masks its cache
builds, and reports the architectures whose attention it does not cover."""

import copy
import pickle
import warnings
from unittest import mock

import mlx.core as mx
import pytest
from mlx_lm.generate import speculative_generate_step
from mlx_lm.models.cache import BatchKVCache, QuantizedKVCache, make_prompt_cache

import mlxrewrite.mlx_lm as mrl
from mlxrewrite.mlx_lm.tiny import _COMMON, build, tiny

QMM = "quantized_matmul: quantized-matmul-broadcast-weights -> fold"
DEEPSEEK_V3 = dict(_COMMON, model_type="deepseek_v3", kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=16,
                   qk_nope_head_dim=32, v_head_dim=32, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                   moe_intermediate_size=64, first_k_dense_replace=1, moe_layer_freq=1, n_group=1, topk_group=1,
                   routed_scaling_factor=1.0, norm_topk_prob=True, topk_method="noaux_tc", scoring_func="sigmoid")
GEMMA2 = dict(_COMMON, model_type="gemma2", query_pre_attn_scalar=64, attn_logit_softcapping=50.0,
              final_logit_softcapping=30.0)
PHI3SMALL = dict(model_type="phi3small", hidden_size=256, dense_attention_every_n_layers=2, ff_intermediate_size=256,
                 gegelu_limit=20.0, num_hidden_layers=2, num_attention_heads=4, layer_norm_epsilon=1e-5,
                 vocab_size=256, num_key_value_heads=2, blocksparse_block_size=64, blocksparse_num_local_blocks=2,
                 blocksparse_vert_stride=2)
PROMPT = mx.array([[3, 1, 4, 1, 5, 9, 2, 6]])


def quantized_decode(model, steps=3):
    """Logits of a prompt and `steps` decode tokens on an 8-bit cache (the path the rules rewrite)."""
    cache = [QuantizedKVCache(group_size=64, bits=8) for _ in make_prompt_cache(model)]
    outs = [model(PROMPT, cache=cache)[:, -1]]
    for t in range(steps):
        outs.append(model(mx.array([[t + 7]]), cache=cache)[:, -1])
    return mx.stack(outs, axis=1)


def max_diff(a, b):
    return mx.max(mx.abs(a - b)).item()


@pytest.mark.parametrize("duplicate", [copy.deepcopy, copy.copy, lambda m: pickle.loads(pickle.dumps(m))],
                         ids=["deepcopy", "copy", "pickle"])
def test_a_copy_of_a_wrapped_model_is_wrapped_with_the_same_options(duplicate):
    model = tiny("llama")
    expected = quantized_decode(model)
    mrl.wrap(model, disable=("sdpa-noop-mask",), check_masks=True)
    quantized_decode(model)
    twin = duplicate(model)
    assert type(twin) is type(model) and mrl.is_wrapped(twin) and twin is not model
    assert mrl.state(twin).options == mrl.state(model).options
    assert mrl.state(twin).rewriter is not mrl.state(model).rewriter and mrl.state(twin).forward_passes == 0
    assert max_diff(quantized_decode(twin), expected) <= 1e-4
    assert mrl.state(twin).rewriter.calls[QMM] == 2 * 2 * 4  # its own rewriter: 2 layers x 2 calls x 4 passes
    assert "sdpa-noop-mask" not in [r.name for r in mrl.state(twin).rewriter.rules]  # the copy keeps `disable`
    mrl.unwrap(twin)
    assert max_diff(quantized_decode(twin), expected) <= 1e-4 and mrl.is_wrapped(model)


def test_a_deep_copy_owns_its_weights():
    model = mrl.wrap(tiny("llama"))
    twin = copy.deepcopy(model)
    twin.lm_head.weight = mx.zeros_like(twin.lm_head.weight)
    assert mx.abs(model.lm_head.weight).sum().item() > 0


@pytest.mark.parametrize("wrap_draft", [True, False], ids=["draft wrapped", "draft unwrapped"])
def test_speculative_decoding_with_a_wrapped_model(wrap_draft):
    model = tiny("llama")
    draft = copy.deepcopy(model)  # a draft of the same weights: every draft token is accepted
    prompt = PROMPT[0]

    def generated():
        steps = speculative_generate_step(prompt, model, draft, num_draft_tokens=3, max_tokens=8, kv_bits=8,
                                          kv_group_size=64, quantized_kv_start=0)
        return [(int(t), bool(from_draft)) for t, _, from_draft in steps]

    expected = generated()
    mrl.wrap(model)
    if wrap_draft:
        mrl.wrap(draft)
    assert generated() == expected and sum(d for _, d in expected) > 0
    assert mrl.state(model).rewriter.calls[QMM] > 0
    assert mrl.is_wrapped(draft) == wrap_draft and (not wrap_draft or mrl.state(draft).rewriter.calls[QMM] > 0)


def test_unwrapped_models_see_patches_of_mlx_made_after_a_wrap():
    """While a llama is wrapped, llama's module sees a view of `mx`; an unwrapped llama must still call
    what `mx.fast.scaled_dot_product_attention` is now (here a mock), as often as without any wrap."""
    wrapped, plain = tiny("llama"), tiny("llama", seed=1)
    mrl.wrap(wrapped)
    real = mx.fast.scaled_dot_product_attention
    with mock.patch("mlx.core.fast.scaled_dot_product_attention", side_effect=real) as spy:
        plain(PROMPT, cache=make_prompt_cache(plain))
        assert spy.call_count == 2  # one per layer
        wrapped(PROMPT, cache=make_prompt_cache(wrapped))  # "causal" mask: no rule can fire, passed through
        assert spy.call_count == 4
    assert mx.fast.scaled_dot_product_attention is real


def batched_decode(model, steps=2):
    cache = [BatchKVCache([0, 0]) for _ in make_prompt_cache(model)]
    model(mx.concatenate([PROMPT, PROMPT]), cache=cache)
    return [model(mx.array([[t], [t + 1]]), cache=cache) for t in range(steps)]


def value_checks(model):
    return sum(n for what, n in mrl.state(model).rewriter.calls.items() if what.startswith("value check"))


def test_check_masks_checks_the_cache_mask_once_per_pass():
    model = tiny("llama")
    expected = batched_decode(model)
    mrl.wrap(model, check_masks=True)
    for got, want in zip(batched_decode(model), expected):
        assert max_diff(got, want) <= 1e-4
    assert value_checks(model) == 3  # prefill + 2 decode passes, shared by both layers
    assert mrl.state(model).rewriter.calls["scaled_dot_product_attention: sdpa-noop-mask -> drop_mask"] == 2 * 2


def test_check_masks_never_evaluates_an_activation_dependent_mask():
    """deepseek_v3's MLA passes its position scores as the SDPA "mask" (an additive array computed from the
    activations): that is no cache mask, so it is never evaluated, in single or batched decoding."""
    model = build(DEEPSEEK_V3)
    single = [model(PROMPT, cache=(c := make_prompt_cache(model))), model(mx.array([[7]]), cache=c)]
    batched = batched_decode(model)
    mrl.wrap(model, check_masks=True)
    with mock.patch("mlxrewrite.core.eager.summarize_array", side_effect=AssertionError("a mask was evaluated")):
        got = [model(PROMPT, cache=(c := make_prompt_cache(model))), model(mx.array([[7]]), cache=c)]
        for g, want in zip(got, single):
            assert max_diff(g, want) <= 1e-4
    for g, want in zip(batched_decode(model), batched):  # the cache's bool mask feeds mx.where, not SDPA
        assert max_diff(g, want) <= 1e-4
    assert value_checks(model) == 0


def test_cache_mask_hooks_are_removed_after_each_pass():
    model = mrl.wrap(tiny("llama"), check_masks=True)
    cache = [BatchKVCache([0, 1]) for _ in make_prompt_cache(model)]
    with pytest.raises(ValueError):
        model(mx.ones((3, 2), mx.int32), cache=cache)  # a batch of 3 for a cache of 2 fails inside the pass
    assert all("make_mask" not in vars(c) for c in cache)


@pytest.mark.parametrize("config, uncovered, why", [(GEMMA2, "2 of 2", "gemma2 computes attention by hand"),
                                                    (PHI3SMALL, "1 of 2", "block-sparse layers")],
                         ids=["gemma2", "phi3small"])
def test_architectures_decided_not_covered_are_reported_with_the_reason(config, uncovered, why):
    model = mrl.wrap(build(config))
    with pytest.warns(mrl.CoverageWarning, match=f"{uncovered} attention layers made no call.*{why}"):
        model(PROMPT, cache=make_prompt_cache(model))
    assert f"not covered: {uncovered} attention layers" in mrl.explain(model) and why in mrl.explain(model)


def test_gemma2_with_kv_bits_fails_in_mlx_lm_itself():
    """What NOT_COVERED says of gemma2: as shipped, mlx-lm cannot run it on a quantized cache."""
    model = build(GEMMA2)
    with warnings.catch_warnings(), pytest.raises(TypeError):
        quantized_decode(model, steps=0)
