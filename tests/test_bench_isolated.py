"""bench/isolated.py and the gqa case's use of it: a row runs in a child process; a crash there is one row's
entry (retried without as shipped), and the run goes on.

The targets below run in the child (`mlxrewrite.backends.isolation`), which imports this module by name. No timings are
asserted, only what each answer says.
"""

import os
import time

import pytest

from bench import case_gqa
from bench.case_gqa import SPEEDUP_GOAL, row_in_child, speed_goal
from bench.common import Env, fmt_ratio
from bench.isolated import Worker, stage

HERE = "tests.test_bench_isolated"


def pid() -> dict:
    print("stray output on stdout must not break the protocol")
    return {"pid": os.getpid()}


def aborting() -> dict:
    stage("about to abort")
    os.abort()


def faulting() -> dict:
    """What a dead CUDA context raises at the next launch, uncaught."""
    raise RuntimeError("cuGraphAddKernelNode(...) failed: an illegal memory access was encountered")


def sleeping() -> dict:
    time.sleep(60)
    return {}


def gqa_row(n, m, d, bits, dtype, iters, skip=()) -> dict:
    """A stand-in for case_gqa.measure_row: aborts while as shipped is in the row, unless told to abort anyway."""
    if "as_shipped" not in skip or os.environ.get("GQA_ROW_ALWAYS_CRASHES"):
        os.abort()
    return {"N": n, "M": m, "D": d, "bits": bits, "kv_bytes": 1000, "rewrite_chosen": "fold",
            **{name: {"us": 10.0, "iqr_us": 1.0, "n": iters, "max_err": 0.0} for name in ("rewritten", "fold", "copy",
                                                                                     "float")}}


@pytest.fixture
def worker():
    with Worker(timeout_s=20) as w:
        yield w


def test_an_answer_comes_from_one_child_kept_between_requests(worker):
    first, second = worker.run(f"{HERE}:pid"), worker.run(f"{HERE}:pid")
    assert first["pid"] == second["pid"] != os.getpid()


@pytest.mark.parametrize("target, reason, line, where", [
    ("aborting", "crashed: signal 6", "", "about to abort"),
    ("faulting", "crashed: illegal memory access", "RuntimeError: cuGraphAddKernelNode", f"{HERE}:faulting"),
])
def test_a_crash_is_recorded_and_a_fresh_child_takes_the_next_request(worker, target, reason, line, where):
    before = worker.run(f"{HERE}:pid")["pid"]
    answer = worker.run(f"{HERE}:{target}")
    assert answer["crashed"] and answer["error"] == reason
    assert answer["stderr"].startswith(line) and answer["stage"] == where
    assert worker.run(f"{HERE}:pid")["pid"] != before


def test_a_hung_child_is_killed():
    with Worker(timeout_s=1) as worker:
        answer = worker.run(f"{HERE}:sleeping")
    assert answer["crashed"] and answer["error"].startswith("crashed: killed (timeout 1 s")


# ---- the gqa case: retry without as shipped, goals where as shipped failed ------------------------------

ENV = Env("test", "cpu", "cpu-test", "0", "0", "0", "today", "float32", None)


def test_a_crashed_row_is_measured_again_without_as_shipped(worker, monkeypatch):
    monkeypatch.setattr(case_gqa, "TARGET", f"{HERE}:gqa_row")
    row = row_in_child(worker, 8192, 4, 128, 4, ENV, iters=3)
    assert row["as_shipped"]["crashed"] and "lost" not in row
    assert row["rewritten"]["us"] == 10.0 and row["rewritten/copy"] == 1.0
    assert fmt_ratio(row, "rewritten", "as_shipped") == "crashed"
    assert speed_goal([row]).met


def test_a_row_that_crashes_without_as_shipped_too_is_lost_not_blamed_on_the_rewrite(worker, monkeypatch):
    monkeypatch.setattr(case_gqa, "TARGET", f"{HERE}:gqa_row")
    monkeypatch.setenv("GQA_ROW_ALWAYS_CRASHES", "1")
    row = row_in_child(worker, 8192, 4, 128, 4, ENV, iters=3)
    assert row["lost"]["crashed"] and row["rewritten"]["crashed"]
    goal = speed_goal([row])
    assert goal.met is None and "1 rows lost" in goal.detail


def synthetic(shipped: dict, rewritten: dict, n: int = 8192) -> dict:
    row = {"N": n, "rewrite_chosen": "fold", "as_shipped": shipped, "rewritten": rewritten, "copy": {"us": 10.0}}
    ratio = rewritten["us"] / shipped["us"] if "us" in shipped and "us" in rewritten else None
    return dict(row, **{"rewritten/as_shipped": ratio})


CRASHED = {"error": "crashed: illegal memory access", "crashed": True}


def test_as_shipped_crashing_meets_the_speed_goal_and_says_why():
    goal = speed_goal([synthetic(CRASHED, {"us": 5.0}), synthetic({"us": 20.0}, {"us": 5.0})])
    assert goal.met and "2/2 rows" in goal.detail and "1 crashed" in goal.detail


def test_a_failed_rewrite_misses_the_speed_goal():
    goal = speed_goal([synthetic({"us": 20.0}, {"error": "No implementation"}), synthetic(CRASHED, {"us": 5.0})])
    assert goal.met is False and "the rewrite failed in 1" in goal.detail


def test_slow_rows_miss_the_speed_goal():
    goal = speed_goal([synthetic({"us": 10.0}, {"us": 10.0 * SPEEDUP_GOAL + 1})])
    assert goal.met is False and "worst" in goal.detail


def test_ratio_cells_name_the_failure():
    assert fmt_ratio(synthetic({"error": "x"}, {"us": 5.0}), "rewritten", "as_shipped") == "raises"
    assert fmt_ratio(synthetic({"us": 10.0}, {"us": 5.0}), "rewritten", "as_shipped") == "0.50"
