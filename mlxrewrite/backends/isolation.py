"""Run calls in a child process, so that a crash costs one call, not the caller's whole run.

On CUDA a hazardous kernel can do more than raise: after "an illegal memory access" the context is dead
(every later call fails) and the process often dies ("double free or corruption"). The doctor's probes and
the bench's rows therefore run in a long-lived child:

- `Child` (the parent's end) starts `python -c` (not multiprocessing's spawn, which would run the user's
  script again) with the parent's `sys.path`, sends it pickled `(function, args)` requests over a socket,
  and returns each answer. Functions travel by reference, so they must be importable at module level.
- The child's stdout and stderr go to a file (a chatty child never blocks); a crash report quotes them.
- A function in the child calls `stage(value)` to say what it is doing; after a crash, `Crashed.stage` is
  the last one, so the caller can pin the crash on the step that caused it. In the parent, `stage` is a no-op.
- A child that dies, or that is still running at the timeout (it is then killed), raises `Crashed` in the
  parent; the next call starts a new child. An exception a function does not catch also ends the child
  (its traceback is in the crash report): after a device fault nothing else in that process can be trusted.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from typing import IO, Any, Callable

# CUDA's sticky errors: after one the context is lost, and every later call in the process fails
STICKY_FAULT = re.compile(r"illegal memory access|illegal instruction|misaligned address|unspecified launch failure|"
                          r"hardware stack error|device-side assert", re.IGNORECASE)
_NAMED_FAULT = re.compile(f"{STICKY_FAULT.pattern}|CUDA_ERROR|cudaError", re.IGNORECASE)  # names a crash's cause
STDERR_TAIL = 12  # lines of the child's output a crash report keeps (from its last 64 KiB)
CLOSE_GRACE_S = 5.0  # a child asked to end gets this long before it is killed

_PARENT: Connection | None = None  # in a child: the connection to the parent


class Crashed(Exception):
    """A child gave no answer: it died, or it ran past the timeout and was killed."""

    def __init__(self, code: int, lines: list[str], stage: Any, timeout_s: float | None):
        self.code, self.lines, self.stage, self.timeout_s = code, lines, stage, timeout_s
        super().__init__(f"{self.reason}: {self.line}" if self.line else self.reason)

    @property
    def timed_out(self) -> bool:
        return self.timeout_s is not None

    @property
    def reason(self) -> str:
        """A device fault named in its output, the timeout, a signal, or the exit code."""
        fault = _NAMED_FAULT.search("\n".join(self.lines))
        if fault is not None:
            return fault.group(0)
        if self.timed_out:
            return f"killed (timeout {self.timeout_s:.0f} s)"
        if self.code == -9:
            return "killed (signal 9: out of memory?)"
        return f"signal {-self.code}" if self.code < 0 else f"exit code {self.code}"

    @property
    def line(self) -> str:
        """The last output line naming an error (a dying process's very last line is often "double free")."""
        named = [line for line in self.lines if "rror" in line or _NAMED_FAULT.search(line)]
        return (named or self.lines or [""])[-1]


class Child:
    """The parent's end: one child process at a time, started on first use, replaced after a crash. `init`
    (importable, picklable) runs first in every new child, e.g. to seed its random numbers."""

    def __init__(self, init: Callable[[], Any] | None = None):
        self.init = init
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._output: IO[bytes] | None = None

    def call(self, fn: Callable[..., Any], *args: Any, timeout_s: float | None = None) -> Any:
        """`fn(*args)`, computed in the child; raises `Crashed` if it gives no answer within `timeout_s`."""
        conn = self._conn or self._start()
        end = None if timeout_s is None else time.monotonic() + timeout_s
        last = None
        try:
            conn.send((fn, args))
            while conn.poll(None if end is None else max(0.0, end - time.monotonic())):
                kind, value = conn.recv()
                if kind == "done":
                    return value
                last = value
        except (EOFError, OSError):  # it died
            raise self._crashed(last, None) from None
        raise self._crashed(last, timeout_s)

    def close(self) -> None:
        """End the child: it sees the socket close and exits, or is killed after CLOSE_GRACE_S."""
        if self._proc is not None:
            self._stop(CLOSE_GRACE_S)

    def __enter__(self) -> "Child":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _start(self) -> Connection:
        ours, theirs = socket.socketpair()
        self._output = tempfile.TemporaryFile()
        path = os.pathsep.join(os.path.abspath(p) if p else os.getcwd() for p in sys.path)  # its functions import
        with theirs:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", f"from mlxrewrite.backends.isolation import serve; serve({theirs.fileno()})"],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=self._output, stderr=self._output,
                env={**os.environ, "PYTHONPATH": path})
        self._conn = Connection(ours.detach())
        self._conn.send(self.init)
        return self._conn

    def _crashed(self, stage: Any, timeout_s: float | None) -> Crashed:
        return Crashed(*self._stop(0.0 if timeout_s is not None else CLOSE_GRACE_S), stage, timeout_s)

    def _stop(self, grace_s: float) -> tuple[int, list[str]]:
        """Close the socket, wait up to `grace_s` for the child to end, kill it if it has not; its exit code
        and the last lines of its output."""
        self._conn.close()
        try:
            code = self._proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            code = self._proc.wait()
        self._output.seek(max(0, self._output.seek(0, os.SEEK_END) - 65536))
        text = self._output.read().decode(errors="replace")
        lines = [line.strip() for line in text.splitlines() if line.strip()][-STDERR_TAIL:]
        self._output.close()
        self._proc = self._conn = self._output = None
        return code, lines


def stage(value: Any) -> None:
    """In a child, tell the parent what runs now (a crash report names the last stage); elsewhere nothing."""
    if _PARENT is not None:
        _PARENT.send(("stage", value))


def serve(fd: int) -> None:
    """The child's loop: run `init`, then answer requests until the parent closes the socket."""
    global _PARENT
    _PARENT = conn = Connection(fd)
    init = conn.recv()
    if init is not None:
        init()
    while True:
        try:
            fn, args = conn.recv()
        except EOFError:
            return
        conn.send(("done", fn(*args)))
