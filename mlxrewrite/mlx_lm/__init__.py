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

Coverage is checked, not assumed: on the first forward pass of each route (the cache types, and one
token or several), each attention layer must make at least one intercepted attention call. Layers whose
attention bypasses both APIs are reported (`CoverageWarning`, and in `explain`), never skipped silently.

Cost where no rule fires: MLX itself is not patched. The model's own code modules (those of its layer
classes, and `mlx_lm.models.base`, where mlx-lm's attention functions live) see `mx` as
`intercept.instrumented_mlx()` while a model using them is wrapped; `mlx.nn`'s layers (the quantized
linear layers' `quantized_matmul` calls) do not. Of the calls that do reach a dispatcher, those no rule
can rewrite (SDPA without a mask) are passed straight through by the rules' gate.
"""

from __future__ import annotations

import sys
import threading
import types
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any

import mlx.nn as nn
from mlx_lm.models.cache import ArraysCache

from .. import intercept
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
    code_modules: list[types.ModuleType]
    release: weakref.finalize  # lets the modules go when the model is unwrapped or garbage collected
    forward_passes: int = 0
    coverage: list[str] = field(default_factory=list)
    routes_checked: set[tuple] = field(default_factory=set)


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
        rewriter = EagerRewriter(rules, disable, check_values=check_masks)
        modules = _code_modules(model)
        for module in modules:
            intercept.instrument(module)
        release = weakref.finalize(model, _release, modules)
        object.__setattr__(model, _ATTR, WrapState(rewriter, type(model), modules, release))
        model.__class__ = _wrapped_class(type(model))
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """Restore the model's own class (in place; returns `model`). A model that is not wrapped is returned."""
    with _LOCK:
        state = model.__dict__.pop(_ATTR, None)
        if state is not None:
            model.__class__ = state.original_class
            state.release()
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
             f"{wrap_state.forward_passes} forward pass(es); coverage checked on {len(wrap_state.routes_checked)} "
             "route(s) (cache types x one token or several)", wrap_state.rewriter.explain()]
    lines += [f"  not covered: {note}" for note in wrap_state.coverage]
    return "\n".join(lines)


def _code_modules(model: nn.Module) -> list[types.ModuleType]:
    """The modules whose code computes the model's attention: those defining its layer classes (mlx-lm's
    model files, or the user's own), except MLX's own (`mlx.nn`), and mlx-lm's `models.base`."""
    names = {type(layer).__module__ for layer in model.modules()} | {"mlx_lm.models.base"}
    return [sys.modules[name] for name in sorted(names) if name in sys.modules and name.split(".")[0] != "mlx"]


def _release(modules: list[types.ModuleType]) -> None:
    for module in modules:
        intercept.release(module)


def _wrapped_class(cls: type) -> type:
    """A subclass whose __call__ runs the model's own under the rewriter (cached per class)."""
    if cls not in _CLASSES:
        _CLASSES[cls] = type(cls.__name__, (cls,), {"__call__": _call, "__module__": cls.__module__,
                                                    "__qualname__": cls.__qualname__, "__doc__": cls.__doc__})
    return _CLASSES[cls]


def _call(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    wrap_state: WrapState = self.__dict__[_ATTR]
    cache = kwargs.get("cache", args[1] if len(args) > 1 else None)
    route = _route(args[0] if args else kwargs.get("inputs"), cache)
    seen = AttentionCalls() if route is not None and route not in wrap_state.routes_checked else None
    out = wrap_state.rewriter.run(wrap_state.original_class.__call__, (self, *args), kwargs, seen, patch_mlx=False)
    wrap_state.forward_passes += 1
    if seen is not None:
        wrap_state.routes_checked.add(route)
        _check_coverage(wrap_state, cache, seen)
    return out


def _route(inputs: Any, cache: Any) -> tuple | None:
    """What decides how attention is computed: the cache types, and whether one token or several (a
    prompt or a speculative verification) runs. None without a cache list (nothing to check against)."""
    if not isinstance(cache, (list, tuple)):
        return None
    return tuple(map(type, cache)), getattr(inputs, "shape", (0, 0))[-1] == 1


class AttentionCalls:
    """Counts the intercepted calls that compute attention scores in one forward pass."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, call: Call) -> None:
        if call.api == "scaled_dot_product_attention" or call.api.startswith("region:"):
            self.count += 1
        elif call.params.get("transpose") and call.operands["w"].ndim >= 3:  # quantized-KV scores
            self.count += 1


def _check_coverage(wrap_state: WrapState, cache: list | tuple, seen: AttentionCalls) -> None:
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
