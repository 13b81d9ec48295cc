"""The rate-limit arithmetic (GCRA quotas and leases, in the local store) against a reference model, with an
injected clock (no sleeps).

The reference is a token bucket in exact fractions. GCRA allows a spend up to EPSILON seconds early, so
where the reference is within that slack of its own boundary either answer is accepted (and the reference
follows the implementation's), everywhere else they must agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sluice.ratelimit import Lease, Quota, RateLimiter, Verdict
from sluice.ratelimit.gcra import EPSILON, LEASE_RETRY_AFTER, decide
from sluice.ratelimit.local import LocalStore

BASE = 1_700_000_000.0  # an epoch-sized clock, where float rounding is at its worst
TICK = 1 / 1024  # clock steps are whole ticks: exact at BASE, so lease expiries have no rounding
LIMIT, TTL = 2, 5.0


class Clock:
    def __init__(self) -> None:
        self.now = BASE

    def __call__(self) -> float:
        return self.now


@dataclass
class Bucket:
    """The specification of one quota: `tokens` at time `at`, refilled at `rate` up to `burst`."""

    rate: Fraction
    burst: Fraction
    tokens: Fraction
    at: Fraction = Fraction(0)

    def level(self, now: Fraction) -> Fraction:
        return min(self.burst, self.tokens + self.rate * (now - self.at))

    def set(self, now: Fraction, tokens: Fraction) -> None:
        self.tokens, self.at = tokens, now


@dataclass
class Reference:
    quotas: list[Quota]
    buckets: list[Bucket] = field(default_factory=list)
    leases: dict[str, Fraction] = field(default_factory=dict)  # lease id -> expiry

    def __post_init__(self) -> None:
        self.buckets = [Bucket(Fraction(q.rate), Fraction(q.burst), Fraction(q.burst)) for q in self.quotas]

    def live_leases(self, now: Fraction) -> dict[str, Fraction]:
        self.leases = {lease_id: expiry for lease_id, expiry in self.leases.items() if expiry > now}
        return self.leases


def tolerance(quota: Quota) -> Fraction:
    """Float rounding, in units, of times up to a few hundred seconds at these rates and sizes."""
    return Fraction(1e-9) * Fraction(quota.burst + quota.cost + quota.rate)


def slack(quota: Quota) -> Fraction:
    """How early, in units, GCRA may allow a spend: EPSILON seconds' worth."""
    return Fraction(quota.rate) * Fraction(EPSILON) + tolerance(quota)


rates = st.floats(0.5, 500, allow_nan=False)
bursts = st.floats(1, 50, allow_nan=False)
costs = st.floats(0.1, 60, allow_nan=False)
ticks = st.integers(0, 4096)
steps = st.lists(
    st.one_of(
        st.tuples(st.just("wait"), ticks),
        st.tuples(st.just("admit"), st.lists(st.tuples(st.integers(0, 2), costs), max_size=3), st.integers(-1, 4)),
        st.tuples(st.just("settle"), st.integers(0, 2), st.floats(-60, 60, allow_nan=False)),
        st.tuples(st.just("release"), st.integers(0, 4)),
    ),
    max_size=60,
)


@given(st.lists(st.tuples(rates, bursts), min_size=1, max_size=3), steps)
@settings(max_examples=300, deadline=None)
def test_quotas_and_leases_follow_the_reference(limits: list[tuple[float, float]], plan: list[tuple[Any, ...]]) -> None:
    clock = Clock()
    store = LocalStore(clock)
    base = [Quota(f"q{i}", rate, burst, 1.0, "requests") for i, (rate, burst) in enumerate(limits)]
    ref = Reference(base)
    for step in plan:
        now = Fraction(clock.now)
        if step[0] == "wait":
            clock.now += step[1] * TICK
        elif step[0] == "release":
            store.release(Lease("conc", LIMIT, f"r{step[1]}", TTL))
            ref.leases.pop(f"r{step[1]}", None)
        elif step[0] == "settle":
            index = step[1] % len(base)
            store.settle([(base[index], step[2])], None)
            bucket = ref.buckets[index]
            bucket.set(now, min(bucket.burst, bucket.level(now) - Fraction(step[2])))
        else:
            chosen = {i % len(base): cost for i, cost in step[1]}  # distinct quotas, as the pipeline sends
            quotas = [Quota(base[i].key, base[i].rate, base[i].burst, cost, "tokens") for i, cost in chosen.items()]
            lease = None if step[2] < 0 else Lease("conc", LIMIT, f"r{step[2]}", TTL)
            verdict = store.admit(quotas, lease)
            check_admission(ref, now, quotas, [ref.buckets[i] for i in chosen], lease, verdict)


