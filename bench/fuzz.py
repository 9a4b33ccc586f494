"""Differential fuzz of the rules: seeded random cases run through `mlxrewrite.compile` and eager mode,
checked against the dequantize-then-float reference (or float attention) and against the plain function.

Two families. GQA quantized attention (`QmmCase`): both calls of mlx-lm's pattern (scores, transposed; values,
not transposed) over B, n_kv, n_rep, M 1-16, N 1-3000 (unaligned too), D 64/128/256, 4/8 bits, group
32/64/128, float32/float16/bfloat16, the weights broadcast by `expand_dims`, by `broadcast_to`, on a
dim not adjacent to M, only for `w` (mixed layouts), or outside the function (an input view), caches
sliced to their length, rewrites forced (fold, copy, dequantize) and the rule's routes for simulated
CPU, Metal and CUDA (sm_80, sm_90) backends (the rewrite they choose runs here, on this device).
SDPA masks (`SdpaCase`): none, causal, constant all-True / zero / partly False / NaN / -inf, and runtime
masks (an input, derived from an input, left padding), eager with and without value checks.

A case fails when the routed result differs from the reference by more than the dtype's tolerance
(relative to the reference's largest magnitude; NaNs must be where the plain function has them), or from
the plain function by as much, or when anything raises. `tests/test_fuzz.py` runs a small seeded sample
in CI; `bench/fuzz_long.py` runs thousands and records the result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import re
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import mlx.core as mx

import mlxrewrite
from bench.common import forced
from mlxrewrite.backends.device import Backend

ROUTES = {"cpu": Backend("cpu"), "metal": Backend("metal", "applegpu_g13s"), "cuda_sm80": Backend("cuda", "sm_80"),
          "cuda_sm90": Backend("cuda", "sm_90")}
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
TOLERANCE = {"float32": 1e-3, "float16": 2e-2, "bfloat16": 6e-2}  # of max |reference|
QMM_LAYOUTS = ("expand_dims", "broadcast_to", "non_adjacent", "w_only", "outside", "dense")
MASKS = ("none", "causal", "all_true", "zero", "partly_false", "nan", "neg_inf", "input_bool", "input_additive",
         "derived", "padded")
PATHS = ("compile", "eager", "eager_checked")


@dataclass(frozen=True)
class QmmCase:
    seed: int
    b: int
    n_kv: int
    n_rep: int
    m: int
    n: int
    d: int
    bits: int
    group: int
    transpose: bool  # True: the scores call (x @ k^T); False: the values call (scores @ v)
    dtype: str
    layout: str
    sliced: bool  # the cache is a longer buffer sliced to n inside the function
    route: str
    force: str | None  # a rewrite forced wherever the rule fires
    path: str


@dataclass(frozen=True)
class SdpaCase:
    seed: int
    b: int
    n_kv: int
    n_rep: int
    l: int
    n: int
    d: int
    dtype: str
    mask: str
    route: str
    path: str


@dataclass
class Outcome:
    case: QmmCase | SdpaCase
    err_reference: float | None = None  # relative to max |reference|
    err_plain: float | None = None
    error: str | None = None  # what raised
    fired: str = "none"  # the rewrites that ran ("fold", "drop_mask", ...)
    flagged: tuple[str, ...] = ()  # explain()'s "!" lines: calls off the plan, rewrites refused by the guard
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        tol = TOLERANCE[self.case.dtype]
        return self.error is None and not self.flagged and self.err_reference is not None \
            and self.err_reference <= tol and self.err_plain is not None and self.err_plain <= tol


# ---- drawing cases ------------------------------------------------------------------------------------

def _n(rng: random.Random, large: bool) -> int:
    """A KV length: small, anything up to 600 (3000 in large runs), or near a power of two (large runs)."""
    options = [rng.randint(1, 64), rng.randint(1, 3000 if large else 600)]
    if large:
        options.append(rng.choice([128, 256, 512, 1024, 2048]) + rng.choice([-1, 0, 1, 17]))
    return rng.choice(options)


def draw_qmm(rng: random.Random, large: bool = False) -> QmmCase:
    d = rng.choice([64, 128, 256])
    dtype = rng.choices(list(DTYPES), weights=[6, 1, 1])[0]
    half = dtype != "float32"  # quantized matmul in half precision is slow on CPU: keep those cases small
    n = max(1, min(_n(rng, large), 256 if half else 3000))
    return QmmCase(seed=rng.randrange(2**31), b=rng.choice([1, 2]), n_kv=rng.choice([1, 2, 4]),
                   n_rep=rng.choice([1, 2, 2, 4, 4]), m=rng.randint(1, 4 if half else 16), n=n, d=d,
                   bits=rng.choice([4, 8]), group=rng.choice([g for g in (32, 64, 128) if g <= d]),
                   transpose=rng.random() < 0.5, dtype=dtype, layout=rng.choice(QMM_LAYOUTS),
                   sliced=rng.random() < 0.3, route=rng.choice(list(ROUTES)),
                   force=rng.choice([None, None, "fold", "copy", "dequantize"]), path=rng.choice(PATHS[:2]))


def draw_sdpa(rng: random.Random, large: bool = False) -> SdpaCase:
    n = _n(rng, large)
    return SdpaCase(seed=rng.randrange(2**31), b=rng.choice([1, 2]), n_kv=rng.choice([1, 2, 4]),
                    n_rep=rng.choice([1, 2, 4]), l=rng.randint(1, min(16, n)), n=n, d=rng.choice([64, 128]),
                    dtype=rng.choices(list(DTYPES), weights=[6, 1, 1])[0], mask=rng.choice(MASKS),
                    route=rng.choice(list(ROUTES)), path=rng.choice(PATHS))


# ---- GQA quantized matmul -----------------------------------------------------------------------------

def qmm_problem(case: QmmCase) -> tuple[Callable, tuple, mx.array]:
    """(function, its arguments, dequantize-then-float reference) for one case."""
    key = mx.random.key(case.seed)
    kx, kw = mx.random.split(key)
    dtype = DTYPES[case.dtype]
    buffer = case.n + (13 if case.sliced else 0)
    cache = (mx.random.normal((case.b, case.n_kv, buffer, case.d), key=kw)).astype(dtype)
    quantized = mx.quantize(cache, group_size=case.group, bits=case.bits)
    deq = mx.dequantize(*quantized, group_size=case.group, bits=case.bits)[..., :case.n, :]
    k = case.d if case.transpose else case.n
    adjacent = case.layout != "non_adjacent"
    heads = (case.n_kv, case.n_rep) if adjacent else (case.n_rep, case.n_kv)
    x = (mx.random.normal((case.b, *heads, case.m, k), key=kx) * k ** -0.5).astype(dtype)
    kv_axis = -3 if adjacent else -4  # where the un-broadcast cache gets its size-1 dim
    full = (case.b, *heads)
    params = dict(transpose=case.transpose, group_size=case.group, bits=case.bits)

    def spread(a: mx.array, how: str) -> mx.array:
        """A cache operand (B, n_kv, N, .) as the kernel's batch (B, heads, N, .), laid out as `how` says."""
        a = mx.expand_dims(a, kv_axis)
        if how == "expand_dims":
            return a  # MLX broadcasts it against x (stride 0)
        if how == "dense":
            return mx.broadcast_to(a, full + a.shape[-2:]) + mx.zeros((), a.dtype)  # a materialised copy
        return mx.broadcast_to(a, full + a.shape[-2:])

    def fn(x: mx.array, w: mx.array, s: mx.array, b: mx.array) -> mx.array:
        ops = [a[..., :case.n, :] for a in (w, s, b)] if case.sliced else [w, s, b]
        if case.layout == "outside":
            return mx.quantized_matmul(x, *ops, **params)
        if case.layout == "w_only":  # w broadcast, scales and biases with real (dense) batch dims
            ops = [spread(ops[0], "broadcast_to")] + [spread(a, "dense") for a in ops[1:]]
        else:
            how = {"non_adjacent": "expand_dims"}.get(case.layout, case.layout)
            ops = [spread(a, how) for a in ops]
        return mx.quantized_matmul(x, *ops, **params)

    args = tuple(quantized)
    if case.layout == "outside":  # broadcast views handed in: only the whole-function trace sees their strides
        args = tuple(mx.broadcast_to(mx.expand_dims(a, kv_axis), full + a.shape[-2:]) for a in args)
    deq_b = mx.expand_dims(deq, kv_axis).astype(mx.float32)
    x32 = x.astype(mx.float32)
    reference = x32 @ (mx.swapaxes(deq_b, -1, -2) if case.transpose else deq_b)
    return fn, (x, *args), reference


