"""mlxrewrite doctor: verdicts against a fake backend with known faults (wrong, unsupported, JIT errors for
one head dim, lost contexts, crashed and hung processes), the rules routing around them, the time budget,
profile caching and invalidation, eager-mode recorded facts, the command line."""

import dataclasses
import json
import os
import time
from typing import Callable

import mlx.core as mx
import pytest

import mlxrewrite
import mlxrewrite.doctor
from mlxrewrite import cli, doctor
from mlxrewrite.backends.device import (NOT_MEASURED, Backend, Bucket, Measured, Profile, ProfileWarning, device_backend,
                                profile_path)
from mlxrewrite.core.decide import call_facts, decide_site
from mlxrewrite.core.eager import trace_one_call
from mlxrewrite.examples.gqa_quantized_attention import broadcast_cache
from mlxrewrite.core.facts import ArrayEnv
from mlxrewrite.rules import qmm_probes, qmm_profile, sdpa_noop_mask, sdpa_probes
from mlxrewrite.rules import quantized_matmul_broadcast as qmb
from mlxrewrite.rules.qmm_profile import ORIGINAL, QMM_REWRITES, QmmBucket, QmmVerdict

# Small and fast on CPU: d=64, rows 256 (aligned) and 255 (not), M buckets 1, 2-3, 4-7; one SDPA shape
GRID = qmm_probes.Grid("test", ("float32",), (4,), m_buckets=3, rows=(256, 255), d=(64,), iters=1, gather_m=(1,))
SDPA = sdpa_probes.Grid("test", "float32", ((64, 1, 256),), iters=1)
NO_IMPLEMENTATION = "[quantized_matmul] No implementation for problem shape"
JIT_ERROR = ('Failed to compile kernel: /tmp/site/nvidia/cu13/include/mma.h(55): catastrophic error: cannot open '
             'source file "crt/mma.h"')  # what the H100 raised for folded d=64 calls (its CUDA headers are missing)
LOST_CONTEXT = "cuGraphAddKernelNode(&node, graph_, NULL, 0, &params) failed: an illegal memory access was encountered"


@dataclasses.dataclass(frozen=True)
class Problem:
    """What a fault may depend on, of one quantized_matmul kernel call."""

    broadcast: bool  # the weights' batch dims broadcast against x's (the call as shipped)
    m: int
    rows: int  # the weights' rows
    d: int  # the head dim
    folded: bool  # x's repeat dim folded into M (the fold rewrite)


Fault = Callable[[Problem], bool]
NEVER: Fault = lambda p: False


def broadcast(x: mx.array, w: mx.array) -> bool:
    """Does MLX broadcast w's batch dims against x's (a size-1 weight dim against a larger x dim)?"""
    pairs = zip(reversed(x.shape[:-2]), reversed(w.shape[:-2]))
    return any(wd == 1 and xd > 1 for xd, wd in pairs)


def problem(x: mx.array, w: mx.array, params: dict) -> Problem:
    d = x.shape[-1] if params["transpose"] else w.shape[-1] * 32 // params["bits"]
    return Problem(broadcast(x, w), x.shape[-2], w.shape[-2], d, x.shape[-3] == 1)


class FakeKernels(doctor.Kernels):
    """MLX on CPU, but wrong (CUDA's bug: weight matrix 0 for every batch) or raising `error` where told."""

    def __init__(self, wrong: Fault = NEVER, unsupported: Fault = NEVER, error: str = NO_IMPLEMENTATION,
                 sdpa_mask_off: bool = False, gather_fails: bool = False):
        self.wrong, self.unsupported, self.error = wrong, unsupported, error
        self.sdpa_mask_off, self.gather_fails = sdpa_mask_off, gather_fails

    def quantized_matmul(self, x, w, scales, biases=None, **params):
        call = problem(x, w, params)
        if self.unsupported(call):
            raise RuntimeError(f"{self.error}: {x.shape[-2]}x{w.shape[-2]}")
        if self.wrong(call):
            first = tuple(slice(0, 1) for _ in w.shape[:-2])
            w, scales, biases = (None if a is None else a[first] for a in (w, scales, biases))
        return super().quantized_matmul(x, w, scales, biases, **params)

    def scaled_dot_product_attention(self, q, k, v, **params):
        out = super().scaled_dot_product_attention(q, k, v, **params)
        return out * 1.5 if self.sdpa_mask_off and params.get("mask") is not None else out

    def gather_qmm(self, x, w, scales, biases=None, **params):
        if self.gather_fails:
            raise ValueError("[gather_qmm] No implementation for problem shape")
        return super().gather_qmm(x, w, scales, biases, **params)