def check_admission(
    ref: Reference, now: Fraction, quotas: list[Quota], buckets: list[Bucket], lease: Lease | None, verdict: Verdict
) -> None:
    levels = [bucket.level(now) for bucket in buckets]
    margins = [level - Fraction(q.cost) for q, level in zip(quotas, levels, strict=True)]
    lease_free = True
    if lease is not None:
        live = ref.live_leases(now)
        lease_free = lease.lease_id in live or len(live) < lease.limit
    fits = [q.cost <= q.burst and m >= tolerance(q) for q, m in zip(quotas, margins, strict=True)]
    fails = [q.cost > q.burst or m < -slack(q) for q, m in zip(quotas, margins, strict=True)]
    if all(fits) and lease_free:
        assert verdict.allowed, (levels, verdict)
    if any(fails) or not lease_free:
        assert not verdict.allowed, (levels, verdict)
    assert len(verdict.states) == len(quotas)
    if verdict.allowed:
        assert verdict.retry_after == 0 and verdict.refused_by is None
        for quota, bucket, margin, state in zip(quotas, buckets, margins, verdict.states, strict=True):
            bucket.set(now, margin)
            assert abs(state.remaining - max(0, margin)) <= 1e-6 + slack(quota)
            assert abs(state.reset_after - (bucket.burst - margin) / bucket.rate) <= 2e-6
        if lease is not None:
            ref.leases[lease.lease_id] = now + Fraction(lease.ttl)
        return
    waits = [
        float("inf") if q.cost > q.burst else max(0, -m / Fraction(q.rate))
        for q, m in zip(quotas, margins, strict=True)
    ]
    expected = max([*waits, LEASE_RETRY_AFTER if not lease_free else 0])
    assert verdict.retry_after == expected or abs(verdict.retry_after - expected) <= 2e-6, (waits, verdict)
    assert verdict.refused_by is not None
    for quota, level, state in zip(quotas, levels, verdict.states, strict=True):
        assert abs(state.remaining - max(0, level)) <= 1e-6 + tolerance(quota)  # nothing was spent


@given(rates, bursts, st.lists(st.tuples(ticks, costs, st.booleans()), max_size=80))
@settings(max_examples=200, deadline=None)
def test_no_window_admits_more_than_burst_plus_rate_times_length(
    rate: float, burst: float, plan: list[tuple[int, float, bool]]
) -> None:
    """Over every window [a, b], admitted cost minus refunds is at most burst + rate × (b − a)."""
    clock = Clock()
    store = LocalStore(clock)
    events: list[tuple[float, float]] = []  # (time, units spent: + admitted, − refunded)
    for wait, cost, refund in plan:
        clock.now += wait * TICK / 8
        quota = Quota("q", rate, burst, cost, "tokens")
        if refund:
            store.settle([(quota, -cost)], None)
            events.append((clock.now, -cost))
        elif store.admit([quota], None).allowed:
            events.append((clock.now, cost))
    for i, (start, _) in enumerate(events):
        spent = 0.0
        for end, units in events[i:]:
            spent += units
            assert spent <= burst + rate * (end - start + EPSILON) + 1e-9 * (burst + rate), (start, end, spent)


