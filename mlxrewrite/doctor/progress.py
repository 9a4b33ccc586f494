"""What a run says while it measures, on stderr: a progress bar, notes (resuming, the JIT cache), a summary."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """A progress bar on stderr: redrawn in place on a terminal, naming the task in flight (a long JIT compile
    shows which); one line per tenth otherwise (logs)."""

    def __init__(self, total: int, enabled: bool = True, stream: TextIO | None = None):
        self.total, self.done, self.enabled, self.stream = max(total, 1), 0, enabled, stream or sys.stderr
        self.start = time.perf_counter()
        self.live = enabled and self.stream.isatty()

    def _draw(self, label: str) -> None:
        filled = 30 * self.done // self.total
        line = (f"doctor [{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} "
                f"{time.perf_counter() - self.start:4.0f}s {label}")
        self.stream.write(f"\r{line:<110}" if self.live else line + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        """A line of its own, before the bar starts."""
        if self.enabled:
            self.stream.write(f"doctor: {text}\n")
            self.stream.flush()

    def running(self, label: str) -> None:
        if self.live:
            self._draw(label)

    def step(self, label: str) -> None:
        self.done += 1
        if self.enabled and (self.live or self.done * 10 // self.total != (self.done - 1) * 10 // self.total):
            self._draw(label)

    def close(self, summary: str) -> None:
        if self.enabled:
            self.stream.write("\n" if self.live else "")
            self.note(summary)
