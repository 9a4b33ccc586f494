"""Interception of the MLX API calls that rules rewrite.

Each API (`mx.quantized_matmul`, `mx.fast.scaled_dot_product_attention`) has a thin dispatcher. Inside
`handling(h)` (a context variable, so threads do not see each other's handlers) a dispatcher wraps the
arguments in a `Call` and lets `h` decide what to return; with no handler of its own context it calls
MLX at once. Tracing records calls; lowering applies rewrites.

Where the dispatchers are visible: while any `handling()` context is open, MLX's own functions are
replaced by them (`patch_mlx=True`, for tracing arbitrary user code); otherwise MLX is left untouched,
so code outside mlxrewrite pays nothing. The mlx-lm wrapper runs on every token, so it takes a
narrower route: `instrumented_mlx()` is a view of the `mlx.core` namespace with the dispatchers in
place, which the wrapper gives to the model's own code modules (not to `mlx.nn`'s linear layers), and
a `Gate` passes the calls no rule can rewrite straight through, judged on the raw arguments. The view is
live, not a snapshot: calls it does not hand to a handler go to what MLX's names hold at that moment.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import sys
import threading
import types
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

_ORIGINALS: dict[str, Callable] = {name: getattr(spec.module, spec.attr) for name, spec in APIS.items()}
_ACTIVE: contextvars.ContextVar["tuple[Callable[[Call], Any], Gate | None] | None"] = contextvars.ContextVar(
    "mlxrewrite_handler", default=None)
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # mlxrewrite/, not core/
_EXAMPLES_DIR = os.path.join(_PACKAGE_DIR, "examples")  # user code, though shipped inside the package


class Call:
    """One intercepted API call: its array operands and static parameters by name, and where it was made.

    One is made for every call inside `handling()`, so it costs little until asked: the arguments are
    bound by name on first use of `operands`/`params`, the location is formatted on first use of
    `location`, and `run_original()` without overrides passes the arguments on exactly as given.
    """

    __slots__ = ("api", "_args", "_kwargs", "_bound", "_where")

    def __init__(self, api: str, operands: dict[str, mx.array | None], params: dict[str, Any],
                 location: str | None = None):
        self.api = api
        self._args: tuple | None = None
        self._kwargs: dict[str, Any] = {}
        self._bound: tuple[dict, dict] | None = (operands, params)
        self._where: str | tuple[str, int] | None = location

    @classmethod
    def intercepted(cls, spec: ApiSpec, args: tuple, kwargs: dict[str, Any],
                    where: tuple[str, int] | None) -> "Call":
        """A call as the dispatcher saw it (binding and location left for later)."""
        call = cls.__new__(cls)
        call.api, call._args, call._kwargs, call._bound, call._where = spec.name, args, kwargs, None, where
        return call

    @property
    def operands(self) -> dict[str, mx.array | None]:
        return (self._bound or self._bind())[0]

    @property
    def params(self) -> dict[str, Any]:
        return (self._bound or self._bind())[1]

    @property
    def location(self) -> str | None:
        """file:line of the user's call site."""
        if isinstance(self._where, tuple):
            self._where = f"{self._where[0]}:{self._where[1]}"
        return self._where

    def argument(self, name: str) -> Any:
        """One argument by name, as passed (a mask may be "causal"), without binding the others: for
        checks made on every call."""
        if self._bound is not None:
            operands, params = self._bound
            return operands[name] if name in operands else params.get(name)
        return _argument(APIS[self.api], self._args, self._kwargs, name)

    def _bind(self) -> tuple[dict, dict]:
        self._bound = bind(APIS[self.api], self._args, self._kwargs)
        return self._bound

    def run_original(self, **overrides: Any) -> mx.array:
        """Call the unpatched MLX function, with some operands or parameters replaced."""
        if self._args is not None and not overrides:
            return original(self.api)(*self._args, **self._kwargs)
        return _invoke(original(self.api), self.api, {**self.operands, **self.params, **overrides})

    def dispatch(self, **overrides: Any) -> mx.array:
        """Call the API through its dispatcher (so the active handler sees it), operands replaced."""
        return _invoke(_DISPATCHERS[self.api], self.api, {**self.operands, **self.params, **overrides})

    def shape_of(self, name: str) -> tuple[int, ...] | None:
        array = self.operands.get(name)
        return None if array is None else tuple(array.shape)


def _argument(spec: ApiSpec, args: tuple, kwargs: dict[str, Any], name: str) -> Any:
    if name in kwargs:
        return kwargs[name]
    position = _position(spec, name)
    return args[position] if position < len(args) else spec.defaults.get(name)


