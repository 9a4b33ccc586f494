"""Backend facts the rules consult: where MLX's own dispatch sends a call, and which rewrite runs there.

Two sources, the second overriding the first bucket by bucket:

1. Thresholds read from MLX's C++ source (v0.32.1; see docs/design.md, "Sources"). This is the safe
   default, used wherever nothing was measured:
   - Metal `QuantizedMatmul::eval_gpu`: the vector kernels (qmv/qvm) run when M < `vector_limit`, which is 4
     for transpose=False and `get_qmv_batch_limit(K, N, device)` for transpose=True (table below).
   - CUDA `QuantizedMatmul::eval_gpu`: every kernel (qmv and qmm) indexes a broadcast weight as "matrix 0 for
     every batch", so all M are affected; w/scales/biases must be dense with row-major last two dims or MLX
     raises "No implementation for problem shape" (it never copies them).
   - CPU: correct for every M (measured); the rule still rewrites so that a graph audited on CPU behaves as
     it will on a GPU, and because fold is also faster there (bench/).
2. A profile that `mlxrewrite doctor` measured on this device with this MLX version (docs/doctor.md). Source
   facts go stale (a release fixes a kernel, a new chip gets new limits); a measurement of the running
   backend does not. For each bucket of broadcast quantized_matmul calls it says whether the call as
   shipped and each rewrite is right, wrong or unsupported, and how fast each is. A bucket the doctor did not
   get to (its time budget ran out) is recorded as not measured and keeps the source-derived choice, less
   the rewrites that failed in a measured bucket of the same kernel family (dtype, quantization, transpose,
   head dim): a JIT compile error for one head dim thus steers every call with that head dim away.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import mlx.core as mx

# get_qmv_batch_limit(K, N): (small: K,N <= 2048; mid: <= 4096; large), by (generation floor, 'd' class)
_QMV_LIMITS = [  # (min generation, size class test, (small, mid, large)), checked in this order
    (17, "not d", (33, 25, 13)),
    (15, "not d", (13, 15, 13)),
    (13, "d", (32, 18, 12)),
    (13, "any", (14, 10, 6)),
    (0, "d", (32, 18, 12)),
    (0, "any", (18, 12, 10)),
]
MAX_QMV_LIMIT = 33

ORIGINAL = "original"  # the call as written: a route that prefers it leaves the call alone
QMM_REWRITES = ("fold", "copy", "dequantize")
SOURCE_WAYS = ("fold", "copy")  # the source-derived choice for a hazardous call: fold, or copy when it cannot
# Buckets. M: Metal runs its vector kernel for M below a limit (4..33), so a bucket's smallest M shows whether
# any of it is wrong; CUDA switches from qmv to qmm kernels (with alignment needs) as M grows, so its largest
# shows whether any of it is unsupported. Weight rows (the KV length): get_qmv_batch_limit's size classes,
# and the alignments MLX's CUDA kernels test (128 for qmm_sm80, 8 for qmv and TMA).
M_BUCKETS: tuple[tuple[int, int | None], ...] = ((1, 1), (2, 3), (4, 7), (8, 15), (16, 31), (32, None))
ROW_CLASSES: tuple[int | None, ...] = (2048, 4096, None)  # upper bounds
ALIGNMENTS = (128, 8, 1)
M_LABELS = tuple(str(low) if low == high else f"{low}+" if high is None else f"{low}-{high}" for low, high in M_BUCKETS)
ROW_LABELS = tuple(f"<={bound}" if bound else f">{ROW_CLASSES[-2]}" for bound in ROW_CLASSES)
PROFILE_SCHEMA = 2  # 2: "not measured" and "crashed" statuses; every bucket of the grid is listed
# Statuses of a way in a bucket: "ok", "not measured", or the failures seen, joined ("wrong, unsupported")
OK, NOT_MEASURED = "ok", "not measured"
FAILURES = ("wrong", "unsupported", "crashed")  # crashed: it killed the GPU context or the process


class ProfileWarning(UserWarning):
    """A profile was found but not used (unreadable, or measured on another device or MLX version)."""


# ---- buckets and measurements ------------------------------------------------------------------------

def quantization(params: Mapping[str, Any]) -> tuple[str, int, int]:
    """(mode, bits, group_size) of a quantized call, with MLX's defaults filled in."""
    mode = params.get("mode") or "affine"
    bits = params.get("bits") or (8 if mode == "mxfp8" else 4)
    group_size = params.get("group_size") or {"affine": 64, "nvfp4": 16}.get(mode, 32)
    return mode, bits, group_size


