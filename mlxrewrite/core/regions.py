"""Regions: Python functions intercepted whole, so that eager mode can replace a subgraph, not one call.

Eager mode sees calls one at a time, so a subgraph rule (qmm -> mask -> softmax -> qmm) needs to know
where its subgraph starts. A rule names the function that computes it (`Rule.region`, e.g. mlx-lm's
`mlx_lm.models.base:quantized_scaled_dot_product_attention`). Eager mode installs a dispatcher in that
function's place in its module: outside a forward pass of a rewriter that wants regions it calls the
function at once, so other code, and unwrapped models, see no difference. Inside one, the forward pass
gets a `RegionCall`: it traces the function on the call's shapes, matches the rule's pattern on that graph
and either runs the rewrite or the function as written (whose own calls are then decided one by one).
"""

from __future__ import annotations

import importlib
import sys
import threading
from typing import Any, Callable

from . import intercept

_LOCK = threading.Lock()
_REAL: dict[str, Callable] = {}  # path -> the function the dispatcher stands in for


class RegionCall:
    """One call of a region function: its arguments as passed, and where it was made (a plain slotted class:
    one is made per call, on a decode step's path)."""

    __slots__ = ("path", "real", "args", "kwargs", "where")

    def __init__(self, path: str, real: Callable, args: tuple, kwargs: dict[str, Any], where: tuple[str, int] | None):
        self.path, self.real, self.args, self.kwargs, self.where = path, real, args, kwargs, where

    @property
    def api(self) -> str:
        """Observers see region calls beside API calls (the mlx-lm wrapper counts them as attention)."""
        return f"region:{self.path}"

    @property
    def location(self) -> str | None:
        return None if self.where is None else f"{self.where[0]}:{self.where[1]}"

    def run_original(self) -> Any:
        return self.real(*self.args, **self.kwargs)


def install(path: str) -> str | None:
    """Put a dispatcher in place of the function at `path` ("module:function"), once per process. Returns why
    it cannot (the module is not importable), else None."""
    module_name, _, name = path.partition(":")
    with _LOCK:
        if path in _REAL:
            return None
        try:
            module = importlib.import_module(module_name)
            real = getattr(module, name)
        except (ImportError, AttributeError) as error:
            return f"region {path} is not available: {error}"
        _REAL[path] = real
        setattr(module, name, _dispatcher(path, real))
    return None


def _dispatcher(path: str, real: Callable) -> Callable:
    def dispatcher(*args: Any, **kwargs: Any) -> Any:
        handle = getattr(intercept.active_handler(), "region", None)
        if handle is None:
            return real(*args, **kwargs)
        frame = sys._getframe(1)
        return handle(RegionCall(path, real, args, kwargs, (frame.f_code.co_filename, frame.f_lineno)))

    dispatcher.__name__ = real.__name__
    dispatcher.__doc__ = real.__doc__
    dispatcher.__wrapped__ = real
    return dispatcher