@given(rates, bursts, st.floats(0.1, 1), st.integers(0, 30), st.lists(st.floats(0, 3), max_size=40))
@settings(max_examples=200, deadline=None)
def test_a_request_spaced_by_its_cost_over_rate_is_always_admitted(
    rate: float, burst: float, share: float, rush: int, extra: list[float]
) -> None:
    """After a rush at one instant, requests of the same cost spaced ≥ cost / rate apart all pass."""
    cost = burst * share
    clock = Clock()
    store = LocalStore(clock)
    quota = Quota("q", rate, burst, cost, "requests")
    assert store.admit([quota], None).allowed  # a full bucket takes any cost up to the burst
    for _ in range(rush):
        store.admit([quota], None)
    for more in extra:
        clock.now += cost / rate * (1 + more)
        assert store.admit([quota], None).allowed


@given(rates, bursts, st.lists(st.tuples(ticks, st.integers(0, 1), costs), max_size=60))
@settings(max_examples=200, deadline=None)
def test_a_refused_request_spends_nothing_in_any_quota(
    rate: float, burst: float, plan: list[tuple[int, int, float]]
) -> None:
    """Whatever refused it, asking again at the same instant gets the same answer: nothing was spent."""
    clock = Clock()
    store = LocalStore(clock)
    for wait, which, cost in plan:
        clock.now += wait * TICK / 8
        quotas = [Quota("small", rate, burst, cost / 4, "requests"), Quota("big", rate / 3, burst, cost, "tokens")]
        asked = quotas[which:] if which else quotas
        verdict = store.admit(asked, None)
        if not verdict.allowed:
            assert store.admit(asked, None) == verdict


@given(
    st.lists(st.tuples(rates, bursts, st.floats(0.05, 1)), min_size=1, max_size=3),
    st.lists(st.tuples(ticks, st.integers(0, 2), st.floats(0.05, 1)), max_size=40),
)
@settings(max_examples=200, deadline=None)
def test_retry_after_is_exactly_when_the_request_would_pass(
    limits: list[tuple[float, float, float]], traffic: list[tuple[int, int, float]]
) -> None:
    """What the Retry-After and x-ratelimit-reset-* headers are made of: refused a little earlier, allowed then."""
    clock = Clock()
    store = LocalStore(clock)
    quotas = [Quota(f"q{i}", rate, burst, burst * share, "tokens") for i, (rate, burst, share) in enumerate(limits)]
    for wait, which, share in traffic:  # leave the buckets at unrelated levels
        clock.now += wait * TICK / 16
        quota = quotas[which % len(quotas)]
        store.admit([Quota(quota.key, quota.rate, quota.burst, quota.burst * share, "tokens")], None)
    start = clock.now
    verdict = store.admit(quotas, None)
    if verdict.allowed:
        return
    assert verdict.refused_by is not None
    if verdict.retry_after > 1e-5:
        clock.now = start + verdict.retry_after - 1e-5
        assert not store.admit(quotas, None).allowed
    clock.now = start + verdict.retry_after
    assert store.admit(quotas, None).allowed


def test_a_held_lease_asks_for_at_least_a_second() -> None:
    clock = Clock()
    store = LocalStore(clock)
    quota = Quota("r", 10, 1, 1, "requests")
    assert store.admit([quota], Lease("conc", 1, "a", TTL)).allowed
    verdict = store.admit([quota], Lease("conc", 1, "b", TTL))  # the quota would pass in 0.1 s, the lease not
    assert not verdict.allowed and verdict.retry_after == LEASE_RETRY_AFTER and verdict.refused_by == "conc"
    slow = Quota("s", 0.25, 1, 1, "requests")
    assert store.admit([slow], None).allowed
    verdict = store.admit([slow], Lease("conc", 1, "b", TTL))  # now the quota is the longer wait
    assert verdict.retry_after == 4 and verdict.refused_by == "s"


@given(rates, bursts, st.lists(st.tuples(ticks, st.floats(-100, 0)), max_size=40))
@settings(max_examples=200, deadline=None)
def test_refunds_never_fill_a_bucket_beyond_its_burst(rate: float, burst: float, plan: list[tuple[int, float]]) -> None:
    clock = Clock()
    store = LocalStore(clock)
    quota = Quota("q", rate, burst, burst, "tokens")
    for wait, change in plan:
        clock.now += wait * TICK
        store.settle([(quota, change)], None)
    store.settle([(quota, -10 * burst)], None)
    assert store.admit([quota], None).allowed  # the whole burst at once, and not one unit more
    sliver = Quota("q", rate, burst, burst / 1000, "tokens")
    assert not store.admit([sliver], None).allowed