def qmm_mkn(x_shape: tuple, w_shape: tuple, params: Mapping[str, Any]) -> tuple[int, int, int]:
    """M, K, N of quantized_matmul(x, w, ...): w is (N, K) packed when transposed, else (K, N) packed."""
    bits = quantization(params)[1]
    n = w_shape[-2] if params["transpose"] else w_shape[-1] * 32 // bits
    return x_shape[-2], x_shape[-1], n


@dataclass(frozen=True)
class QmmBucket:
    """The facts of a broadcast quantized_matmul call that decide which kernel runs, coarse enough that a
    decode loop (a growing KV length) crosses few buckets. Rows are the weight matrix's rows (the KV length
    in attention, for either transpose); d is its other dim, unpacked (the head dim), taken exactly."""

    dtype: str
    mode: str
    bits: int
    group_size: int
    transpose: bool
    m: str  # M bucket: "1", "2-3", ..., "32+"
    d: int
    rows: str  # rows size class: "<=2048", "<=4096", ">4096"
    align: int  # the largest of ALIGNMENTS dividing the rows

    @classmethod
    def of(cls, dtype: str, x_shape: tuple, w_shape: tuple, params: Mapping[str, Any]) -> "QmmBucket":
        mode, bits, group_size = quantization(params)
        m, k, n = qmm_mkn(x_shape, w_shape, params)
        rows = w_shape[-2]
        m_bucket = next(i for i, (_, high) in enumerate(M_BUCKETS) if high is None or m <= high)
        row_class = next(i for i, bound in enumerate(ROW_CLASSES) if bound is None or rows <= bound)
        return cls(dtype, mode, bits, group_size, bool(params["transpose"]), M_LABELS[m_bucket],
                   k if params["transpose"] else n, ROW_LABELS[row_class], next(a for a in ALIGNMENTS if rows % a == 0))

    @property
    def family(self) -> tuple:
        """The facts that pick a kernel family (and a JIT-compiled kernel's source), whatever M and the rows:
        on CUDA, d and the group size decide between the sm90, sm80 and naive kernels."""
        return self.dtype, self.mode, self.bits, self.group_size, self.transpose, self.d

    def label(self) -> str:
        return (f"{self.dtype} {self.mode} {self.bits}-bit g{self.group_size} transpose={self.transpose} "
                f"M {self.m} d {self.d} rows {self.rows} (multiple of {self.align})")


@dataclass(frozen=True)
class Measured:
    """One way of running a bucket's calls (as shipped, or one rewrite), over all the bucket's probes."""

    status: str  # OK | NOT_MEASURED | FAILURES seen, joined: "wrong", "unsupported", "wrong, unsupported", ...
    max_error: float | None = None  # largest max|out - ref| / max|ref| among the probes that ran
    us: float | None = None  # mean of its timed probes' median times; None when none ran
    error: str | None = None  # the first exception (or how the process died), when unsupported or crashed

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def failed(self) -> bool:
        return self.status not in (OK, NOT_MEASURED)


@dataclass(frozen=True)
class QmmVerdict:
    """What the doctor measured for one bucket."""

    bucket: QmmBucket
    probes: int  # how many probes stand for the bucket (each on a dense and a sliced cache)
    ways: Mapping[str, Measured]  # ORIGINAL and each of QMM_REWRITES

    @property
    def complete(self) -> bool:
        """Every rewrite has a verdict (ok needs every probe; a failure needs one), so routes may rank them."""
        return all(self.ways[name].status != NOT_MEASURED for name in QMM_REWRITES)

    @property
    def ranked(self) -> tuple[str, ...]:
        """The rewrites that were correct on every probe, fastest first."""
        times = {name: m.us for name, m in self.ways.items() if name != ORIGINAL and m.ok and m.us is not None}
        return tuple(sorted(times, key=times.__getitem__))

    @property
    def preference(self) -> tuple[str, ...]:
        """`ranked`, then dequantize (it needs no quantized kernel) as the last resort."""
        return tuple(dict.fromkeys((*self.ranked, "dequantize")))

    def describe(self) -> str:
        shipped = self.ways[ORIGINAL]
        error = f" (error {shipped.max_error:.1e})" if "wrong" in shipped.status else ""
        timed = ", ".join(f"{name} {self.ways[name].us:.0f} us" for name in self.ranked)
        return f"as shipped {shipped.status}{error}; correct rewrites, fastest first: {timed or 'none'}"


