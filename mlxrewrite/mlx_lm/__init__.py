"""mlx-lm integration: wrap a model so its attention calls go through mlxrewrite's rules as it decodes.

    import mlxrewrite.mlx_lm as mrl
    model = mrl.wrap(model)          # in place; generate / stream_generate / batch_generate work unchanged
    print(mrl.explain(model))        # call traces (a handful per run, not per token), rewrites, coverage
    mrl.unwrap(model)

The model runs eagerly, as mlx-lm runs it (`eager.EagerRewriter`): every `mx.quantized_matmul` and
`mx.fast.scaled_dot_product_attention` call is decided by the core rules, keyed by the facts each rule
depends on, so a 256-token decode traces each distinct call once. mlx-lm's quantized-KV attention
(`models/base.py`, expand_dims + broadcast quantized_matmul) is folded; masks of the batched cache are
runtime values and are dropped only with `check_masks=True`, which checks the masks the cache itself
builds (`make_mask`), each once per forward pass, and never a mask a model computes from activations.
On a CUDA GPU, mlx-lm's `QuantizedKVCache` objects are packed in place (`packed_cache`: one buffer per
layer, a token added in two ops, mlx-lm's numbers); elsewhere they update through `cache_update`.

Coverage is checked, not assumed: on the first forward pass of each route (the cache types, and one
token or several), each attention layer must make at least one intercepted attention call. Layers whose
attention bypasses both APIs are reported (`CoverageWarning`, and in `explain`), never skipped silently.

Cost where no rule fires: MLX itself is not patched. The model's own code modules (those of its layer
classes, and `mlx_lm.models.base`, where mlx-lm's attention functions live) see `mx` as
`intercept.instrumented_mlx()` while a model using them is wrapped: a live view of `mlx.core`, so models
of the same architecture that are not wrapped run exactly as before (their calls go to whatever MLX's
functions are at that moment, patches included); `mlx.nn`'s layers (the quantized
linear layers' `quantized_matmul` calls) do not. Of the calls that do reach a dispatcher, those no rule
can rewrite (SDPA without a mask) are passed straight through by the rules' gate.
"""

from __future__ import annotations

import contextvars
import functools
import sys
import threading
import types
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn

from ..backends.kernels.quantized_sdpa import on_cuda
from ..core import intercept
from ..core.eager import EagerRewriter
from ..core.intercept import Call
from ..core.rule import Rule
from . import cache_update, tiny

MLX_LM_MISSING = "this needs mlx-lm: pip install 'mlxrewrite[mlx-lm]'"  # mlx-lm is an optional extra
_ATTR = "_mlxrewrite_wrap"
_LOCK = threading.Lock()
_CLASSES: dict[type, type] = {}


# Architectures whose attention is known not to go through the intercepted APIs, and why: decided not to be
# covered, as nothing there reaches a kernel path the rules exist for (reported with the coverage note).
NOT_COVERED = {
    "mlx_lm.models.gemma2": "gemma2 computes attention by hand (matmul, logit softcapping, softmax), so there "
                            "is no SDPA or quantized-matmul call to rewrite; with kv_bits mlx-lm raises TypeError",
    "mlx_lm.models.phi3small": "phi3small's block-sparse layers compute attention with their own matmuls and "
                               "block mask; its dense layers are covered",
}


class CoverageWarning(UserWarning):
    """Some attention layers of a wrapped model make no call that mlxrewrite intercepts."""


@dataclass(frozen=True)
class Options:
    """What `wrap` was asked for: a copy or an unpickled model is wrapped again with these."""

    rules: tuple[Rule, ...] | None = None
    disable: tuple[str, ...] | str = ()  # as given: `select_rules` reads it (one name or several)
    check_masks: bool = False
    lean_cache: bool = True
    packed_cache: bool | None = None


@dataclass
class WrapState:
    rewriter: EagerRewriter
    original_class: type
    code_modules: list[types.ModuleType]
    release: weakref.finalize  # lets the modules go when the model is unwrapped or garbage collected
    options: Options = field(default_factory=Options)
    forward_passes: int = 0
    coverage: list[str] = field(default_factory=list)
    routes_checked: set[tuple] = field(default_factory=set)
    packed: int = 0  # quantized caches this wrapper packed
    not_packed: list[str] = field(default_factory=list)  # why others were not


