"""Audit an mlx-lm architecture from its config.json, without its weights.

The model is built with random weights, tiny by default (2 layers, small hidden size) or at full size,
and each step of generation that reaches a different kernel path is audited: prefill, decode (M=1),
speculative verification (M = draft tokens + 1) and a batched decode (mlx-lm's BatchKVCache, whose mask
is an array). The hazards depend on the attention geometry (query heads per KV head, head_dim vs the
quantization group) and on the cache type, not on the model's width, so the tiny model keeps those.

Each step is traced as one function that makes the caches and runs the earlier steps (the prompt) before
its own tokens, so the cache is internal state of the trace; only the calls that depend on the step's own
tokens are reported (`Case.replayed`).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn

from .audit import Case

TINY_LAYERS = 2
TINY_VOCAB = 512
TINY_KV_HEADS = 2
TINY_EXPERTS, TINY_EXPERTS_PER_TOKEN = 4, 2
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
INTERMEDIATE_KEYS = ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size")
EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
EXPERTS_PER_TOKEN_KEYS = ("num_experts_per_tok",)
SIZE_KEYS = ("num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size", "vocab_size", *LAYER_KEYS,
             *INTERMEDIATE_KEYS, *EXPERT_KEYS, *EXPERTS_PER_TOKEN_KEYS)  # shrink_config does arithmetic on these


FIX_NOTE = ("in mlx-lm, `mlxrewrite.mlx_lm.wrap(model)` (or `python -m mlxrewrite.mlx_lm generate ...`) applies "
            "these rewrites as the model runs; it drops masks of the batched cache only with check_masks=True, "
            "as they are runtime values there")


class ConfigError(ValueError):
    """The config cannot be read, or mlx-lm cannot build or run that model (the message says why)."""


@dataclass(frozen=True)
class Options:
    """What to build and which steps to audit (the `mlxrewrite audit --mlx-lm-config` flags)."""

    kv_bits: int | None = None  # quantize the KV cache (mlx-lm's --kv-bits); None: float cache
    kv_group_size: int = 64
    batch: int = 2  # the batched step's batch size; 1 leaves it out
    prompt_len: int = 8
    num_draft_tokens: int = 2  # speculative verification runs this many + 1 tokens (mlx-lm's default: 2)
    full_size: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for name, least in (("batch", 1), ("prompt_len", 1), ("num_draft_tokens", 0)):
            if getattr(self, name) < least:
                raise ConfigError(f"{name.replace('_', '-')} must be at least {least}, got {getattr(self, name)}")


def load_config(path: str | Path) -> dict[str, Any]:
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"cannot read mlx-lm config {str(path)!r}: {error}") from error
    if not isinstance(config, dict) or "model_type" not in config:
        raise ConfigError(f"{path} is not an mlx-lm config: it has no 'model_type'")
    for key in SIZE_KEYS:
        value = config.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"{path}: {key!r} must be a positive integer, got {value!r}")
    return config


def shrink_config(config: dict[str, Any]) -> dict[str, Any]:
    """The same architecture, tiny: 2 layers, at most 2 KV heads with the same number of query heads per KV
    head, the real head_dim (it decides the kernel route, e.g. on CUDA), hidden = heads * head_dim, small
    MLP and vocabulary."""
    tiny = dict(config)
    heads = config.get("num_attention_heads")
    if heads:
        kv_heads = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or config.get("hidden_size", heads) // heads
        tiny["num_key_value_heads"] = min(kv_heads, TINY_KV_HEADS)
        tiny["num_attention_heads"] = tiny["num_key_value_heads"] * (heads // kv_heads)
        tiny["head_dim"] = head_dim
        tiny["hidden_size"] = tiny["num_attention_heads"] * tiny["head_dim"]
    for key in INTERMEDIATE_KEYS:
        if key in config:
            tiny[key] = min(config[key], 2 * tiny.get("hidden_size", config[key]))
    _cap(tiny, config, ("vocab_size",), TINY_VOCAB)
    _cap(tiny, config, EXPERT_KEYS, TINY_EXPERTS)
    _cap(tiny, config, EXPERTS_PER_TOKEN_KEYS, TINY_EXPERTS_PER_TOKEN)
    for key in LAYER_KEYS:
        if key in config:
            tiny[key] = min(config[key], TINY_LAYERS)
            for name, value in config.items():  # per-layer lists (layer_types, ...) follow the layer count
                if isinstance(value, list) and len(value) == config[key]:
                    tiny[name] = value[:tiny[key]]
    return tiny


def _cap(tiny: dict, config: dict, keys: tuple[str, ...], limit: int) -> None:
    for key in keys:
        if isinstance(config.get(key), int):
            tiny[key] = min(config[key], limit)


def build_model(config: dict[str, Any], seed: int = 0) -> nn.Module:
    """mlx-lm's model for `config` with random float32 weights (CPU quantized matmuls are 10-60x slower in
    fp16/bf16); any failure of mlx-lm to build it becomes a ConfigError."""
    from .mlx_lm.tiny import build

    try:
        return build(config, mx.float32, seed)
    except (Exception, SystemExit) as error:  # some mlx-lm modules sys.exit on a missing optional package
        raise ConfigError(f"mlx-lm cannot build {config['model_type']!r} from this config: "
                          f"{type(error).__name__}: {error}") from error


def make_caches(model: nn.Module, options: Options, batch: int = 1) -> list:
    """The caches mlx-lm's generate would use: the model's own, quantized like `maybe_quantize_kv_cache`
    with kv_bits; for a batch, merged per layer into mlx-lm's batch caches (which stay float: mlx-lm has no
    quantized batch cache)."""
    from mlx_lm.models.cache import make_prompt_cache

    if batch > 1:
        per_sequence = [make_prompt_cache(model) for _ in range(batch)]
        return [layer[0].merge(list(layer)) for layer in zip(*per_sequence)]
    caches = make_prompt_cache(model)
    if options.kv_bits is None:
        return caches
    return [c.to_quantized(group_size=options.kv_group_size, bits=options.kv_bits)
            if hasattr(c, "to_quantized") else c for c in caches]


def _generate(model: nn.Module, caches: Callable[[], list], *token_blocks: mx.array) -> mx.array:
    """Fresh caches, then the model on each block of tokens in turn: the logits of the last one."""
    cache = caches()
    for tokens in token_blocks:
        logits = model(tokens, cache=cache)
    return logits


def _random_tokens(vocab_size: int, key: mx.array, shape: tuple[int, ...]) -> mx.array:
    return mx.random.randint(0, vocab_size, shape, key=key)


def model_cases(model: nn.Module, vocab_size: int, options: Options) -> list[Case]:
    """The generation steps to audit, each as a Case (prompt replayed before the step's own tokens)."""
    single = functools.partial(make_caches, model, options)
    for batch in {1, options.batch}:  # fail here, with a clear message, rather than inside a trace
        try:
            make_caches(model, options, batch)
        except (NotImplementedError, ValueError, TypeError, AttributeError) as error:
            raise ConfigError(f"mlx-lm cannot make this model's caches (batch {batch}): {error}") from error
    tokens = functools.partial(_random_tokens, vocab_size, mx.random.key(options.seed))
    p, m = options.prompt_len, options.num_draft_tokens + 1
    run_single = functools.partial(_generate, model, single)
    cases = [
        Case(f"prefill (P={p})", run_single, (tokens((1, p)),)),
        Case(f"decode (M=1 after P={p})", run_single, (tokens((1, p)), tokens((1, 1))), replayed=1),
        Case(f"speculative verification (M={m} after P={p})", run_single, (tokens((1, p)), tokens((1, m))),
             replayed=1),
    ]
    if options.batch > 1:
        batched = functools.partial(_generate, model, functools.partial(make_caches, model, options, options.batch))
        cases.append(Case(f"batched decode (B={options.batch}, float batch cache, M=1 after P={p})", batched,
                          (tokens((options.batch, p)), tokens((options.batch, 1))), replayed=1))
    return cases


def config_cases(path: str | Path, options: Options) -> tuple[str, list[Case]]:
    """Read, shrink (unless full size), build and describe the model of `path`: (target, cases)."""
    config = load_config(path)
    if not options.full_size:
        config = shrink_config(config)
    model = build_model(config, options.seed)
    cache = f"{options.kv_bits}-bit KV cache (group {options.kv_group_size})" if options.kv_bits else "float KV cache"
    return f"{config['model_type']} ({_size(config, options.full_size)}, random weights, {cache})", \
        model_cases(model, config.get("vocab_size", TINY_VOCAB), options)


def _size(config: dict[str, Any], full_size: bool) -> str:
    layers = next((config[k] for k in LAYER_KEYS if k in config), "?")
    heads = f"{config.get('num_attention_heads', '?')} heads / {config.get('num_key_value_heads', '?')} KV heads"
    return (f"{'full size' if full_size else 'tiny'}: {layers} layers, hidden {config.get('hidden_size', '?')}, "
            f"{heads}, head_dim {config.get('head_dim', '?')}")
