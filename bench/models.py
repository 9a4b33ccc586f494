"""Random-weight mlx-lm Llama models of a chosen size (no downloads), for the overhead and mlx-lm cases."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def llama(hidden: int, layers: int, heads: int, kv_heads: int, vocab: int, dtype: mx.Dtype,
          head_dim: int | None = None) -> nn.Module:
    """mlx-lm's Llama with GQA (heads / kv_heads), MLP 4x hidden, weights evaluated in `dtype`; head_dim
    hidden / heads unless given."""
    from mlx_lm.models import llama as mlx_lm_llama  # optional dependency: only these cases need it

    args = mlx_lm_llama.ModelArgs(model_type="llama", hidden_size=hidden, num_hidden_layers=layers,
                                  intermediate_size=4 * hidden, num_attention_heads=heads,
                                  num_key_value_heads=kv_heads, rms_norm_eps=1e-5, vocab_size=vocab,
                                  head_dim=head_dim)
    mx.random.seed(0)
    model = mlx_lm_llama.Model(args)
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model