def expected_statuses(grid: qmm_probes.Grid, wrong: Fault, unsupported: Fault) -> dict[QmmBucket, dict[str, str]]:
    """What each way must measure, from the faults and the kernel call each way makes: as shipped calls with
    broadcast weights, fold with dense weights and N_REP * M rows of x, copy with dense weights, dequantize
    with no quantized kernel at all."""
    calls = {ORIGINAL: lambda p: Problem(True, p.m, p.rows, p.d, False),
             "fold": lambda p: Problem(False, qmm_probes.N_REP * p.m, p.rows, p.d, True),
             "copy": lambda p: Problem(False, p.m, p.rows, p.d, False)}
    flags: dict[QmmBucket, dict[str, set]] = {}
    for probe in grid.probes():
        ways = flags.setdefault(probe.bucket, {name: set() for name in (ORIGINAL, *QMM_REWRITES)})
        for name, call in calls.items():
            if unsupported(call(probe)):
                ways[name].add("unsupported")
            elif wrong(call(probe)):
                ways[name].add("wrong")
    return {bucket: {name: ", ".join(s for s in ("wrong", "unsupported") if s in found) or "ok"
                     for name, found in ways.items()} for bucket, ways in flags.items()}


def qmm(profile: Profile) -> dict[QmmBucket, QmmVerdict]:
    """What the profile measured of the broadcast rule's buckets, as the rules read it."""
    return qmm_profile.measured(profile, qmb.NAME).verdicts


def measured_statuses(profile: Profile) -> dict[QmmBucket, dict[str, str]]:
    return {bucket: {name: m.status for name, m in v.ways.items()} for bucket, v in qmm(profile).items()}


def reported(profile: Profile) -> list[str]:
    """The statuses of what is only reported: SDPA's masked call per shape, then gather_qmm per shape."""
    return ([b.ways["mask"].status for b in profile.rules[sdpa_noop_mask.NAME]]
            + [b.ways["gather_qmm"].status for b in profile.rules[qmm_probes.GATHER]])


def with_verdicts(*verdicts: QmmVerdict, kind: str = "cuda") -> Profile:
    """A profile holding these verdicts of the broadcast rule's buckets, as the doctor writes them."""
    buckets = tuple(Bucket(dataclasses.asdict(v.bucket), v.probes, v.ways) for v in verdicts)
    return Profile("x", kind, mx.__version__, "now", {qmb.NAME: buckets})


# A Metal-like fault (vector kernel for M < 4 wrong from M = 2) and a CUDA-like one (wrong for every M;
# kernels without broadcast raise for rows not a multiple of 8)
METAL_WRONG: Fault = lambda p: p.broadcast and 2 <= p.m < 4
CUDA_WRONG: Fault = lambda p: p.broadcast
UNALIGNED_UNSUPPORTED: Fault = lambda p: not p.broadcast and p.rows % 8 != 0


@pytest.fixture(autouse=True)
def no_user_cache(tmp_path, monkeypatch):
    """Whatever a test does, the user's real cache is neither read nor written."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("MLXREWRITE_PROFILE", raising=False)


@pytest.fixture
def profile_file(tmp_path, monkeypatch):
    """Profiles go to (and are read from) a temporary file, never the user's cache."""
    path = tmp_path / "profile.json"
    monkeypatch.setenv("MLXREWRITE_PROFILE", str(path))
    return path


def measure(wrong: Fault = NEVER, unsupported: Fault = NEVER, error: str = NO_IMPLEMENTATION,
            grid: qmm_probes.Grid = GRID, **options) -> Profile:
    return doctor.run(grids=(grid, SDPA), kernels=FakeKernels(wrong, unsupported, error), progress=False, **options)


_PROFILES: dict = {}


def cached_measure(name: str, wrong: Fault, unsupported: Fault) -> Profile:
    """One doctor run per fault scenario for the whole module (each takes about a second)."""
    if name not in _PROFILES:
        _PROFILES[name] = measure(wrong, unsupported, save=False)
    return _PROFILES[name]


# ---- the doctor finds exactly the injected faults --------------------------------------------------------

@pytest.mark.parametrize("name,wrong,unsupported", [
    ("healthy", NEVER, NEVER),
    ("metal", METAL_WRONG, NEVER),
    ("cuda", CUDA_WRONG, UNALIGNED_UNSUPPORTED),
])
def test_verdicts_are_exactly_the_injected_faults(name, wrong, unsupported):
    profile = cached_measure(name, wrong, unsupported)
    expected = expected_statuses(GRID, wrong, unsupported)
    assert len(expected) == 2 * 2 * 3  # alignments (256, 255) x transposes x M buckets
    assert measured_statuses(profile) == expected
    for verdict in qmm(profile).values():
        assert verdict.probes == len([p for p in GRID.probes() if p.bucket == verdict.bucket])
        for name_, m in verdict.ways.items():
            if m.status == "ok":
                assert m.max_error < doctor.TOLERANCE["float32"] and m.us > 0
            if "wrong" in m.status:
                assert m.max_error > 0.1  # the kv-head offsets make a misread large, not a rounding matter
            if "unsupported" in m.status:
                assert m.error.startswith(NO_IMPLEMENTATION)


