"""Interception of the MLX API calls that rules rewrite.

`install()` replaces `mx.quantized_matmul` and `mx.fast.scaled_dot_product_attention` with thin
dispatchers. With no handler active (the usual case) a dispatcher calls the original at once; inside
`handling(h)` (a context variable, so threads do not see each other's handlers) it binds the arguments
into a `Call` and lets `h` decide what to return. Tracing records calls; lowering applies rewrites.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import mlx.core as mx


@dataclass(frozen=True)
class ApiSpec:
    """How to bind one MLX API's arguments: array operands and static parameters, by name."""

    name: str
    module: Any
    attr: str
    positional: tuple[str, ...]  # parameter names in positional order
    operands: tuple[str, ...]  # those that are (optional) arrays
    defaults: dict[str, Any] = field(default_factory=dict)


APIS: dict[str, ApiSpec] = {
    spec.name: spec
    for spec in (
        ApiSpec("quantized_matmul", mx, "quantized_matmul",
                ("x", "w", "scales", "biases", "transpose", "group_size", "bits", "mode"),
                ("x", "w", "scales", "biases"),
                {"biases": None, "transpose": True, "group_size": None, "bits": None, "mode": "affine"}),
        ApiSpec("scaled_dot_product_attention", mx.fast, "scaled_dot_product_attention",
                ("q", "k", "v"), ("q", "k", "v", "mask", "sinks"),
                {"mask": None, "sinks": None}),
    )
}

_ORIGINALS: dict[str, Callable] = {}
_HANDLER: contextvars.ContextVar["Callable[[Call], Any] | None"] = contextvars.ContextVar("mlxrewrite_handler",
                                                                                          default=None)
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


@dataclass
class Call:
    """One intercepted API call: its array operands and static parameters, bound by name."""

    api: str
    operands: dict[str, mx.array | None]
    params: dict[str, Any]
    location: str | None

    def run_original(self, **overrides: Any) -> mx.array:
        """Call the unpatched MLX function, with some operands or parameters replaced."""
        return _invoke(original(self.api), self.api, {**self.operands, **self.params, **overrides})

    def dispatch(self, **overrides: Any) -> mx.array:
        """Call the API through its dispatcher (so the active handler sees it), operands replaced."""
        spec = APIS[self.api]
        return _invoke(getattr(spec.module, spec.attr), self.api, {**self.operands, **self.params, **overrides})

    def shape_of(self, name: str) -> tuple[int, ...] | None:
        array = self.operands.get(name)
        return None if array is None else tuple(array.shape)


def _invoke(fn: Callable, api: str, kwargs: dict[str, Any]) -> mx.array:
    leading = [kwargs.pop(name) for name in APIS[api].positional[:3]]
    return fn(*leading, **kwargs)


def original(api: str) -> Callable:
    """The real MLX function behind a dispatcher."""
    install()
    return _ORIGINALS[api]


def install() -> None:
    """Put the dispatchers in place (idempotent)."""
    for name, spec in APIS.items():
        if name in _ORIGINALS:
            continue
        _ORIGINALS[name] = getattr(spec.module, spec.attr)
        setattr(spec.module, spec.attr, _make_dispatcher(spec, _ORIGINALS[name]))


def _make_dispatcher(spec: ApiSpec, real: Callable) -> Callable:
    def dispatcher(*args: Any, **kwargs: Any) -> Any:
        handler = _HANDLER.get()
        if handler is None or "stream" in kwargs:
            return real(*args, **kwargs)
        return handler(bind(spec, args, kwargs, caller_location()))

    dispatcher.__name__ = spec.attr
    dispatcher.__doc__ = real.__doc__
    dispatcher.__wrapped__ = real
    return dispatcher


def bind(spec: ApiSpec, args: tuple, kwargs: dict, location: str | None = None) -> Call:
    if len(args) > len(spec.positional):
        raise TypeError(f"{spec.name}() takes at most {len(spec.positional)} positional arguments")
    bound = {**spec.defaults, **dict(zip(spec.positional, args)), **kwargs}
    operands = {name: bound.pop(name, None) for name in spec.operands}
    if isinstance(operands.get("mask"), str):  # "causal" is a mode, not an operand
        bound["mask"] = operands.pop("mask")
    return Call(spec.name, operands, bound, location)


def caller_location() -> str | None:
    """file:line of the nearest frame outside mlxrewrite (the user's call site)."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back
    return None if frame is None else f"{frame.f_code.co_filename}:{frame.f_lineno}"


@contextlib.contextmanager
def handling(handler: Callable[[Call], Any]) -> Iterator[None]:
    """Route intercepted calls in this context (thread / task) to `handler`."""
    install()
    token = _HANDLER.set(handler)
    try:
        yield
    finally:
        _HANDLER.reset(token)
