"""Progress lines on stderr: what runs now, how far along the suite is, roughly how long is left."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field


def _clock(seconds: float) -> str:
    minutes, secs = divmod(max(0, round(seconds)), 60)
    return f"{minutes}:{secs:02d}"


@dataclass(slots=True)
class Progress:
    """Counts planned steps; each step announces itself with elapsed time and an estimate of what is left."""

    total_steps: int
    planned_s: float
    started: float = field(default_factory=time.monotonic)
    done_steps: int = 0
    done_planned_s: float = 0.0

    def step(self, label: str, planned_s: float) -> None:
        self.done_steps += 1
        elapsed = time.monotonic() - self.started
        left = max(0.0, self.planned_s - self.done_planned_s)
        self.done_planned_s += planned_s
        self._write(
            f"[{self.done_steps:>2}/{self.total_steps} {_clock(elapsed)} elapsed, ~{_clock(left)} left] {label}"
        )

    def skip(self, steps: int, planned_s: float) -> None:
        """Account for planned steps that will not run (a target that could not start)."""
        self.total_steps -= steps
        self.planned_s -= planned_s

    def note(self, message: str) -> None:
        self._write(f"    {message}")

    @staticmethod
    def _write(line: str) -> None:
        print(line, file=sys.stderr, flush=True)