@given(st.integers(1, 4), st.lists(st.tuples(ticks, st.integers(0, 6), st.booleans()), max_size=80))
@settings(max_examples=200, deadline=None)
def test_leases_never_exceed_the_limit_and_expired_ones_are_reclaimed(
    limit: int, plan: list[tuple[int, int, bool]]
) -> None:
    clock = Clock()
    store = LocalStore(clock)
    held: dict[str, float] = {}  # lease id -> when the implementation granted it
    for wait, number, release in plan:
        clock.now += wait * TICK
        lease = Lease("conc", limit, f"r{number}", TTL)
        if release:
            store.release(lease)
            held.pop(lease.lease_id, None)
            continue
        verdict = store.admit([], lease)
        if verdict.allowed:
            held[lease.lease_id] = clock.now
        else:
            assert verdict.refused_by == "conc" and verdict.retry_after == LEASE_RETRY_AFTER
        held = {lease_id: at for lease_id, at in held.items() if at + TTL > clock.now}
        assert len(held) <= limit
    clock.now += TTL
    fresh = [store.admit([], Lease("conc", limit, f"new{i}", TTL)).allowed for i in range(limit + 1)]
    assert fresh == [True] * limit + [False]  # every old lease expired: exactly `limit` new ones fit


def test_a_cost_above_the_burst_is_refused_for_ever() -> None:
    store = LocalStore(Clock())
    verdict = store.admit([Quota("t", 10, 100, 101, "tokens")], None)
    assert not verdict.allowed and verdict.retry_after == float("inf") and verdict.refused_by == "t"


@pytest.mark.parametrize("now", [0.0, 0.123456789, 73_000_000.987654321, BASE + 0.123456789])
def test_states_report_whole_units_without_rounding_below_them(now: float) -> None:
    """Times near the epoch lose their last bits; the header code floors `remaining`, so 8.9999999 would be 8."""
    quota = Quota("r", 7 / 60, 10, 1, "requests")
    tats, remaining = [0.0], []
    for _ in range(3):
        verdict, tats = decide(now, [quota], tats, None, True, False)
        remaining.append(verdict.states[0].remaining)
    assert remaining == [9, 8, 7]
    assert verdict.states[0].reset_after == round(3 * 60 / 7, 6)


def test_memory_stays_bounded_with_millions_of_callers() -> None:
    clock = Clock()
    store = LocalStore(clock, max_entries=1000)
    for i in range(20_000):
        clock.now += 0.001
        store.admit([Quota(f"ip:{i}", 1, 5, 1, "requests")], Lease(f"conc:{i}", 1, "x", TTL))
        assert len(store) <= 2 * 1000
    hot = Quota("ip:hot", 1, 2, 1, "requests")
    assert [store.admit([hot], None).allowed for _ in range(3)] == [True, True, False]


async def test_without_redis_the_limiter_decides_and_settles_in_process() -> None:
    clock = Clock()
    limiter = RateLimiter(None, clock=clock)
    await limiter.start()
    tokens = Quota("k:tok", 10, 100, 80, "tokens")
    assert (await limiter.admit([tokens])).states[0].remaining == 20
    await limiter.settle([(tokens, 30.0)])  # used 30 of the 80 reserved: 50 come back
    probe = Quota("k:tok", 10, 100, 70, "tokens")
    verdict = await limiter.admit([probe])
    assert verdict.allowed and verdict.states[0].remaining == 0 and not verdict.degraded
    lease = Lease("k:conc", 1, "a", TTL)
    assert (await limiter.admit([], lease)).allowed
    assert not (await limiter.admit([], Lease("k:conc", 1, "b", TTL))).allowed
    await limiter.settle((), lease)
    assert (await limiter.admit([], Lease("k:conc", 1, "b", TTL))).allowed
    await limiter.close()
