"""A circuit breaker: stop sending work to a backend (or one model on it) that keeps failing, probe it later.

closed → open after `failure_threshold` consecutive failures, or when at least `min_requests` requests in
the last `window` seconds (at most the last MAX_OUTCOMES of them) failed at a rate of `failure_rate` or
more. open → rejects for
`recovery_timeout` seconds, then half-open: at most `half_open_max_tries` probe requests at a time; that
many successes close it, any failure reopens it. Failures are what a retry elsewhere would be tried for:
connect errors, timeouts, 5xx, streams cut by the backend. The clock is injected, so the state machine is
tested with property tests rather than sleeps. Each backend has one for itself and one per model it serves
(`model` set); the dispatcher decides which outcome counts where. A backend that the health checks saw go
down and come back (a restarted engine) need not wait out `recovery_timeout`: its own circuit goes
half-open at once (`health_recovered`), so the next requests probe it.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from enum import IntEnum

from sluice.config import BreakerConfig

log = logging.getLogger("sluice.breaker")
MAX_OUTCOMES = 1000  # bounds the failure-rate window's memory at high request rates


class State(IntEnum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    __slots__ = (
        "_clock",
        "_failures",
        "_on_change",
        "_outcomes",
        "_settings",
        "consecutive_failures",
        "model",
        "name",
        "opened_at",
        "probe_successes",
        "probes_in_flight",
        "state",
    )

    def __init__(
        self,
        name: str,
        settings: BreakerConfig,
        clock: Callable[[], float],
        on_change: Callable[[CircuitBreaker], None] | None = None,
        model: str = "",
    ) -> None:
        self.name = name
        self.model = model
        self._settings = settings
        self._clock = clock
        self._on_change = on_change
        self.state = State.CLOSED
        self.consecutive_failures = 0
        self.opened_at = 0.0
        self.probes_in_flight = 0
        self.probe_successes = 0
        self._outcomes: deque[tuple[float, bool]] = deque()  # (time, ok) in the window, oldest first
        self._failures = 0

    def available(self) -> bool:
        """Whether a request may be sent now (does not reserve anything)."""
        if self.state is State.CLOSED:
            return True
        if self.state is State.OPEN:
            return self._clock() - self.opened_at >= self._settings.recovery_timeout
        return self.probes_in_flight < self._settings.half_open_max_tries

    def on_attempt(self) -> None:
        """A request is being sent to the backend (call after choosing it)."""
        if self.state is State.OPEN and self._clock() - self.opened_at >= self._settings.recovery_timeout:
            self._move(State.HALF_OPEN)
        if self.state is State.HALF_OPEN:
            self.probes_in_flight += 1

    def health_recovered(self) -> None:
        """An active health check passed again after failing: probe now instead of after `recovery_timeout`.

        Half-open, not closed: the first requests decide, and any failure opens the circuit again.
        """
        if self.state is State.OPEN:
            self._move(State.HALF_OPEN)

    def abandon(self) -> None:
        """An attempt ended without an outcome (the client left): free its probe slot."""
        if self.state is State.HALF_OPEN:
            self.probes_in_flight = max(0, self.probes_in_flight - 1)

    def record(self, ok: bool) -> None:
        """The outcome of an attempt started with `on_attempt`."""
        self._count(ok)
        if self.state is State.HALF_OPEN:
            self.probes_in_flight = max(0, self.probes_in_flight - 1)
            if not ok:
                self._open()
                return
            self.probe_successes += 1
            if self.probe_successes >= self._settings.half_open_max_tries:
                self._move(State.CLOSED)
            return
        if ok:
            self.consecutive_failures = 0
            return
        self.consecutive_failures += 1
        if self.state is State.CLOSED and (
            self.consecutive_failures >= self._settings.failure_threshold or self._rate_exceeded()
        ):
            self._open()

    def _open(self) -> None:
        self.opened_at = self._clock()
        self._move(State.OPEN)

    def _move(self, state: State) -> None:
        previous = self.state
        self.state = state
        self.probes_in_flight = 0
        self.probe_successes = 0
        if state is State.CLOSED:
            self.consecutive_failures = 0
            self._outcomes.clear()
            self._failures = 0
        if previous is not state:
            log.warning(
                "circuit %s",
                state.name.lower(),
                extra={"backend": self.name, "model": self.model or None, "from": previous.name.lower()},
            )
            if self._on_change is not None:
                self._on_change(self)

    def _count(self, ok: bool) -> None:
        now = self._clock()
        outcomes = self._outcomes
        outcomes.append((now, ok))
        if not ok:
            self._failures += 1
        horizon = now - self._settings.window
        while outcomes and (outcomes[0][0] < horizon or len(outcomes) > MAX_OUTCOMES):
            if not outcomes.popleft()[1]:
                self._failures -= 1

    def _rate_exceeded(self) -> bool:
        requests = len(self._outcomes)
        return requests >= self._settings.min_requests and self._failures / requests >= self._settings.failure_rate
