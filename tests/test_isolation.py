"""mlxrewrite.backends.isolation: one child process answers calls until it crashes; a crash is reported with its exit
code, the child's last output lines and its last stage, and the next call gets a new child.

The functions below run in the child, which imports this module by name (the parent's sys.path)."""

import os
import signal
import time

import pytest

from mlxrewrite.backends.isolation import Child, Crashed, stage

INITIALIZED = []


def init() -> None:
    INITIALIZED.append(os.getpid())


def pid_and_init() -> tuple[int, list[int]]:
    print("stray output on stdout must not break the protocol")
    return os.getpid(), INITIALIZED


def exits(code: int) -> None:
    stage("about to exit")
    print("RuntimeError: the reason, named before dying", flush=True)
    print("double free or corruption", flush=True)
    os._exit(code)


def signals() -> None:
    stage(("way", "layout"))
    os.kill(os.getpid(), signal.SIGTERM)


def raises() -> None:
    raise RuntimeError("cuGraphAddKernelNode(...) failed: an illegal memory access was encountered")


def hangs() -> None:
    stage("hanging")
    time.sleep(60)


@pytest.fixture
def child():
    with Child(init) as c:
        yield c


def test_one_child_answers_until_it_crashes_and_init_runs_in_each(child):
    first, init_pids = child.call(pid_and_init)
    assert first != os.getpid() and init_pids == [first] and child.call(pid_and_init)[0] == first
    with pytest.raises(Crashed):
        child.call(exits, 3)
    second, init_pids = child.call(pid_and_init)
    assert second != first and init_pids == [second]
    assert INITIALIZED == []  # `stage` and `init` never ran here


def test_a_child_that_exits_reports_its_code_output_and_stage(child):
    with pytest.raises(Crashed) as crash:
        child.call(exits, 3)
    assert crash.value.code == 3 and crash.value.reason == "exit code 3" and not crash.value.timed_out
    assert crash.value.line == "RuntimeError: the reason, named before dying"  # not the very last line
    assert crash.value.lines[-1] == "double free or corruption" and crash.value.stage == "about to exit"


def test_a_signal_and_an_uncaught_device_fault_are_named(child):
    with pytest.raises(Crashed) as crash:
        child.call(signals)
    assert crash.value.code == -signal.SIGTERM and crash.value.reason == f"signal {signal.SIGTERM}"
    assert crash.value.stage == ("way", "layout")
    with pytest.raises(Crashed) as crash:
        child.call(raises)
    assert crash.value.reason == "illegal memory access" and crash.value.stage is None
    assert crash.value.line.startswith("RuntimeError: cuGraphAddKernelNode")


def test_a_child_past_its_timeout_is_killed(child):
    start = time.monotonic()
    with pytest.raises(Crashed) as crash:
        child.call(hangs, timeout_s=1)
    assert time.monotonic() - start < 10
    assert crash.value.timed_out and crash.value.reason == "killed (timeout 1 s)" and crash.value.stage == "hanging"
    assert child.call(pid_and_init)[0] != os.getpid()