# ---- SDPA masks -------------------------------------------------------------------------------------

def sdpa_problem(case: SdpaCase) -> tuple[Callable, tuple, mx.array]:
    """(function, its arguments, float attention reference) for one case."""
    kq, kk, kv, km = mx.random.split(mx.random.key(case.seed), 4)
    dtype = DTYPES[case.dtype]
    hq = case.n_kv * case.n_rep
    q = mx.random.normal((case.b, hq, case.l, case.d), key=kq).astype(dtype)
    k = mx.random.normal((case.b, case.n_kv, case.n, case.d), key=kk).astype(dtype)
    v = mx.random.normal((case.b, case.n_kv, case.n, case.d), key=kv).astype(dtype)
    scale = case.d ** -0.5
    shape = (case.b, 1, case.l, case.n)
    cols = mx.arange(case.n)
    keep = cols[None] < case.n - 1 - mx.arange(case.l)[:, None] % max(case.n - 1, 1) if case.n > 1 else \
        mx.ones((case.l, case.n), mx.bool_)  # partly False, never a whole row
    padding = mx.array([0] + [min(2, case.n - 1)] * (case.b - 1))  # left padding per batch row (row 0: none)
    inputs: dict[str, mx.array] = {}
    if case.mask == "input_bool":
        inputs["m"] = mx.ones(shape, mx.bool_)
    elif case.mask == "input_additive":
        inputs["m"] = mx.zeros(shape, dtype)
    elif case.mask == "derived":
        inputs["m"] = mx.zeros((case.b, 1, 1, case.n), mx.float32)
    elif case.mask == "padded":
        inputs["m"] = padding

    def build_mask(extra: dict[str, mx.array]) -> Any:
        """The mask as the function builds it (constants, or from its inputs)."""
        return {
            "none": lambda: None,
            "causal": lambda: "causal",
            "all_true": lambda: mx.ones(shape, mx.bool_),
            "zero": lambda: mx.zeros(shape, dtype),
            "partly_false": lambda: mx.broadcast_to(keep, shape),
            "nan": lambda: mx.where((cols[None] == case.n - 1) & (mx.arange(case.l)[:, None] == 0),
                                    mx.array(math.nan, dtype), mx.array(0, dtype)),  # one NaN row
            "neg_inf": lambda: mx.where(mx.broadcast_to(keep, shape), mx.array(0, dtype), mx.array(-math.inf, dtype)),
            "input_bool": lambda: extra.get("m"),
            "input_additive": lambda: extra.get("m"),
            "derived": lambda: extra.get("m") > -1.0,
            "padded": lambda: (cols[None] >= extra.get("m")[:, None])[:, None, None, :],
        }[case.mask]()

    names = sorted(inputs)

    def fn(q: mx.array, k: mx.array, v: mx.array, *extra: mx.array) -> mx.array:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=build_mask(dict(zip(names, extra))))

    mask = build_mask(inputs)
    reference = float_attention(q, k, v, scale, mask, case.n_rep)
    return fn, (q, k, v, *(inputs[n] for n in names)), reference