def test_sdpa_and_gather_qmm_are_reported():
    healthy = cached_measure("healthy", NEVER, NEVER)
    (sdpa,) = healthy.rules[sdpa_noop_mask.NAME]
    none, mask = sdpa.ways["none"], sdpa.ways["mask"]
    assert mask.ok and mask.max_error < 1e-5 and mask.us / none.us > 0
    assert reported(healthy) == ["ok", "ok"] and "| float32 | 64 | 1 | 256 | equal |" in doctor.render(healthy)
    faulty = doctor.run(grids=(dataclasses.replace(GRID, m_buckets=0), SDPA), progress=False, save=False,
                        kernels=FakeKernels(sdpa_mask_off=True, gather_fails=True))
    assert qmb.NAME not in faulty.rules  # no quantized_matmul bucket in the grid
    assert reported(faulty) == ["wrong", "unsupported"] and "| 256 | differ |" in doctor.render(faulty)
    (gather,) = faulty.rules[qmm_probes.GATHER]
    assert "No implementation" in gather.ways["gather_qmm"].error


def test_no_budget_records_every_bucket_as_not_measured():
    profile = measure(save=False, budget_s=0)
    assert set(qmm(profile)) == {p.bucket for p in GRID.probes()}
    assert {m.status for v in qmm(profile).values() for m in v.ways.values()} == {NOT_MEASURED}
    assert profile.notes["unmeasured_buckets"] == len(qmm(profile)) and "time budget" in profile.notes["stopped"]
    assert reported(profile) == [NOT_MEASURED] * 2
    fn, args, _ = gqa_call(m=2, rows=256)
    assert decide(fn, args, with_profile(profile)).rewrite == "fold"  # the source policy


class Clock:
    """A fake clock for the time budget: it moves only when a fake kernel says so."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class SlowKernels(FakeKernels):
    """Every quantized_matmul takes a second of a fake clock; optionally, the process dies at `dies_at`."""

    def __init__(self, clock: Clock, dies_at: float = float("inf")):
        super().__init__()
        self.clock, self.dies_at = clock, dies_at

    def quantized_matmul(self, x, w, scales, biases=None, **params):
        self.clock.now += 1
        if self.clock.now >= self.dies_at:
            raise SystemExit("killed")  # not an Exception: nothing in the doctor catches it
        return super().quantized_matmul(x, w, scales, biases, **params)


def test_time_budget_measures_the_most_important_buckets_first_and_marks_the_rest():
    clock = Clock()
    profile = doctor.run(grids=(GRID, SDPA), kernels=SlowKernels(clock), progress=False, save=False, budget_s=40,
                         clock=clock)
    by_priority = list(dict.fromkeys(p.bucket for p in GRID.probes()))
    complete = [qmm(profile)[b].complete for b in by_priority]
    assert complete == sorted(complete, reverse=True), complete  # a prefix, in priority order
    assert all(qmm(profile)[b].complete for b in by_priority if b.m == "1")  # decoding first
    assert any(all(m.status == NOT_MEASURED for m in qmm(profile)[b].ways.values()) for b in by_priority)
    assert "time budget (40 s) spent" in profile.notes["stopped"] and profile.notes["unmeasured_buckets"] > 0
    last = GRID.probes()[-1]
    assert qmm(profile)[last.bucket].ways["fold"].status == NOT_MEASURED
    route = qmb.qmm_route(with_profile(profile), last.dtype, last.x_shape, last.w_shape, last.params)
    assert route.ways == ("fold", "copy") and "not measured by `mlxrewrite doctor`" in route.why
    assert "Not measured (the time budget ran out first)" in doctor.render(profile)


def test_probes_cover_each_bucket_at_both_ends_in_priority_order():
    probes = qmm_probes.grid(Backend("cuda"), "gpu").probes()
    by_bucket: dict = {}
    for probe in probes:
        by_bucket.setdefault(probe.bucket, set()).add(probe.m)
    heads = (128, 64, 256)
    assert {b.d for b in by_bucket} == set(heads)
    assert len(by_bucket) == (2 * 2 * len(heads) * 2 * len(qmm_profile.M_BUCKETS) * len(qmm_profile.ROW_CLASSES)
                              * len(qmm_profile.ALIGNMENTS))
    for bucket, seen in by_bucket.items():
        low, high = qmm_profile.M_BUCKETS[qmm_profile.M_LABELS.index(bucket.m)]
        assert seen == {low, high or qmm_probes.LARGE_M}, bucket
    rows = qmm_probes.probe_rows(len(qmm_profile.ROW_CLASSES))
    assert rows == (2048, 2040, 2047, 4096, 4088, 4095, 16384, 16376, 16383)
    # what a decode loop crosses first: M = 1 at short KV lengths, both dtypes, both bits, d 128 and 64, both
    # transposes, every alignment; head dim 256 last; prefill M after decode and speculative M
    first = {(p.dtype, p.bits, p.d, p.transpose, p.rows) for p in probes[:48]}
    assert {p.m for p in probes[:48]} == {1} and {p.bucket.rows for p in probes[:48]} == {"<=2048"}
    assert len(first) == 48 and {d for *_, d, _t, _r in first} == {128, 64}
    assert [p.d for p in probes].index(256) == sum(p.d != 256 for p in probes)
    decode = [i for i, p in enumerate(probes) if p.d != 256 and p.m <= qmm_probes.DECODE_M]
    assert max(decode) < min(i for i, p in enumerate(probes) if p.d != 256 and p.m > qmm_probes.DECODE_M)


# ---- the rules consult the profile -----------------------------------------------------------------------

def gqa_call(m: int, rows: int, transpose: bool = True, d: int = 64):
    """mlx-lm's pattern: x (1, 2, 4, m, .) against an expand_dims'd cache; and its float reference."""
    cache = mx.random.normal((1, 2, rows, d))
    q = mx.quantize(cache, group_size=64, bits=4)
    x = mx.random.normal((1, 2, 4, m, d if transpose else rows))

    def fn(x, w, s, b):
        return mx.quantized_matmul(x, *broadcast_cache(w, s, b), transpose=transpose, group_size=64, bits=4)

    deq = mx.expand_dims(mx.dequantize(*q, group_size=64, bits=4), -3)
    return fn, (x, *q), x @ (mx.swapaxes(deq, -1, -2) if transpose else deq)


PARAMS = {"group_size": 64, "bits": 4, "mode": "affine"}


def as_call(args, transpose: bool) -> mlxrewrite.intercept.Call:
    """The intercepted call `gqa_call`'s function makes (what eager mode keys and rewrites)."""
    x, *q = args
    operands = dict(zip(("x", "w", "scales", "biases"), (x, *broadcast_cache(*q))))
    return mlxrewrite.intercept.Call("quantized_matmul", operands, {"transpose": transpose, **PARAMS}, None)


