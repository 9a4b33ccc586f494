"""mlx-lm integration: wrap a model so its attention calls go through mlxrewrite's rules as it decodes.

    import mlxrewrite.mlx_lm as mrl
    model = mrl.wrap(model)          # in place; generate / stream_generate / batch_generate work unchanged
    print(mrl.explain(model))        # call traces (a handful per run, not per token), rewrites, coverage
    mrl.unwrap(model)

The model runs eagerly, as mlx-lm runs it (`eager.EagerRewriter`): every `mx.quantized_matmul` and
`mx.fast.scaled_dot_product_attention` call is decided by the core rules, keyed by the facts each rule
depends on, so a 256-token decode traces each distinct call once. mlx-lm's quantized-KV attention
(`models/base.py`, expand_dims + broadcast quantized_matmul) is folded; masks of the batched cache are
runtime values and are dropped only with `check_masks=True` (one value check per mask per forward pass).

Coverage is checked, not assumed: on every forward pass with a cache, each attention layer must make at
least one intercepted attention call. Layers whose attention bypasses both APIs are reported
(`CoverageWarning`, and in `explain`), never skipped silently.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass, field
from typing import Any

import mlx.nn as nn
from mlx_lm.models.cache import ArraysCache

from ..eager import EagerRewriter
from ..intercept import Call
from ..rule import Rule

_ATTR = "_mlxrewrite_wrap"
_LOCK = threading.Lock()
_CLASSES: dict[type, type] = {}


class CoverageWarning(UserWarning):
    """Some attention layers of a wrapped model make no call that mlxrewrite intercepts."""


@dataclass
class WrapState:
    rewriter: EagerRewriter
    original_class: type
    forward_passes: int = 0
    coverage: list[str] = field(default_factory=list)


def wrap(model: nn.Module, *, rules: list[Rule] | None = None, disable: tuple[str, ...] = (),
         check_masks: bool = False) -> nn.Module:
    """Route `model`'s attention calls through the rules (in place; returns `model`).

    Idempotent: wrapping a wrapped model returns it unchanged (unwrap first to change options).
    `check_masks=True` lets SDPA masks built from runtime values (mlx-lm's batched cache) be checked once
    per forward pass and dropped when all True; without it such masks are always kept.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"mlxrewrite.mlx_lm.wrap expects an mlx.nn.Module (an mlx-lm model), "
                        f"got {type(model).__name__}")
    with _LOCK:
        if is_wrapped(model):
            return model
        rewriter = EagerRewriter(rules, tuple(disable), check_values=check_masks)
        object.__setattr__(model, _ATTR, WrapState(rewriter, type(model)))
        model.__class__ = _wrapped_class(type(model))
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """Restore the model's own class (in place; returns `model`). A model that is not wrapped is returned."""
    with _LOCK:
        state = model.__dict__.pop(_ATTR, None)
        if state is not None:
            model.__class__ = state.original_class
    return model


def is_wrapped(model: Any) -> bool:
    return _ATTR in getattr(model, "__dict__", {})


def state(model: nn.Module) -> WrapState:
    if not is_wrapped(model):
        raise ValueError(f"{type(model).__name__} is not wrapped by mlxrewrite.mlx_lm.wrap")
    return model.__dict__[_ATTR]


def explain(model: nn.Module) -> str:
    """The rewriter's account (each call trace and why, each decision, call counts) plus coverage."""
    wrap_state = state(model)
    lines = [f"mlxrewrite.mlx_lm: {wrap_state.original_class.__module__}.{wrap_state.original_class.__name__}, "
             f"{wrap_state.forward_passes} forward pass(es)", wrap_state.rewriter.explain()]
    lines += [f"  not covered: {note}" for note in wrap_state.coverage]
    return "\n".join(lines)


def _wrapped_class(cls: type) -> type:
    """A subclass whose __call__ runs the model's own under the rewriter (cached per class)."""
    if cls not in _CLASSES:
        _CLASSES[cls] = type(cls.__name__, (cls,), {"__call__": _call, "__module__": cls.__module__,
                                                    "__qualname__": cls.__qualname__, "__doc__": cls.__doc__})
    return _CLASSES[cls]


def _call(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    wrap_state: WrapState = self.__dict__[_ATTR]
    cache = kwargs.get("cache", args[1] if len(args) > 1 else None)
    seen = AttentionCalls()
    with wrap_state.rewriter.forward(observer=seen):
        out = wrap_state.original_class.__call__(self, *args, **kwargs)
    wrap_state.forward_passes += 1
    _check_coverage(wrap_state, cache, seen)
    return out


class AttentionCalls:
    """Counts the intercepted calls that compute attention scores in one forward pass."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, call: Call) -> None:
        if call.api == "scaled_dot_product_attention":
            self.count += 1
        elif call.params.get("transpose") and call.operands["w"].ndim >= 3:  # quantized-KV scores
            self.count += 1


def _check_coverage(wrap_state: WrapState, cache: Any, seen: AttentionCalls) -> None:
    if not isinstance(cache, (list, tuple)):
        return
    layers = sum(1 for c in cache if _is_attention_cache(c))
    if seen.count >= layers:
        return
    note = (f"{layers - seen.count} of {layers} attention layers made no call to "
            "mx.fast.scaled_dot_product_attention or mx.quantized_matmul: their attention is computed "
            "another way and mlxrewrite does not check it")
    if note not in wrap_state.coverage:
        wrap_state.coverage.append(note)
        warnings.warn(f"mlxrewrite: {wrap_state.original_class.__name__}: {note}", CoverageWarning, stacklevel=3)


def _is_attention_cache(cache: Any) -> bool:
    """KV caches belong to attention layers; ArraysCache holds recurrent (SSM) state."""
    return not isinstance(cache, ArraysCache)


__all__ = ["CoverageWarning", "explain", "is_wrapped", "state", "unwrap", "wrap"]
