"""Random-weight mlx-lm models, built offline from a config (no weights can be downloaded here).

`build(config)` builds any architecture mlx-lm ships from an mlx-lm style config dict; `tiny(name)`
gives small GQA configs of the architectures the tests cover; `save_tiny(path)` writes a model directory
that `mlx_lm.load(path)` (and `python -m mlxrewrite.mlx_lm generate --model path`) loads. head_dim is 64 everywhere so that the
default `kv_group_size=64` applies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

_COMMON = dict(hidden_size=128, num_hidden_layers=2, intermediate_size=256, num_attention_heads=4,
               num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-5, vocab_size=256, rope_theta=10000.0,
               max_position_embeddings=4096, tie_word_embeddings=False)

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(_COMMON, model_type="llama"),
    "mistral": dict(_COMMON, model_type="mistral"),
    "qwen2": dict(_COMMON, model_type="qwen2", hidden_size=256),  # head_dim is hidden / heads
    "qwen3": dict(_COMMON, model_type="qwen3"),
    "phi3": dict(_COMMON, model_type="phi3", hidden_size=256),  # phi3's head_dim is hidden / heads
    "gemma3": dict(_COMMON, model_type="gemma3_text", query_pre_attn_scalar=64, sliding_window=16,
                   sliding_window_pattern=2, rope_local_base_freq=10000.0),
    "qwen3_moe": dict(_COMMON, model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
                      mlp_only_layers=[], moe_intermediate_size=64, norm_topk_prob=True),
}


def build(config: dict[str, Any], dtype: mx.Dtype = mx.float32, seed: int = 0) -> nn.Module:
    """An mlx-lm model of `config`'s architecture with random weights (evaluated, in `dtype`)."""
    from mlx_lm.utils import _get_classes

    if "model_type" not in config:
        raise ValueError("an mlx-lm config needs a 'model_type' (e.g. 'llama')")
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


def tiny(name: str, dtype: mx.Dtype = mx.float32, seed: int = 0, **overrides: Any) -> nn.Module:
    """A two-layer GQA model of a covered architecture (`TINY_CONFIGS`)."""
    if name not in TINY_CONFIGS:
        raise ValueError(f"no tiny config for {name!r}; known: {sorted(TINY_CONFIGS)}")
    return build({**TINY_CONFIGS[name], **overrides}, dtype, seed)


def save(path: str | Path, config: dict[str, Any], tokenizer: Any, bits: int | None = None) -> Path:
    """Write a loadable mlx-lm model directory (`mlx_lm.load(path)` works offline): a random model of
    `config`, its weights quantized to `bits` (group 64) when given, and `tokenizer` (a transformers
    tokenizer, saved with `save_pretrained`)."""
    from mlx_lm.utils import quantize_model, save_config, save_model

    path = Path(path)
    model = build(config)
    if bits is not None:
        model, config = quantize_model(model, dict(config), group_size=64, bits=bits)
    save_model(path, model)
    save_config(dict(config), path / "config.json")
    tokenizer.save_pretrained(path)
    return path


def save_tiny(path: str | Path, name: str = "llama", **overrides: Any) -> Path:
    """`save` a tiny random model of `name` with a word-level tokenizer whose tokens are "w1".."w255"
    (id 0 is [UNK], "w255" is EOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    config = {**TINY_CONFIGS[name], **overrides}
    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, config["vocab_size"])}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    eos = f"w{config['vocab_size'] - 1}"
    return save(path, config, PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos, unk_token="[UNK]"))