def bucket_of(args, transpose: bool) -> QmmBucket:
    return QmmBucket.of("float32", args[0].shape, args[1].shape, {"transpose": transpose, **PARAMS})


def decide(fn, args, backend):
    graph = mlxrewrite.trace(fn, *args)
    (site,) = [s for s in graph.calls if s.api == "quantized_matmul"]
    return decide_site([qmb.RULE], site, graph, backend)


def with_profile(profile: Profile, **changes) -> Backend:
    return dataclasses.replace(device_backend(), profile=profile, **changes)


def test_rule_routes_around_unsupported_shapes_with_dequantize():
    profile = cached_measure("cuda", CUDA_WRONG, UNALIGNED_UNSUPPORTED)
    fn, args, ref = gqa_call(m=2, rows=255)
    decision = decide(fn, args, with_profile(profile))
    assert decision.rewrite == "dequantize"  # fold and copy measured unsupported, as shipped wrong
    assert "measured by `mlxrewrite doctor`" in decision.reason and "as shipped wrong" in decision.reason
    assert mx.allclose(qmb.RULE.apply(as_call(args, True), decision), ref, atol=1e-4).item()
    fn, args, _ = gqa_call(m=2, rows=256)
    assert decide(fn, args, with_profile(profile)).rewrite == qmm(profile)[bucket_of(args, True)].ranked[0]


def test_compiled_function_uses_the_cached_profile(profile_file):
    profile = measure(CUDA_WRONG, UNALIGNED_UNSUPPORTED)  # saved where Backend.current() looks
    assert Backend.current().profile == profile
    for transpose in (True, False):
        fn, args, ref = gqa_call(m=3, rows=255, transpose=transpose)
        rewritten = mlxrewrite.compile(fn)
        assert mx.allclose(rewritten(*args), ref, atol=1e-4, rtol=1e-4).item()
        assert f"{qmb.NAME} -> dequantize" in rewritten.explain(), rewritten.explain()


def test_measured_fault_overrides_source_facts_that_call_the_kernel_right():
    """Metal's source says M >= 4 with transpose=False runs the (correct) matrix kernel. Measured right
    too: the call is left alone. Measured wrong: the rule rewrites it anyway."""
    fn, args, _ = gqa_call(m=5, rows=256, transpose=False)
    metal = dict(kind="metal", arch="applegpu_g13s")
    assert decide(fn, args, dataclasses.replace(device_backend(), **metal)) is None  # no profile
    right = cached_measure("metal", METAL_WRONG, NEVER)
    assert decide(fn, args, with_profile(right, **metal)) is None
    wrong = cached_measure("cuda", CUDA_WRONG, UNALIGNED_UNSUPPORTED)
    decision = decide(fn, args, with_profile(wrong, **metal))
    assert decision is not None and decision.rewrite in ("fold", "copy", "dequantize")
    assert "Metal matrix kernel runs" in decision.reason and "as shipped wrong" in decision.reason


