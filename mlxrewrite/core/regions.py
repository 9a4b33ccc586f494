"""Regions: Python functions intercepted whole, so that eager mode can replace a subgraph, not one call.

Eager mode sees calls one at a time, so a subgraph rule (qmm -> mask -> softmax -> qmm) needs to know
where its subgraph starts. A rule names the function that computes it (`Rule.region`, e.g. mlx-lm's
`mlx_lm.models.base:quantized_scaled_dot_product_attention`). Eager mode installs a dispatcher in that
function's place in its module: outside a forward pass of a rewriter that wants regions it calls the
function at once, so other code, and unwrapped models, see no difference. Inside one, the forward pass's
`region_fast` serves a call of a kind it has decided and checked (the common case, per layer per token);
any other gets a `RegionCall`: it traces the function on the call's shapes, matches the rule's pattern on
that graph and either runs the rewrite or the function as written (whose own calls are then decided one
by one).
"""

from __future__ import annotations

import importlib
import sys
import threading
from types import FrameType
from typing import Any, Callable

from . import intercept

_LOCK = threading.Lock()
_REAL: dict[str, Callable] = {}  # path -> the function the dispatcher stands in for


class LazyOperand:
    """An argument that stands for a tuple of arrays and makes them only when read: a packed cache's fetch,
    whose views a fused rewrite never needs. Iterating, indexing or `len` reads it as that tuple. A region's
    key reads `region_layout` in its place (it must fix everything about the arrays' dtypes and shapes but
    the region's free dims, as their key would), and the slow path takes `materialise()`, so a decode step
    that a rule's direct form serves makes none of them."""

    __slots__ = ()
    region_layout: tuple

    def materialise(self) -> tuple:
        raise NotImplementedError

    def __iter__(self):
        return iter(self.materialise())

    def __getitem__(self, index):
        return self.materialise()[index]

    def __len__(self) -> int:
        return len(self.materialise())


def concrete(value: Any) -> Any:
    """`value`, or the tuple a lazy operand stands for."""
    return value.materialise() if isinstance(value, LazyOperand) else value


class RegionCall:
    """One call of a region function: its arguments as passed, and where it was made (a plain slotted class:
    one is made per call, on a decode step's path)."""

    __slots__ = ("path", "real", "args", "kwargs", "caller")

    def __init__(self, path: str, real: Callable, args: tuple, kwargs: dict[str, Any], caller: FrameType | None):
        self.path, self.real, self.args, self.kwargs, self.caller = path, real, args, kwargs, caller

    @property
    def where(self) -> tuple[str, int] | None:
        """(file, line) of the call, read from the caller's frame only when asked (while the call runs)."""
        return None if self.caller is None else (self.caller.f_code.co_filename, self.caller.f_lineno)

    @property
    def api(self) -> str:
        """Observers see region calls beside API calls (the mlx-lm wrapper counts them as attention)."""
        return f"region:{self.path}"

    @property
    def location(self) -> str | None:
        return None if self.where is None else f"{self.where[0]}:{self.where[1]}"

    def run_original(self) -> Any:
        return _run(self.real, self.args, self.kwargs)


def _run(real: Callable, args: tuple, kwargs: dict[str, Any]) -> Any:
    """The function as written, lazy operands made into the tuples they stand for."""
    if any(isinstance(a, LazyOperand) for a in args) or any(isinstance(a, LazyOperand) for a in kwargs.values()):
        args = tuple(concrete(a) for a in args)
        kwargs = {name: concrete(value) for name, value in kwargs.items()}
    return real(*args, **kwargs)


def installed(path: str) -> bool:
    """Whether calls of the function at `path` go through a dispatcher (so it may be given lazy operands)."""
    return path in _REAL


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


MISS = object()  # a handler's `region_fast` did not serve the call: its `region` takes it


def _dispatcher(path: str, real: Callable) -> Callable:
    def dispatcher(*args: Any, **kwargs: Any) -> Any:
        handler = intercept.active_handler()
        fast = getattr(handler, "region_fast", None)
        if fast is None:
            return _run(real, args, kwargs)
        result = fast(path, args, kwargs)
        if result is MISS:
            result = handler.region(RegionCall(path, real, args, kwargs, sys._getframe(1)))
        return result

    dispatcher.__name__ = real.__name__
    dispatcher.__doc__ = real.__doc__
    dispatcher.__wrapped__ = real
    return dispatcher