@dataclass(frozen=True, eq=False)
class Profile:
    """What `mlxrewrite doctor` measured on one device with one MLX version. Compared and hashed by content
    digest, so a Backend carrying it stays a cheap, stable cache key."""

    device: str
    backend: str
    mlx: str
    created: str
    qmm: Mapping[QmmBucket, QmmVerdict]
    notes: Mapping[str, Any] = field(default_factory=dict)  # what no rule consults (SDPA, gather_qmm, the run)

    @functools.cached_property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Profile) and other.digest == self.digest

    def __hash__(self) -> int:
        return hash(self.digest)

    def fits(self, backend: "Backend") -> bool:
        return (self.backend, self.device, self.mlx) == (backend.kind, backend.device, mx.__version__)

    @functools.cached_property
    def _family_failures(self) -> dict[tuple, frozenset[str]]:
        """Per kernel family, computed once: routes ask per traced call."""
        failed: dict[tuple, set[str]] = {}
        for verdict in self.qmm.values():
            found = failed.setdefault(verdict.bucket.family, set())
            found.update(name for name in QMM_REWRITES if verdict.ways[name].failed)
        return {family: frozenset(names) for family, names in failed.items()}

    def family_failures(self, bucket: QmmBucket) -> frozenset[str]:
        """The rewrites that failed in any bucket of `bucket`'s kernel family: an unmeasured bucket avoids them."""
        return self._family_failures.get(bucket.family, frozenset())

    def hazard_ways(self, bucket: QmmBucket) -> tuple[tuple[str, ...], str]:
        """The rewrites, in order, for a hazardous call in `bucket`, and why. Measured (every rewrite has a
        verdict): the correct ones, fastest first, then dequantize. Otherwise the source policy (fold, else
        copy), less what failed in the bucket's kernel family, then dequantize when anything was dropped."""
        verdict = self.qmm.get(bucket)
        if verdict is not None and verdict.complete:
            return verdict.preference, (f"measured by `mlxrewrite doctor` ({self.device}, MLX {self.mlx}) for "
                                        f"{bucket.label()}: {verdict.describe()}")
        failed = self.family_failures(bucket)
        why = f"{bucket.label()} not measured by `mlxrewrite doctor` ({self.device}, MLX {self.mlx})"
        if not failed:
            return SOURCE_WAYS, why
        ways = (*(w for w in SOURCE_WAYS if w not in failed), "dequantize")
        return ways, (f"{why}; {', '.join(sorted(failed))} failed in measured buckets of its kernel family, so "
                      "the source policy without them")

    def to_dict(self) -> dict[str, Any]:
        qmm = [{"bucket": asdict(v.bucket), "probes": v.probes, "ranked": list(v.ranked),  # ranked: for readers
                "ways": {name: asdict(m) for name, m in v.ways.items()}} for v in self.qmm.values()]
        return {"schema": PROFILE_SCHEMA, "device": self.device, "backend": self.backend, "mlx": self.mlx,
                "created": self.created, "qmm": qmm, "notes": dict(self.notes)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Profile":
        if data.get("schema") != PROFILE_SCHEMA:
            raise ValueError(f"profile schema {data.get('schema')!r}, this mlxrewrite reads {PROFILE_SCHEMA}")
        verdicts = (QmmVerdict(QmmBucket(**e["bucket"]), e["probes"],
                               {name: Measured(**m) for name, m in e["ways"].items()}) for e in data["qmm"])
        return cls(data["device"], data["backend"], data["mlx"], data["created"],
                   {v.bucket: v for v in verdicts}, data.get("notes", {}))


# ---- where profiles live -----------------------------------------------------------------------------

def profile_path(backend: "Backend") -> Path | None:
    """This backend's profile file: $MLXREWRITE_PROFILE (a path, or "off" for none), else one file per
    device, backend kind and MLX version in the user's cache, so a new MLX version starts unprofiled."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return _profile_path(os.environ.get("MLXREWRITE_PROFILE", ""), cache_home, backend.kind, backend.device,
                         mx.__version__)


@functools.lru_cache(maxsize=64)  # Backend.current() runs per trace and per eager forward pass: keep it cheap
def _profile_path(override: str, cache_home: str, kind: str, device: str, version: str) -> Path | None:
    if override.lower() == "off":
        return None
    if override:
        return Path(override).expanduser()
    slug = re.sub(r"[^a-z0-9.]+", "-", f"{kind} {device} mlx {version}".lower()).strip("-")
    return Path(cache_home) / "mlxrewrite" / f"profile-{slug}.json"


_LOADED: dict[tuple, "Profile | None"] = {}


def load_profile(backend: "Backend") -> Profile | None:
    """The profile for `backend`, read once per file version (cheap to call per trace)."""
    path = profile_path(backend)
    try:
        stat = path.stat() if path else None
    except OSError:
        return None
    if stat is None:
        return None
    key = (str(path), stat.st_mtime_ns, stat.st_size, backend.kind, backend.device, mx.__version__)
    if key not in _LOADED:
        _LOADED[key] = _read_profile(path, backend)
    return _LOADED[key]


def _read_profile(path: Path, backend: "Backend") -> Profile | None:
    try:
        profile = Profile.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as error:
        warnings.warn(f"mlxrewrite: ignoring profile {path}: {error}", ProfileWarning, stacklevel=4)
        return None
    if not profile.fits(backend):
        warnings.warn(f"mlxrewrite: ignoring profile {path}: measured on {profile.backend} {profile.device!r} with "
                      f"MLX {profile.mlx}, this is {backend.kind} {backend.device!r} with MLX {mx.__version__}; "
                      "run `mlxrewrite doctor` again", ProfileWarning, stacklevel=4)
        return None
    return profile


def write_profile(profile: Profile, path: Path) -> None:
    """Write atomically, so a process loading it meanwhile never reads half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + f".{os.getpid()}.tmp")
    partial.write_text(json.dumps(profile.to_dict(), indent=1))
    os.replace(partial, path)


