"""The backend a call runs on, and what `mlxrewrite doctor` measured there (docs/doctor.md).

Rules read facts of MLX's source (rules/qmm_dispatch.py), which go stale: a release fixes a kernel, a new chip
gets new limits. A profile measured on this device with this MLX version does not. This module knows only
the generic part: which backend and device, the profile file (where it lives, its format, when it is stale),
and the verdict vocabulary. What is measured, and how a rule reads it, is the rule's: a profile holds one
section per rule, a list of buckets each keyed the rule's own way (rules/qmm_profile.py reads the
quantized_matmul one).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

import mlx.core as mx

PROFILE_SCHEMA = 3  # 3: one section per rule; 2: "not measured" and "crashed"; every bucket of the grid listed
# Statuses of a way in a bucket: "ok", "not measured", or the failures seen, joined ("wrong, unsupported")
OK, NOT_MEASURED = "ok", "not measured"
FAILURES = ("wrong", "unsupported", "crashed")  # crashed: it killed the GPU context or the process

T = TypeVar("T")


class ProfileWarning(UserWarning):
    """A profile was found but not used (unreadable, of another schema, or measured on another device or MLX
    version)."""


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
class Bucket:
    """What a profile says of one bucket of a rule's calls: each way's verdict over the bucket's probes."""

    key: Mapping[str, Any]  # the rule's bucket, as the rule writes it (plain JSON values)
    probes: int  # how many probes stand for the bucket
    ways: Mapping[str, Measured]


@dataclass(frozen=True, eq=False)
class Profile:
    """What `mlxrewrite doctor` measured on one device with one MLX version. Compared and hashed by content
    digest, so a Backend carrying it stays a cheap, stable cache key."""

    device: str
    backend: str
    mlx: str
    created: str
    rules: Mapping[str, tuple[Bucket, ...]]  # rule name (or a report-only probe's) -> its buckets, measured or not
    notes: Mapping[str, Any] = field(default_factory=dict)  # the run: grid, budget, time, why it stopped, ...
    _decoded: dict = field(default_factory=dict, init=False, repr=False)

    @functools.cached_property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Profile) and other.digest == self.digest

    def __hash__(self) -> int:
        return hash(self.digest)

    def fits(self, backend: "Backend") -> bool:
        return (self.backend, self.device, self.mlx) == (backend.kind, backend.device, mx.__version__)

    def decoded(self, rule: str, decode: Callable[["Profile", tuple[Bucket, ...]], T]) -> T | None:
        """`decode(self, rule's buckets)`, computed once per profile (rules ask per traced call); None where the
        profile has no section for `rule`."""
        if rule not in self.rules:
            return None
        if (rule, decode) not in self._decoded:
            self._decoded[rule, decode] = decode(self, self.rules[rule])
        return self._decoded[rule, decode]

    def to_dict(self) -> dict[str, Any]:
        rules = {name: [{"bucket": dict(b.key), "probes": b.probes, "ways": {w: asdict(m) for w, m in b.ways.items()}}
                        for b in buckets] for name, buckets in self.rules.items()}
        return {"schema": PROFILE_SCHEMA, "device": self.device, "backend": self.backend, "mlx": self.mlx,
                "created": self.created, "rules": rules, "notes": dict(self.notes)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Profile":
        if data.get("schema") != PROFILE_SCHEMA:
            raise ValueError(f"profile schema {data.get('schema')!r}, this mlxrewrite reads {PROFILE_SCHEMA}; run "
                             "`mlxrewrite doctor` to measure again")
        rules = {name: tuple(Bucket(e["bucket"], e["probes"], {w: Measured(**m) for w, m in e["ways"].items()})
                             for e in entries) for name, entries in data["rules"].items()}
        return cls(data["device"], data["backend"], data["mlx"], data["created"], rules, data.get("notes", {}))


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