def wrap(model: nn.Module, *, rules: list[Rule] | None = None, disable: tuple[str, ...] | str = (),
         check_masks: bool = False, lean_cache: bool = True, packed_cache: bool | None = None) -> nn.Module:
    """Route `model`'s attention calls through the rules (in place; returns `model`).

    Idempotent: wrapping a wrapped model returns it unchanged (unwrap first to change options).
    `check_masks=True` lets the masks that the cache itself builds (`make_mask`: mlx-lm's batched caches
    build array masks from runtime padding) be checked, each once per forward pass, and dropped when all
    True. Other masks (a model's own, such as MLA's position scores passed as an additive mask) are
    never evaluated; without it no mask is.
    `lean_cache=True`: in the model's forward passes, mlx-lm's `QuantizedKVCache` objects update through
    `cache_update.update_and_fetch`, the same ops and state with a fifth of the Python (where the installed
    mlx-lm's method is the one it was checked against; `explain` says when not).
    `packed_cache`: mlx-lm's `QuantizedKVCache` objects that a forward pass gets are turned into
    `packed_cache.QuantizedKVCache` (in place, once: one buffer instead of six, a token added in two ops,
    mlx-lm's numbers and API). None: on a CUDA GPU, where its kernel runs (and the installed mlx-lm's cache
    is the one it was checked against); True: everywhere (elsewhere `mx.quantize` packs the rows); False: never.

    `copy.deepcopy`, `copy.copy` and `pickle` of a wrapped model give a wrapped model with the same
    options and fresh call traces (for pickle, `rules` must be picklable).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"mlxrewrite.mlx_lm.wrap expects an mlx.nn.Module (an mlx-lm model), "
                        f"got {type(model).__name__}")
    if packed_cache not in (None, True, False):
        raise TypeError(f"mlxrewrite.mlx_lm.wrap: packed_cache must be None, True or False, not {packed_cache!r}")
    with _LOCK:
        if not is_wrapped(model):
            _attach(model, type(model), Options(None if rules is None else tuple(rules), disable, check_masks,
                                                lean_cache, packed_cache))
    return model


def _attach(model: nn.Module, original_class: type, options: Options) -> None:
    rewriter = EagerRewriter(list(options.rules or ()), options.disable,
                             check_values=_check_cache_mask if options.check_masks else False)
    modules = _code_modules(model)
    for module in modules:
        intercept.instrument(module)
    release = weakref.finalize(model, _release, modules)
    object.__setattr__(model, _ATTR, WrapState(rewriter, original_class, modules, release, options))
    model.__class__ = _wrapped_class(original_class)


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
    if wrap_state.options.lean_cache and cache_update.unavailable():
        lines.append(f"  lean cache update not used: {cache_update.unavailable()}")
    if wrap_state.packed:
        lines.append(f"  quantized caches packed: {wrap_state.packed} (mlxrewrite.mlx_lm.packed_cache; rows "
                     f"through {'the CUDA kernel where verified' if on_cuda() else 'mx.quantize'})")
    lines += [f"  quantized cache not packed: {why}" for why in wrap_state.not_packed]
    lines += [f"  not covered: {note}" for note in wrap_state.coverage]
    return "\n".join(lines)


# ---- masks the cache made (check_masks=True) ------------------------------------------------------------
class CacheMasks:
    """The array masks the caches' own `make_mask` returned in one forward pass: the only masks that
    `check_masks=True` may evaluate. Records them by hooking `make_mask` on the cache objects (not their
    class) for the pass only."""

    def __init__(self, cache: Any):
        self.made: dict[int, mx.array] = {}  # id -> the mask, kept alive for the pass (ids stay unique)
        self.checked: dict[int, Any] = {}  # id -> its value summary, once per pass
        self.hooked = _hook(cache, "make_mask", lambda c, make_mask: self._recording(make_mask))

    def _recording(self, make_mask: Callable) -> Callable:
        def recorded(*args: Any, **kwargs: Any) -> Any:
            mask = make_mask(*args, **kwargs)
            if isinstance(mask, mx.array):
                self.made[id(mask)] = mask
            return mask

        return recorded

    def restore(self) -> None:
        _unhook(self.hooked, "make_mask")


def _hook(cache: Any, name: str, make: Callable[[Any, Callable], Callable], kind: type | None = None) -> list:
    """Set method `name` of each cache object that has it (of exactly type `kind`, if given) to
    `make(object, its own method)`, on the objects, not their class, for one forward pass."""
    hooked = [c for c in cache if hasattr(c, name) and (kind is None or type(c) is kind)] \
        if isinstance(cache, (list, tuple)) else []
    for c in hooked:
        setattr(c, name, make(c, getattr(c, name)))
    return hooked


def _unhook(hooked: list, name: str) -> None:
    for c in hooked:
        vars(c).pop(name, None)


def _pack_caches(wrap_state: WrapState, cache: Any) -> None:
    """Pack mlx-lm's quantized caches in `cache` (in place), where `packed_cache` asks for it."""
    wanted = wrap_state.options.packed_cache
    if wanted is False or not isinstance(cache, (list, tuple)) or cache_update.unavailable():
        return
    if wanted is None and not on_cuda():
        return
    from mlx_lm.models.cache import QuantizedKVCache  # here: this package imports without mlx-lm installed

    from . import packed_cache

    for c in cache:
        if type(c) is QuantizedKVCache:
            try:
                packed_cache.pack(c)
                wrap_state.packed += 1
            except ValueError as error:  # not mlx-lm's layout: it keeps its own, and explain says why
                if str(error) not in wrap_state.not_packed:
                    wrap_state.not_packed.append(str(error))