def test_measured_right_never_relaxes_a_source_hazard():
    """On CPU (and CUDA) the source policy rewrites every broadcast call; a profile measuring the call right
    only changes which correct rewrite runs, never leaves the call alone."""
    healthy = cached_measure("healthy", NEVER, NEVER)
    for m in (1, 2, 5):
        fn, args, _ = gqa_call(m=m, rows=256)
        fastest = qmm(healthy)[bucket_of(args, True)].ranked[0]
        for kind, arch in (("cpu", ""), ("cuda", "sm_80")):  # (sm_90 and unknown: see test_qmm_rule's sm90 test)
            assert decide(fn, args, with_profile(healthy, kind=kind, arch=arch)).rewrite == fastest


def test_unmeasured_bucket_keeps_the_source_policy():
    healthy = cached_measure("healthy", NEVER, NEVER)
    fn, args, _ = gqa_call(m=2, rows=4100)  # rows class >4096: not in the test grid
    assert decide(fn, args, with_profile(healthy)).rewrite == "fold"


def test_ranking_is_by_time_among_correct_rewrites():
    bucket = QmmBucket("float16", "affine", 4, 64, True, "2-3", 128, "<=2048", 128)
    ways = {ORIGINAL: Measured("wrong", 0.5, 10.0), "fold": Measured("ok", 1e-4, 30.0),
            "copy": Measured("ok", 1e-4, 20.0), "dequantize": Measured("unsupported", error="boom")}
    verdict = QmmVerdict(bucket, 4, ways)
    assert verdict.ranked == ("copy", "fold")
    assert verdict.preference == ("copy", "fold", "dequantize")  # dequantize: last resort, never dropped
    route = qmb.qmm_route(Backend("cuda", profile=with_verdicts(verdict)), "float16", (1, 2, 4, 2, 128),
                          (1, 2, 1, 2048, 16), {"transpose": True, "bits": 4})
    assert route.ways == ("copy", "fold", "dequantize")
    assert route.choose(foldable=True) == "copy" and route.choose(foldable=False) == "copy"
    assert qmb.QmmRoute(("fold", "dequantize"), "").choose(foldable=False) == "dequantize"


def test_jit_error_at_one_head_dim_steers_that_head_dim_away_from_fold():
    """The H100's failure: folded calls with d=64 hit a JIT compile error, d=128 compiles. The profile records
    it per head dim; d=64 calls get copy, measured or not (its kernel family failed), d=128 calls still fold."""
    grid = dataclasses.replace(GRID, d=(64, 128), m_buckets=2)
    profile = measure(unsupported=lambda p: p.folded and p.d == 64, error=JIT_ERROR, grid=grid, save=False)
    assert {b.d for b in qmm(profile)} == {64, 128}
    for bucket, verdict in qmm(profile).items():
        fold = verdict.ways["fold"]
        assert verdict.complete and (fold.ok if bucket.d == 128 else fold.status == "unsupported"), bucket
        assert bucket.d == 128 or fold.error.startswith(JIT_ERROR)
    assert f"] {JIT_ERROR}" in doctor.render(profile)
    backend = with_profile(profile, arch="sm_80")  # sm_90 dequantizes d=64 anyway (cuda_qmm_wrong)
    for m, rows, measured in ((1, 256, True), (2, 255, True), (5, 4100, False)):  # M 4-7, rows >4096: not probed
        fn, args, ref = gqa_call(m, rows, d=64)
        assert (bucket_of(args, True) in qmm(profile)) is measured
        decision = decide(fn, args, backend)
        assert decision.rewrite == "copy" if not measured else decision.rewrite in ("copy", "dequantize")
        assert mx.allclose(qmb.RULE.apply(as_call(args, True), decision), ref, atol=1e-4).item()
        fn, args, _ = gqa_call(m, rows, d=128)
        route = qmb.qmm_route(backend, "float32", args[0].shape, args[1].shape, {"transpose": True, **PARAMS})
        assert route.ways[0] == "fold" if not measured else "fold" in route.ways
    fn, args, _ = gqa_call(5, 4100, d=64)
    assert "fold failed in measured buckets of its kernel family" in decide(fn, args, backend).reason


def test_lost_gpu_context_stops_the_run_and_keeps_what_was_measured():
    """In process, CUDA's sticky "illegal memory access" in the call as shipped (M=2) ends the run: every later
    call would fail too, and must not be recorded as unsupported. What ran before stays measured."""
    profile = measure(unsupported=lambda p: p.broadcast and p.m == 2, error=LOST_CONTEXT, save=False)
    crashed = [b for b, v in qmm(profile).items() if v.ways[ORIGINAL].status == "crashed"]
    assert len(crashed) == 1 and "illegal memory access" in qmm(profile)[crashed[0]].ways[ORIGINAL].error
    assert "illegal memory access" in profile.notes["stopped"]
    assert all(v.complete for v in qmm(profile).values())  # the rewrites ran first, as the routes need them
    assert reported(profile)[-1] == NOT_MEASURED  # gather_qmm
    assert "**CRASHED**" in doctor.render(profile)