class Gate:
    """Which calls a handler wants, judged on the raw arguments (no `Call`, no binding).

    Per API, a list of requirements, each a mapping operand -> fewest dims: a call is admitted when, for
    some requirement, every named operand is an array with at least that many dims. An empty
    requirement admits every call of its API; calls of APIs not named are never admitted.
    """

    def __init__(self, requirements: dict[str, list[dict[str, int]]]):
        unknown = set(requirements) - set(APIS)
        if unknown:
            raise ValueError(f"Gate names unknown APIs {sorted(unknown)}; known: {sorted(APIS)}")
        self._checks = {api: tuple(tuple((_position(APIS[api], name), name, dims) for name, dims in needs.items())
                                   for needs in needs_list) for api, needs_list in requirements.items()}

    def admits(self, spec: ApiSpec, args: tuple, kwargs: dict[str, Any]) -> bool:
        """Runs on every call while a gated handler is active: index lookups, no binding."""
        for checks in self._checks.get(spec.name, ()):
            for position, name, dims in checks:
                value = args[position] if position < len(args) else kwargs.get(name)
                if not isinstance(value, mx.array) or value.ndim < dims:
                    break
            else:
                return True
        return False


def _position(spec: ApiSpec, name: str) -> int:
    """Where `name` is passed positionally; past the end for keyword-only parameters."""
    return spec.positional.index(name) if name in spec.positional else len(spec.positional)


def _invoke(fn: Callable, api: str, kwargs: dict[str, Any]) -> mx.array:
    leading = [kwargs.pop(name) for name in APIS[api].positional[:3]]
    return fn(*leading, **kwargs)


def original(api: str) -> Callable:
    """The MLX function behind a dispatcher: what MLX's name holds now (someone's patch, such as a
    `unittest.mock.patch`, included), or MLX's own function while the name holds the dispatcher."""
    spec = APIS[api]
    current = getattr(spec.module, spec.attr)
    return _ORIGINALS[api] if current is _DISPATCHERS.get(api) else current


def _make_dispatcher(spec: ApiSpec, real: Callable) -> Callable:
    """The dispatcher of `spec`'s API; `real` is MLX's function (its name and docs)."""
    def dispatcher(*args: Any, **kwargs: Any) -> Any:
        active = _ACTIVE.get()
        if active is None or "stream" in kwargs or (active[1] is not None and not active[1].admits(spec, args, kwargs)):
            return original(spec.name)(*args, **kwargs)
        return active[0](Call.intercepted(spec, args, kwargs, _caller()))

    dispatcher.__name__ = spec.attr
    dispatcher.__doc__ = real.__doc__
    dispatcher.__wrapped__ = real
    return dispatcher


_DISPATCHERS: dict[str, Callable] = {name: _make_dispatcher(spec, _ORIGINALS[name]) for name, spec in APIS.items()}


class _MlxPatch:
    """MLX's functions replaced by the dispatchers while at least one `handling(patch_mlx=True)` is open."""

    def __init__(self) -> None:
        self.depth = 0
        self.lock = threading.Lock()
        self.mlx_functions = dict(_ORIGINALS)

    def enter(self) -> None:
        with self.lock:
            self.depth += 1
            if self.depth == 1:
                self._set(_DISPATCHERS, replacing=self.mlx_functions)

    def exit(self) -> None:
        with self.lock:
            self.depth -= 1
            if self.depth == 0:
                self._set(self.mlx_functions, replacing=_DISPATCHERS)

    @staticmethod
    def _set(functions: dict[str, Callable], replacing: dict[str, Callable]) -> None:
        for name, spec in APIS.items():
            if getattr(spec.module, spec.attr) is replacing[name]:  # leave someone else's patch alone
                setattr(spec.module, spec.attr, functions[name])


_PATCH = _MlxPatch()


class _LiveView(types.ModuleType):
    """A module that is `target` (every attribute looked up there at each use, so later patches of MLX, e.g.
    `unittest.mock.patch("mlx.core.fast.scaled_dot_product_attention")`, are seen), except the names set
    on the view itself: the dispatchers, and views of the submodules that hold them."""

    def __init__(self, target: types.ModuleType):
        super().__init__(target.__name__, target.__doc__)
        self.__dict__["_mlxrewrite_target"] = target

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_mlxrewrite_target"], name)

    def __dir__(self) -> list[str]:
        return dir(self.__dict__["_mlxrewrite_target"])


