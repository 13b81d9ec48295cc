"""Chooses the backend for a request: least loaded, weighted.

Score = (load + 1) / weight, where load is the gateway's in-flight count or, when fresher and larger,
the running + waiting requests the engine reports on /metrics (`Backend.load`). Ties rotate so equal
backends share work instead of the first one taking everything while the others idle.
"""

from __future__ import annotations

import time
from collections.abc import Container

from sluice.upstream.backends import Backend


class LeastOutstanding:
    __slots__ = ("_turn",)

    def __init__(self) -> None:
        self._turn = 0

    def pick(self, candidates: tuple[Backend, ...], exclude: Container[Backend] = ()) -> Backend | None:
        n = len(candidates)
        if n == 1:
            only = candidates[0]
            return None if only in exclude else only
        self._turn += 1
        now = time.monotonic()
        best: Backend | None = None
        best_score = 0.0
        for i in range(n):
            backend = candidates[(self._turn + i) % n]
            if backend in exclude:
                continue
            score = (backend.load(now) + 1) / backend.weight
            if best is None or score < best_score:
                best, best_score = backend, score
        return best
