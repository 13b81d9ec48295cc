"""The circuit breaker against a reference model, over random sequences of outcomes and time (no sleeps)."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from sluice.config import BreakerConfig
from sluice.upstream.breaker import CircuitBreaker, State

CONFIG = BreakerConfig(
    failure_threshold=3, recovery_timeout=10, half_open_max_tries=2, failure_rate=0.5, window=20, min_requests=6
)


@dataclass
class Reference:
    """The specification, written as plainly as possible (failure rate over exact request times)."""

    now: float = 0.0
    state: str = "closed"
    streak: int = 0
    opened: float = 0.0
    probes: int = 0
    wins: int = 0
    history: list[tuple[float, bool]] = field(default_factory=list)

    def available(self) -> bool:
        if self.state == "closed":
            return True
        if self.state == "open":
            return self.now - self.opened >= CONFIG.recovery_timeout
        return self.probes < CONFIG.half_open_max_tries

    def attempt(self) -> None:
        if self.state == "open" and self.now - self.opened >= CONFIG.recovery_timeout:
            self.state, self.probes, self.wins = "half_open", 0, 0
        if self.state == "half_open":
            self.probes += 1

    def record(self, ok: bool) -> None:
        self.history.append((self.now, ok))
        if self.state == "half_open":
            self.probes = max(0, self.probes - 1)
            if not ok:
                self.state, self.opened, self.probes, self.wins = "open", self.now, 0, 0
            else:
                self.wins += 1
                if self.wins >= CONFIG.half_open_max_tries:
                    self.state, self.streak, self.probes, self.wins, self.history = "closed", 0, 0, 0, []
            return
        if ok:
            self.streak = 0
            return
        self.streak += 1
        recent = [good for t, good in self.history if t >= self.now - CONFIG.window]
        rate_bad = len(recent) >= CONFIG.min_requests and recent.count(False) / len(recent) >= CONFIG.failure_rate
        if self.state == "closed" and (self.streak >= CONFIG.failure_threshold or rate_bad):
            self.state, self.opened = "open", self.now


steps = st.lists(
    st.one_of(
        st.tuples(st.just("wait"), st.floats(0, 15)),
        st.tuples(st.just("send"), st.booleans()),  # attempt, then its outcome
        st.tuples(st.just("start"), st.just(True)),  # an attempt whose outcome comes later
        st.tuples(st.just("finish"), st.booleans()),
    ),
    max_size=80,
)


@given(steps)
@settings(max_examples=400)
def test_breaker_follows_the_reference(plan: list[tuple[str, object]]) -> None:
    ref = Reference()
    breaker = CircuitBreaker("b", CONFIG, clock=lambda: ref.now)
    outstanding = 0
    for action, value in plan:
        if action == "wait":
            ref.now += float(value)  # type: ignore[arg-type]
        elif action in ("send", "start"):
            assert breaker.available() == ref.available()
            if not ref.available():
                continue  # the balancer would skip this backend
            breaker.on_attempt()
            ref.attempt()
            if action == "send":
                breaker.record(bool(value))
                ref.record(bool(value))
            else:
                outstanding += 1
        elif outstanding:
            outstanding -= 1
            breaker.record(bool(value))
            ref.record(bool(value))
        assert breaker.state.name.lower() == ref.state
        assert breaker.probes_in_flight <= CONFIG.half_open_max_tries


def test_opens_after_threshold_rejects_then_probes_and_closes() -> None:
    now = [0.0]
    changes: list[State] = []
    breaker = CircuitBreaker("b", CONFIG, clock=lambda: now[0], on_change=lambda b: changes.append(b.state))
    for _ in range(3):
        breaker.on_attempt()
        breaker.record(False)
    assert breaker.state is State.OPEN and not breaker.available()
    now[0] = 9.9
    assert not breaker.available()
    now[0] = 10.0
    assert breaker.available()
    breaker.on_attempt()
    breaker.on_attempt()
    assert breaker.state is State.HALF_OPEN and not breaker.available()  # two probes at most
    breaker.record(True)
    breaker.record(True)
    assert breaker.state is State.CLOSED
    assert changes == [State.OPEN, State.HALF_OPEN, State.CLOSED]


def test_failure_rate_opens_without_a_streak() -> None:
    now = [0.0]
    breaker = CircuitBreaker("b", CONFIG, clock=lambda: now[0])
    for ok in (True, False, True, False, True, False):  # never two failures in a row, but half of them fail
        breaker.on_attempt()
        breaker.record(ok)
        now[0] += 1
    assert breaker.state is State.OPEN


def test_a_passed_health_check_half_opens_at_once_and_a_failed_probe_reopens() -> None:
    now = [0.0]
    breaker = CircuitBreaker("b", CONFIG, clock=lambda: now[0])
    breaker.health_recovered()
    assert breaker.state is State.CLOSED  # nothing to recover from
    for _ in range(3):
        breaker.on_attempt()
        breaker.record(False)
    now[0] = 1.0  # long before recovery_timeout (10 s)
    breaker.health_recovered()
    assert breaker.state is State.HALF_OPEN and breaker.available()
    breaker.on_attempt()
    breaker.record(False)
    assert breaker.state is State.OPEN and not breaker.available()  # the probes still decide
    breaker.health_recovered()
    breaker.on_attempt()
    breaker.on_attempt()
    breaker.record(True)
    breaker.record(True)
    assert breaker.state is State.CLOSED