def _lean_caches(cache: Any) -> list:
    """mlx-lm's quantized caches in `cache`, updating through `cache_update` for this pass."""
    from mlx_lm.models.cache import QuantizedKVCache  # here: this package imports without mlx-lm installed

    return _hook(cache, "update_and_fetch", lambda c, own: functools.partial(cache_update.update_and_fetch, c, own),
                 QuantizedKVCache)


_PASS_MASKS: contextvars.ContextVar[CacheMasks | None] = contextvars.ContextVar("mlxrewrite_cache_masks",
                                                                                  default=None)


def _check_cache_mask(array: mx.array, forward_pass: Any) -> Any:
    """The value check of `check_masks=True`: only masks the cache made in this pass, each once per pass (one
    mask serves every layer); any other array (an activation-dependent mask of MLA models) stays unknown."""
    masks = _PASS_MASKS.get()
    if masks is None or id(array) not in masks.made:
        return None
    if id(array) not in masks.checked:
        masks.checked[id(array)] = forward_pass.check(array)
    return masks.checked[id(array)]


def _code_modules(model: nn.Module) -> list[types.ModuleType]:
    """The modules whose code computes the model's attention: those defining its layer classes (mlx-lm's
    model files, or the user's own), except MLX's own (`mlx.nn`), and mlx-lm's `models.base`."""
    names = {type(layer).__module__ for layer in model.modules()} | {"mlx_lm.models.base"}
    return [sys.modules[name] for name in sorted(names) if name in sys.modules and name.split(".")[0] != "mlx"]


def _release(modules: list[types.ModuleType]) -> None:
    for module in modules:
        intercept.release(module)


def _wrapped_class(cls: type) -> type:
    """A subclass whose __call__ runs the model's own under the rewriter (cached per class); copies and
    pickles of its instances are wrapped again (`_reduce`)."""
    if cls not in _CLASSES:
        _CLASSES[cls] = type(cls.__name__, (cls,), {
            "__call__": _call, "__reduce_ex__": _reduce, "__setstate__": _setstate, "__module__": cls.__module__,
            "__qualname__": cls.__qualname__, "__doc__": cls.__doc__})
    return _CLASSES[cls]


def _reduce(self: nn.Module, protocol: int) -> tuple:
    """Copy / pickle as the unwrapped model plus the options; `_setstate` wraps the result again."""
    wrap_state: WrapState = self.__dict__[_ATTR]
    attributes = {k: v for k, v in self.__dict__.items() if k != _ATTR}
    return _unfilled, (wrap_state.original_class,), (attributes, dict(self), wrap_state.options)


def _unfilled(original_class: type) -> nn.Module:
    """An empty instance of the wrapped class of `original_class`, for `_setstate` to fill and wrap."""
    model = original_class.__new__(original_class)
    model.__class__ = _wrapped_class(original_class)
    return model


def _setstate(self: nn.Module, state: tuple[dict, dict, Options]) -> None:
    attributes, items, options = state
    self.__dict__.update(attributes)
    dict.update(self, items)
    with _LOCK:
        _attach(self, type(self).__mro__[1], options)


def _call(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    wrap_state: WrapState = self.__dict__[_ATTR]
    cache = kwargs.get("cache", args[1] if len(args) > 1 else None)
    route = _route(args[0] if args else kwargs.get("inputs"), cache)
    seen = AttentionCalls() if route is not None and route not in wrap_state.routes_checked else None
    masks = CacheMasks(cache) if wrap_state.options.check_masks else None
    _pack_caches(wrap_state, cache)
    lean = _lean_caches(cache) if wrap_state.options.lean_cache and not cache_update.unavailable() else []
    token = _PASS_MASKS.set(masks)
    try:
        out = wrap_state.rewriter.run(wrap_state.original_class.__call__, (self, *args), kwargs, seen,
                                      patch_mlx=False)
    finally:
        _PASS_MASKS.reset(token)
        _unhook(lean, "update_and_fetch")
        if masks is not None:
            masks.restore()
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
    known = NOT_COVERED.get(wrap_state.original_class.__module__)
    note = (f"{layers - seen.count} of {layers} attention layers made no call to "
            "mx.fast.scaled_dot_product_attention or mx.quantized_matmul: their attention is computed "
            "another way and mlxrewrite does not check it" + (f" ({known})" if known else ""))
    if note not in wrap_state.coverage:
        wrap_state.coverage.append(note)
        warnings.warn(f"mlxrewrite: {wrap_state.original_class.__name__}: {note}", CoverageWarning, stacklevel=3)


def _is_attention_cache(cache: Any) -> bool:
    """KV caches belong to attention layers; ArraysCache holds recurrent (SSM) state."""
    from mlx_lm.models.cache import ArraysCache  # here: this package imports without mlx-lm installed

    return not isinstance(cache, ArraysCache)


__all__ = ["MLX_LM_MISSING", "NOT_COVERED", "CacheMasks", "CoverageWarning", "Options", "WrapState", "explain", "is_wrapped", "state", "tiny", "unwrap", "wrap"]
