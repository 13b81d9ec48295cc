"""Chooses the backend for a request: least outstanding requests, weighted.

Score = (in-flight + 1) / weight; ties rotate so equal backends share work instead of the first one
taking everything while the others idle.
"""

from __future__ import annotations

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
        best: Backend | None = None
        best_score = 0.0
        for i in range(n):
            backend = candidates[(self._turn + i) % n]
            if backend in exclude:
                continue
            score = (backend.in_flight + 1) / backend.weight
            if best is None or score < best_score:
                best, best_score = backend, score
        return best