def float_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: Any, n_rep: int) -> mx.array:
    """Attention in float32 with the kv heads repeated: the reference for every mask kind."""
    q, k, v = (a.astype(mx.float32) for a in (q, k, v))
    k, v = mx.repeat(k, n_rep, axis=1), mx.repeat(v, n_rep, axis=1)
    scores = (q * scale) @ mx.swapaxes(k, -1, -2)
    if isinstance(mask, str):  # causal, aligned to the end of the keys as MLX does
        l, n = scores.shape[-2:]
        mask = mx.arange(n)[None] <= mx.arange(l)[:, None] + (n - l)
    if mask is not None:
        scores = mx.where(mask, scores, -math.inf) if mask.dtype == mx.bool_ else scores + mask.astype(mx.float32)
    return mx.softmax(scores, axis=-1) @ v


# ---- running a case -----------------------------------------------------------------------------------

@contextlib.contextmanager
def simulated(route: str) -> Iterator[None]:
    """The rules see `route`'s backend (their decisions and rewrites run on this device)."""
    saved = Backend.__dict__["current"]
    Backend.current = classmethod(lambda cls: ROUTES[route])
    try:
        yield
    finally:
        Backend.current = saved


def routed(case: QmmCase | SdpaCase, fn: Callable) -> Callable:
    rules = [forced(case.force)] if getattr(case, "force", None) else None
    if case.path == "compile":
        return mlxrewrite.compile(fn, rules=rules)
    return mlxrewrite.eager(fn, rules=rules, check_values=case.path == "eager_checked")