class CrashingKernels(doctor.Kernels):
    """The call as shipped kills its process for M = 2, as the abort after CUDA's illegal memory access does."""

    def quantized_matmul(self, x, w, scales, biases=None, **params):
        if broadcast(x, w) and x.shape[-2] == 2:
            os._exit(3)
        return super().quantized_matmul(x, w, scales, biases, **params)


class HangingKernels(doctor.Kernels):
    """The call as shipped never returns for M = 3, as a runaway JIT compile or a hung kernel."""

    def quantized_matmul(self, x, w, scales, biases=None, **params):
        if broadcast(x, w) and x.shape[-2] == 3:
            time.sleep(600)
        return super().quantized_matmul(x, w, scales, biases, **params)


def test_child_process_crash_costs_only_the_way_that_crashed():
    profile = doctor.run(grids=(GRID, SDPA), kernels=CrashingKernels(), isolate=True, save=False, progress=False)
    assert profile.notes["isolated"] and profile.notes["stopped"] is None
    for bucket, verdict in qmm(profile).items():
        shipped = verdict.ways[ORIGINAL]
        assert verdict.complete and all(verdict.ways[name].ok for name in QMM_REWRITES)
        if bucket.m == "2-3":
            assert shipped.status == "crashed" and "exit code 3" in shipped.error
        else:
            assert shipped.ok  # measured in the processes started after each crash
    assert reported(profile) == ["ok", "ok"]


def test_child_process_is_killed_at_the_deadline():
    profile = doctor.run(grids=(GRID, SDPA), kernels=HangingKernels(), isolate=True, save=False, progress=False,
                         budget_s=4)
    hung = QmmBucket.of("float32", (1, 2, 4, 3, 64), (1, 2, 1, 256, 8), {"transpose": True, **PARAMS})
    assert qmm(profile)[hung].ways[ORIGINAL].status == NOT_MEASURED
    assert reported(profile)[-1] == NOT_MEASURED and "time budget" in profile.notes["stopped"]


def test_profile_is_written_while_measuring(profile_file):
    """A process that dies mid-run leaves the profile of what it had measured, marked partial."""
    clock = Clock()
    with pytest.raises(SystemExit):
        doctor.run(grids=(GRID, SDPA), kernels=SlowKernels(clock, dies_at=40), progress=False, clock=clock)
    partial = Backend.current().profile
    assert partial is not None and partial.notes["finished"] is False
    assert 0 < partial.notes["complete_buckets"] < len(qmm(partial))
    assert "This profile is partial" in doctor.render(partial)


# ---- resuming --------------------------------------------------------------------------------------------

class CountingKernels(SlowKernels):
    """SlowKernels that record each quantized_matmul call as (the probe's bucket, the way that made it)."""

    def __init__(self, clock: Clock, dies_at: float = float("inf")):
        super().__init__(clock, dies_at)
        self.calls: list[tuple[QmmBucket, str]] = []

    def quantized_matmul(self, x, w, scales, biases=None, **params):
        call = problem(x, w, params)
        way = ORIGINAL if call.broadcast else "fold" if call.folded else "copy"
        m = call.m // qmm_probes.N_REP if call.folded else call.m
        x_shape = (1, qmm_probes.N_KV, qmm_probes.N_REP, m, x.shape[-1])
        self.calls.append((QmmBucket.of("float32", x_shape, w.shape[-2:], params), way))
        return super().quantized_matmul(x, w, scales, biases, **params)


def counted_run(dies_at: float = float("inf"), grid: qmm_probes.Grid = GRID,
                **options) -> tuple[Profile, list[tuple[QmmBucket, str]]]:
    kernels = CountingKernels(Clock(), dies_at)
    return doctor.run(grids=(grid, SDPA), kernels=kernels, clock=kernels.clock, **options), kernels.calls


