"""Where tasks run: in this process (CPU, tests' injected kernels), or in a child process (GPUs), where a
task still running at the deadline is killed and a way that kills the process costs only itself."""

from __future__ import annotations

import functools
from typing import Callable, Protocol

import mlx.core as mx

from ..backends.device import Backend
from ..backends.isolation import Child, Crashed
from .kernels import Kernels
from .measure import Key, Outcome
from .probes import Task


class Executor(Protocol):
    lost: str | None  # why the run cannot go on, once it cannot

    def execute(self, task: Task, deadline: float) -> dict[Key, Outcome]: ...

    def close(self) -> None: ...


def _crashed(outcomes: dict[Key, Outcome]) -> Outcome | None:
    return next((o for o in outcomes.values() if o.crashed), None)


class InProcess:
    """Runs tasks in this process. A task that hangs cannot be stopped (the command's watchdog ends the
    process), and a lost GPU context ends the run (`lost`): every later call would fail, misread as
    unsupported."""

    def __init__(self, kernels: Kernels, backend: Backend, seed: int):
        self.kernels, self.backend = kernels, backend
        self.lost: str | None = None
        mx.random.seed(seed)

    def execute(self, task: Task, deadline: float) -> dict[Key, Outcome]:
        """Runs `task` to its end: in process, a deadline cannot be enforced."""
        outcomes = task.execute(self.kernels, self.backend)
        crashed = _crashed(outcomes)
        if crashed is not None:
            self.lost = f"stopped after {task.label}: {crashed.failure}"
        return outcomes

    def close(self) -> None:
        pass  # nothing of its own: the grids release what their tasks cached


def _seed(seed: int) -> None:
    """A new child's first call (mx.random.seed itself does not pickle)."""
    mx.random.seed(seed)


class Isolated:
    """Runs tasks in a child process (`isolation.Child`). Each way is announced as a stage before it runs, so
    a process that dies is charged to the way that killed it, as *crashed*, and the next task gets a new
    process. A task still running at the deadline, such as a long JIT compile, is killed and stays unmeasured.
    Only a process that dies outside any kernel call ends the run (`lost`): another would likely die the same
    way. After a way that lost the GPU context the child is replaced: every later call there would fail."""

    def __init__(self, kernels: Kernels, backend: Backend, seed: int, clock: Callable[[], float]):
        self.kernels, self.backend, self.clock = kernels, backend, clock
        self.child = Child(functools.partial(_seed, seed))
        self.lost: str | None = None

    def execute(self, task: Task, deadline: float) -> dict[Key, Outcome]:
        try:
            outcomes = self.child.call(task.execute, self.kernels, self.backend,
                                       timeout_s=max(0.0, deadline - self.clock()))
        except Crashed as crash:
            if crash.timed_out:
                return {}
            if crash.stage is None:
                self.lost = f"the doctor's worker process died outside any kernel call ({crash})"
                return {}
            return {crash.stage: Outcome(None, None, f"the process running it died: {crash}"[:400], crashed=True)}
        if _crashed(outcomes) is not None:
            self.child.close()
        return outcomes

    def close(self) -> None:
        self.child.close()