def relative_error(out: mx.array, reference: mx.array, plain: mx.array) -> float:
    """max |out - reference| / max |reference| over finite entries; inf where NaNs differ from plain's."""
    out, reference, plain = (a.astype(mx.float32) for a in (out, reference, plain))
    if out.shape != reference.shape or not mx.array_equal(mx.isnan(out), mx.isnan(plain)).item():
        return math.inf
    finite = ~mx.isnan(reference) & ~mx.isnan(out)
    scale = max(mx.max(mx.where(finite, mx.abs(reference), 0)).item(), 1e-6)
    return mx.max(mx.where(finite, mx.abs(out - reference), 0)).item() / scale


def run(case: QmmCase | SdpaCase) -> Outcome:
    outcome = Outcome(case)
    start = time.perf_counter()
    try:
        fn, args, reference = (qmm_problem if isinstance(case, QmmCase) else sdpa_problem)(case)
        plain = fn(*args)
        with simulated(case.route), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fallbacks are allowed (they run as written); wrong numbers are not
            wrapped = routed(case, fn)
            out = wrapped(*args)
            mx.eval(out)
        explain = (wrapped.rewriter if case.path != "compile" else wrapped).explain()
        outcome.fired = "+".join(sorted(set(_FIRED.findall(explain)))) or "none"
        outcome.flagged = tuple(line.strip() for line in explain.splitlines() if line.strip().startswith("!"))
        outcome.err_reference = relative_error(out, reference, plain)
        outcome.err_plain = relative_error(out, plain, plain)
    except Exception as error:  # a crash is a failure like a wrong number
        outcome.error = f"{type(error).__name__}: {error}"
    outcome.seconds = time.perf_counter() - start
    return outcome


_FIRED = re.compile(r" -> (\w+)(?::| x\d)")  # "rule -> fold: why" (a decision), "rule -> fold x2" (eager counts)


def cases(count: int, seed: int, family: str, large: bool = False) -> list[QmmCase | SdpaCase]:
    rng = random.Random(f"{family}-{seed}")
    draw = draw_qmm if family == "qmm" else draw_sdpa
    return [draw(rng, large) for _ in range(count)]


def describe(outcome: Outcome) -> str:
    fields = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(outcome.case).items())
    return f"{type(outcome.case).__name__}({fields}): err vs reference {outcome.err_reference}, " \
           f"vs plain {outcome.err_plain}, error {outcome.error}"