def instrumented_mlx() -> types.ModuleType:
    """`mlx.core` as a code module that should reach the dispatchers sees it: a live view of it (and of
    each submodule an API lives in, such as `mx.fast`) with the intercepted APIs replaced by their
    dispatchers. A dispatcher with no handler of its context calls whatever MLX's name holds now, so
    code using the view behaves as with `mlx.core` itself (unwrapped models of a wrapped architecture)."""
    return _instrumented_views()[id(mx)]


@functools.cache
def _instrumented_views() -> dict[int, types.ModuleType]:
    """id of `mlx.core` and of each submodule holding an API -> its view."""
    views: dict[int, types.ModuleType] = {}
    for module in [mx] + [spec.module for spec in APIS.values()]:
        views.setdefault(id(module), _LiveView(module))
    core = views[id(mx)]
    for view in views.values():
        if view is not core:
            setattr(core, view.__name__.rsplit(".", 1)[-1], view)
    for name, spec in APIS.items():
        setattr(views[id(spec.module)], spec.attr, _DISPATCHERS[name])
    return views


def bind(spec: ApiSpec, args: tuple, kwargs: dict) -> tuple[dict[str, mx.array | None], dict[str, Any]]:
    """The arguments of one call of `spec`'s API by name: (array operands, static parameters)."""
    if len(args) > len(spec.positional):
        raise TypeError(f"{spec.name}() takes at most {len(spec.positional)} positional arguments")
    bound = {**spec.defaults, **dict(zip(spec.positional, args)), **kwargs}
    operands = {name: bound.pop(name, None) for name in spec.operands}
    if isinstance(operands.get("mask"), str):  # "causal" is a mode, not an operand
        bound["mask"] = operands.pop("mask")
    return operands, bound


def _caller() -> tuple[str, int] | None:
    """(file, line) of the nearest frame outside mlxrewrite: the user's call site."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR) \
            and not frame.f_code.co_filename.startswith(_EXAMPLES_DIR):
        frame = frame.f_back
    return None if frame is None else (frame.f_code.co_filename, frame.f_lineno)


_INSTRUMENTED: dict[str, tuple[int, dict[str, Any]]] = {}  # module -> (users, the globals it had)
_INSTRUMENT_LOCK = threading.Lock()


def instrument(module: types.ModuleType) -> None:
    """Let `module`'s code reach the dispatchers: its globals naming `mlx.core` (or `mlx.core.fast`) are
    pointed at `instrumented_mlx()`'s views. Counted: `release` undoes it when its last user lets go."""
    copies = _instrumented_views()
    with _INSTRUMENT_LOCK:
        users, saved = _INSTRUMENTED.get(module.__name__, (0, {}))
        if not users:
            saved = {name: value for name, value in vars(module).items() if id(value) in copies}
            for name, value in saved.items():
                setattr(module, name, copies[id(value)])
        _INSTRUMENTED[module.__name__] = (users + 1, saved)


def release(module: types.ModuleType) -> None:
    """One user of `instrument(module)` is done; the last one restores the module's globals."""
    with _INSTRUMENT_LOCK:
        users, saved = _INSTRUMENTED.pop(module.__name__, (0, {}))
        if users > 1:
            _INSTRUMENTED[module.__name__] = (users - 1, saved)
        else:
            vars(module).update(saved)


def active_handler() -> Callable[[Call], Any] | None:
    """The handler routing this context's calls (None outside `handling`): regions.py asks it too."""
    active = _ACTIVE.get()
    return None if active is None else active[0]


def activate(handler: Callable[[Call], Any], gate: Gate | None = None, patch_mlx: bool = True) -> contextvars.Token:
    """Start routing intercepted calls in this context (thread / task) to `handler`: all of them, or those
    `gate` admits (the others run as written). Pair with `deactivate`; `handling` does both.

    With `patch_mlx`, MLX's functions are the dispatchers until then, so any code calling
    `mx.quantized_matmul` reaches them (calls from other threads find no handler and run as written).
    Without, only calls through `instrumented_mlx()` or `Call.dispatch` do.
    """
    if patch_mlx:
        _PATCH.enter()
    return _ACTIVE.set((handler, gate))


def deactivate(token: contextvars.Token, patch_mlx: bool = True) -> None:
    _ACTIVE.reset(token)
    if patch_mlx:
        _PATCH.exit()


@contextlib.contextmanager
def handling(handler: Callable[[Call], Any], gate: Gate | None = None, patch_mlx: bool = True) -> Iterator[None]:
    """`activate` for the body of a `with` statement."""
    token = activate(handler, gate, patch_mlx)
    try:
        yield
    finally:
        deactivate(token, patch_mlx)