@pytest.mark.parametrize("stop", ["budget", "killed"])
def test_a_stopped_run_is_resumed_probing_only_the_rest(profile_file, capsys, stop):
    """A run stopped by its budget (or killed: its checkpoint is partial) is resumed by the next one, which
    keeps every way measured before and probes only the rest, in the same order; --fresh probes everything."""
    if stop == "budget":
        first, _ = counted_run(budget_s=40, progress=False)
    else:
        with pytest.raises(SystemExit):
            counted_run(dies_at=40, progress=False)
        first = Backend.current().profile
    measured = {b for b, v in qmm(first).items() if v.complete}
    assert 0 < len(measured) < len(qmm(first))
    capsys.readouterr()

    second, calls = counted_run(budget_s=10_000)
    assert (f"resuming: {len(measured)} of {len(qmm(first))} buckets measured in an earlier run"
            in capsys.readouterr().err)
    assert not {bucket for bucket, way in calls if way != ORIGINAL} & measured  # no rewrite probed again
    assert all(qmm(second)[b].ways[w] == qmm(first)[b].ways[w] for b in measured for w in QMM_REWRITES)
    assert measured_statuses(second) == expected_statuses(GRID, NEVER, NEVER)
    assert second.notes["finished"] and second.notes["stopped"] is None and second.notes["resumed_buckets"]
    assert reported(second) == ["ok", "ok"]
    assert Backend.current().profile == second
    first_calls = [b for b, _ in calls]  # in priority order: the first call is to the first bucket left
    assert first_calls[0] == next(b for b in dict.fromkeys(p.bucket for p in GRID.probes()) if b not in measured)

    _, again = counted_run(budget_s=10_000)  # nothing left: the profile stands, nothing is probed
    assert again == [] and "nothing left to measure" in capsys.readouterr().err
    assert Backend.current().profile == second

    fresh, everything = counted_run(budget_s=10_000, fresh=True, progress=False)
    assert len(everything) > len(calls) and fresh.notes["resumed_buckets"] == 0
    assert {b for b, way in everything if way != ORIGINAL} == set(qmm(first))


def test_a_profile_of_other_kernels_or_another_grid_is_not_resumed(profile_file):
    counted_run(budget_s=40, progress=False)  # stopped by its budget
    other_kernels = doctor.run(grids=(GRID, SDPA), kernels=FakeKernels(), progress=False)
    assert other_kernels.notes["resumed_buckets"] == 0
    assert other_kernels.notes["tasks_run"] == other_kernels.notes["tasks"]
    other_grid, calls = counted_run(grid=dataclasses.replace(GRID, name="other"), budget_s=10_000, progress=False)
    assert other_grid.notes["resumed_buckets"] == 0 and calls[0][0] == GRID.probes()[0].bucket


def test_cli_resumes_unless_fresh(profile_file, capsys):
    assert cli.main(["doctor", "--quick", "--budget", "0"]) == 0  # nothing measured: all left for the next run
    assert "resuming" not in capsys.readouterr().err
    assert cli.main(["doctor", "--quick", "--budget", "0"]) == 0
    assert "resuming: 0 of 16 buckets measured in an earlier run" in capsys.readouterr().err
    assert cli.main(["doctor", "--quick", "--budget", "0", "--fresh"]) == 0
    assert "resuming" not in capsys.readouterr().err


# ---- CUDA's JIT cache --------------------------------------------------------------------------------------