# ---- the backend ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Backend:
    """The device a call runs on, what we know of its architecture, and what was measured on it."""

    kind: str  # "cpu" | "metal" | "cuda"
    arch: str = ""
    device: str = ""  # the device's name: with kind and MLX's version, what a profile belongs to
    profile: Profile | None = field(default=None, repr=False)

    @classmethod
    def current(cls) -> "Backend":
        """The default device, with its profile when one was measured (and MLXREWRITE_PROFILE is not off)."""
        bare = device_backend()
        profile = load_profile(bare)
        return bare if profile is None else dataclasses.replace(bare, profile=profile)


def device_backend() -> Backend:
    """The default device without a profile (what the doctor measures for)."""
    return _device_backend(mx.default_device().type == mx.cpu)


@functools.lru_cache(maxsize=None)
def _device_backend(cpu: bool) -> Backend:
    try:
        info = mx.device_info(mx.default_device())
    except (AttributeError, RuntimeError, TypeError, ValueError):  # best effort: a name only keys the profile
        info = {}
    name = str(info.get("device_name") or info.get("architecture") or "")
    if cpu:
        return Backend("cpu", device=name)
    if mx.metal.is_available():
        return Backend("metal", str(info.get("architecture", "")), name)
    return Backend("cuda", str(info.get("architecture", "")), name)  # "sm_90": which qmm kernels exist


# ---- source-derived facts (the default) ------------------------------------------------------------------