def test_cuda_jit_cache_is_reported_cold_or_warm(tmp_path, monkeypatch, capsys):
    """MLX keeps NVRTC's output in MLX_PTX_CACHE_DIR (else <temp dir>/mlx/<version>/ptx): the doctor says
    whether it held compiled modules when the run began, on stderr, in the notes and in the table."""
    monkeypatch.delenv("MLX_PTX_CACHE_DIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    assert doctor.jit_cache.ptx_cache_dir() == tmp_path / "mlx" / mx.__version__ / "ptx"
    cache = tmp_path / "ptx"
    monkeypatch.setenv("MLX_PTX_CACHE_DIR", str(cache))
    assert doctor.jit_cache.state(Backend("cpu")) is None
    cuda = dataclasses.replace(device_backend(), kind="cuda")
    monkeypatch.setattr(doctor.session, "device_backend", lambda: cuda)
    cold = doctor.run(grids=(dataclasses.replace(GRID, m_buckets=0), SDPA), kernels=FakeKernels(), isolate=False,
                      save=False)
    assert cold.notes["jit_cache"] == {"dir": str(cache), "modules": 0, "warm": False}
    assert f"CUDA JIT cache {cache} is cold" in capsys.readouterr().err
    assert "is cold (empty)" in doctor.render(cold) and "MLX_PTX_CACHE_DIR" in doctor.render(cold)
    cache.mkdir()
    for name in ("qmm_sm80_f16.ptx", "qmm_sm80_f16.txt", "qmm_sm80_f16.cu"):
        (cache / name).write_text("")
    warm = doctor.jit_cache.state(cuda)
    assert warm == {"dir": str(cache), "modules": 1, "warm": True}
    assert "is warm (1 compiled modules)" in doctor.jit_cache.describe(warm)

# ---- eager mode: where the recorded facts hold, the decision is the same -------------------------------

def test_recorded_facts_hold_every_fact_the_decision_depends_on():
    """For every pair of calls: where the facts eager mode recorded for one hold for the other, the decision the
    compile path makes on the other's whole graph is the same (so reusing it along a decode loop is exact)."""
    profile = cached_measure("cuda", CUDA_WRONG, UNALIGNED_UNSUPPORTED)
    backends = [Backend("cpu"), with_profile(profile), with_profile(profile, kind="metal", arch="applegpu_g13s")]
    shapes = [(m, rows, t) for m in (1, 2, 3, 5) for rows in (250, 251, 253, 255, 256, 384, 2100)
              for t in (True, False)]
    for backend in backends:
        analysed, reused = [], 0
        for m, rows, transpose in shapes:
            fn, args, _ = gqa_call(m, rows, transpose)
            decision = decide(fn, args, backend)
            outcome = None if decision is None else (decision.rewrite, repr(decision.params))
            call = as_call(args, transpose)
            env = ArrayEnv(call.operands, call.params, {}, backend)
            for facts, earlier in analysed:
                if facts.still_holds(env):
                    assert earlier == outcome, (m, rows, transpose)
                    reused += 1
            graph, site = trace_one_call(call)
            facts = call_facts(site, graph, backend, eager=True)
            qmb.RULE.decide(facts)
            analysed.append((facts, outcome))
        assert reused  # a decode loop's growing rows share decisions within a bucket


# ---- profile files -------------------------------------------------------------------------------------------

def test_profile_round_trips_and_hashes_by_content():
    profile = cached_measure("metal", METAL_WRONG, NEVER)
    again = Profile.from_dict(json.loads(json.dumps(profile.to_dict())))
    assert again == profile and hash(again) == hash(profile) and again is not profile
    assert measured_statuses(again) == measured_statuses(profile)
    assert hash(with_profile(profile)) == hash(with_profile(again))  # eager mode keys on the Backend


def test_cache_location_is_per_device_and_mlx_version(tmp_path, monkeypatch):
    monkeypatch.delenv("MLXREWRITE_PROFILE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert Backend.current().profile is None
    profile = measure(CUDA_WRONG, UNALIGNED_UNSUPPORTED)
    (written,) = (tmp_path / "mlxrewrite").iterdir()
    assert written == profile_path(device_backend())
    assert f"mlx-{mx.__version__}" in written.name and device_backend().kind in written.name
    assert Backend.current().profile == profile
    monkeypatch.setattr(mx, "__version__", "99.0.0")  # another MLX: its kernels may differ, no profile yet
    assert Backend.current().profile is None
    monkeypatch.setenv("MLXREWRITE_PROFILE", str(written))  # forced onto it: refused, with a warning
    with pytest.warns(ProfileWarning, match="MLX 99.0.0"):
        assert Backend.current().profile is None


def test_profile_of_an_older_format_is_ignored(profile_file):
    """Schema 1 (before "not measured" existed) read an unmeasured bucket's absence as the whole story."""
    old = {**cached_measure("healthy", NEVER, NEVER).to_dict(), "schema": 1}
    profile_file.write_text(json.dumps(old))
    with pytest.warns(ProfileWarning, match="profile schema 1"):
        assert Backend.current().profile is None


def test_profile_off_and_rewritten_files(profile_file, monkeypatch):
    first = measure(METAL_WRONG)
    assert Backend.current().profile == first
    assert Backend.current().profile is Backend.current().profile  # read once, not per call
    second = measure(CUDA_WRONG, UNALIGNED_UNSUPPORTED, fresh=True)  # a new run replaces the file: picked up
    assert second != first and Backend.current().profile == second
    monkeypatch.setenv("MLXREWRITE_PROFILE", "off")
    assert Backend.current().profile is None
    monkeypatch.setenv("MLXREWRITE_PROFILE", str(profile_file))
    profile_file.write_text("{not json")
    with pytest.warns(ProfileWarning, match="ignoring profile"):
        assert Backend.current().profile is None


# ---- entry points ----------------------------------------------------------------------------------------------

def test_module_is_callable_and_shows_progress(profile_file, capsys):
    profile = mlxrewrite.doctor(grids=(GRID, SDPA), kernels=FakeKernels(), save=False)
    assert isinstance(profile, Profile) and not profile_file.exists()
    err = capsys.readouterr().err
    total = len(doctor.plan([GRID, SDPA], device_backend()))
    assert "doctor [" in err and f"{total}/{total}" in err
    assert f"doctor: {total}/{total} tasks" in err


def test_cli_measures_shows_and_writes_json(profile_file, tmp_path, capsys):
    assert cli.main(["doctor", "--show"]) == 0
    assert "no profile" in capsys.readouterr().err
    out = tmp_path / "out.json"
    assert cli.main(["doctor", "--quick", "--json", "--no-cache", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text()) and printed["notes"]["grid"] == "quick"
    assert not profile_file.exists()  # --no-cache
    measure(CUDA_WRONG, UNALIGNED_UNSUPPORTED)
    assert cli.main(["doctor", "--show"]) == 0
    table = capsys.readouterr().out
    assert "| float32 | 4/64 | True | 2-3 | 64 |" in table and "**WRONG**" in table and "**UNSUPPORTED**" in table
    assert f"[1] {NO_IMPLEMENTATION}" in table  # each error once, under the tables
    assert cli.main(["doctor", "--budget", "0", "--no-cache"]) == 0
    assert "Not measured (the time budget ran out first)" in capsys.readouterr().out