def metal_vector_limit(k: int, n: int, transpose: bool, arch: str) -> int:
    """MLX's Metal threshold: M below this runs the vector kernel (the one that misreads stride-0 batches)."""
    if not transpose:
        return 4
    size = 0 if k <= 2048 and n <= 2048 else 1 if k <= 4096 and n <= 4096 else 2
    match = re.search(r"g(\d+)([a-z])", arch)
    if not match:
        return MAX_QMV_LIMIT  # unknown chip: assume the largest limit MLX uses anywhere
    gen, size_class = int(match.group(1)), match.group(2)
    for min_gen, class_test, limits in _QMV_LIMITS:
        class_ok = class_test == "any" or (size_class == "d") == (class_test == "d")
        if gen >= min_gen and class_ok:
            return limits[size]
    return MAX_QMV_LIMIT


def qmm_hazard_applies(backend: Backend, m: int, k: int, n: int, transpose: bool) -> tuple[bool, str]:
    """Does MLX's kernel for this call read stride-0 weight batches wrongly? (answer, reason)."""
    if backend.kind == "metal":
        limit = metal_vector_limit(k, n, transpose, backend.arch)
        if m < limit:
            return True, f"Metal vector kernel runs for M={m} < {limit} (get_qmv_batch_limit)"
        return False, f"Metal matrix kernel runs for M={m} >= {limit}; it handles broadcast batches"
    if backend.kind == "cuda":
        return True, "CUDA kernels use matrix 0 for every batch of a broadcast weight (any M)"
    return True, "CPU is correct, but the rewrite keeps CPU and GPU graphs alike and is faster"


# ---- the decision --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class QmmRoute:
    """How to run one broadcast quantized_matmul call: ways in order of preference, and why. Hashable and
    free of exact KV lengths, so eager mode keys its cached decisions on it (equal routes, equal decisions)."""

    ways: tuple[str, ...]  # ORIGINAL (leave the call) or rewrite names; always holds one that is not "fold"
    why: str

    def choose(self, foldable: bool) -> str | None:
        """The first way that applies (fold needs every weight operand broadcast on the same dims); None:
        leave the call as written."""
        way = next(w for w in self.ways if foldable or w != "fold")
        return None if way == ORIGINAL else way


def qmm_route(backend: Backend, dtype: str, x_shape: tuple, w_shape: tuple, params: Mapping[str, Any]) -> QmmRoute:
    """The source-derived hazard, refined by the profile where it measured the call's bucket.

    A measurement may only add caution and pick among correct rewrites: the call is left as written only
    where the source facts call the kernel right and the profile measured it right too (leaving a call
    alone is the one choice whose correctness rests on a bucket's probes standing for all its shapes, and
    on CPU the rule rewrites on purpose, so that CPU audits show what GPUs need). Elsewhere it takes the
    fastest rewrite measured correct, then dequantize. Where the bucket was not measured: fold, or copy, less
    the rewrites that failed in the bucket's kernel family (then dequantize)."""
    from mlxrewrite.rules.qmm_dispatch import cuda_qmm_wrong  # here: importing the rules package imports this module

    hazardous, why = qmm_hazard_applies(backend, *qmm_mkn(x_shape, w_shape, params), bool(params["transpose"]))
    rows = math.prod(x_shape[:-1]) * math.prod(w_shape[:-2])  # > 1 exactly where M times the batch count is
    wrong = cuda_qmm_wrong(backend, dtype, rows, x_shape[-1], params)
    if wrong:  # no measurement of a bucket stands against a kernel that is wrong for every layout
        return QmmRoute(("dequantize",), f"{why}; {wrong}")
    if backend.profile is None:
        return QmmRoute(SOURCE_WAYS if hazardous else (ORIGINAL,), why)
    bucket = QmmBucket.of(dtype, x_shape, w_shape, params)
    ways, measured = backend.profile.hazard_ways(bucket)
    verdict = backend.profile.qmm.get(bucket)
    shipped = verdict.ways[ORIGINAL] if verdict is not None else Measured(NOT_MEASURED)
    # measured: it must have been right; not measured: the source facts stand unless a probe found it wrong
    shipped_right = shipped.ok if verdict is not None and verdict.complete else not shipped.failed
    if not hazardous and shipped_right:
        return QmmRoute((ORIGINAL,), f"{why}; {measured}")
    return QmmRoute(ways, f"{why}; {measured}")
