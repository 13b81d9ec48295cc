"""The rate limiter against real Redis: the Lua scripts agree with the Python arithmetic, replicas share one
limit, and outages follow the failure policy (on a throwaway redis-server that is stopped and restarted).

Tests on the machine's Redis (127.0.0.1:6379) use a unique key prefix and delete their keys afterwards.
Quotas here refill slowly (a unit every tens of seconds or more) so the time a test takes on a busy
machine does not change any decision.
"""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import signal
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from sluice.ratelimit import Lease, LimiterUnavailable, Quota, RateLimiter, Verdict
from sluice.ratelimit.gcra import decide
from sluice.ratelimit.redis_store import ADMIT, EPOCH
from tests.redis_server import RedisServer

URL = "redis://127.0.0.1:6379/0"


class Clock:
    """Drives the local store and the limiter's retry timing; Redis keeps its own time."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    client = Redis.from_url(URL)
    yield client
    await client.aclose()


@pytest.fixture
async def prefix(redis: Redis) -> AsyncIterator[str]:
    prefix = f"sluice-test-rl-{secrets.token_hex(6)}:"
    yield prefix
    found = [key async for key in redis.scan_iter(match=prefix + "*")]
    if found:
        await redis.delete(*found)


@pytest.fixture
async def limiters(prefix: str) -> AsyncIterator[list[RateLimiter]]:
    """Two limiters on the same Redis, like two gateway replicas."""
    started = [RateLimiter(URL, key_prefix=prefix), RateLimiter(URL, key_prefix=prefix)]
    for limiter in started:
        await limiter.start()
    yield started
    for limiter in started:
        await limiter.close()


def same(redis_verdict: Verdict, local_verdict: Verdict) -> bool:
    if (redis_verdict.allowed, redis_verdict.refused_by) != (local_verdict.allowed, local_verdict.refused_by):
        return False
    if abs(redis_verdict.retry_after - local_verdict.retry_after) > 0.5:
        return False
    return all(
        abs(a.remaining - b.remaining) < 0.05 and abs(a.reset_after - b.reset_after) < 0.5
        for a, b in zip(redis_verdict.states, local_verdict.states, strict=True)
    )


async def test_redis_and_the_local_store_decide_a_sequence_alike(limiters: list[RateLimiter]) -> None:
    limiter, rng = limiters[0], random.Random(5)
    local = RateLimiter(None)  # both on real time: Redis's and this machine's
    quotas = [Quota("a", 0.01, 12, 1, "requests"), Quota("b", 0.02, 60, 1, "tokens"), Quota("c", 0.005, 8, 1, "tokens")]
    allowed = refused = 0
    for step in range(150):
        chosen = rng.sample(quotas, rng.randint(0, 3))
        asked = [Quota(q.key, q.rate, q.burst, float(rng.randint(1, 10)), q.kind) for q in chosen]
        lease = Lease("conc", 2, f"r{rng.randint(0, 4)}", 60) if rng.random() < 0.4 else None
        if rng.random() < 0.25:
            adjust = [(q, float(rng.randint(0, 10))) for q in asked]
            await limiter.settle(adjust, lease)
            await local.settle(adjust, lease)
            continue
        if not asked and lease is None:
            continue
        shared, alone = await limiter.admit(asked, lease), await local.admit(asked, lease)
        assert same(shared, alone), (step, shared, alone)
        allowed, refused = allowed + shared.allowed, refused + (not shared.allowed)
    assert allowed > 20 and refused > 20, (allowed, refused)  # the sequence exercised both answers
    assert limiter.redis_errors == 0 and not limiter.degraded


async def test_the_lua_script_decides_exactly_as_the_python_arithmetic(redis: Redis, prefix: str) -> None:
    """Same TAT, same Redis time: same decision and the same stored TAT, to the last bit, near the boundary too."""
    rng = random.Random(7)
    key = prefix + "lua"
    seconds, micros = await redis.time()
    for _ in range(300):
        rate, burst = rng.uniform(0.1, 1000), rng.uniform(1, 100)
        quota = Quota("lua", rate, burst, rng.uniform(0.1, burst * 1.1), "tokens")
        approx_now = (seconds - EPOCH) + micros / 1e6
        boundary = approx_now + (quota.burst - quota.cost) / quota.rate  # where excess() crosses zero
        tat = boundary + rng.choice([rng.uniform(-2, 2), rng.uniform(-0.01, 0.01), rng.uniform(-2, 2) * burst / rate])
        await redis.set(key, repr(tat))
        allowed, now, free, before = await redis.eval(ADMIT, 1, key, 1, quota.rate, quota.burst, quota.cost)
        assert float(before) == tat and free == 1
        verdict, _ = decide(float(now), [quota], [tat], None, True, False)
        assert bool(allowed) == verdict.allowed, (quota, tat, now)
        expected = max(tat, float(now)) + quota.cost / quota.rate if verdict.allowed else tat
        stored = await redis.get(key)
        if stored is None:  # expired already: it was due within milliseconds
            assert expected - float(now) < 0.1
        else:
            assert float(stored) == expected
        seconds, micros = divmod(int((float(now) + EPOCH) * 1e6), 1_000_000)


async def test_two_replicas_share_one_limit(limiters: list[RateLimiter]) -> None:
    a, b = limiters
    quota = Quota("key:k:req", 0.01, 10, 1, "requests")
    results = [await (a if i % 2 else b).admit([quota]) for i in range(30)]
    assert sum(v.allowed for v in results) == 10 and not any(v.allowed for v in results[10:])
    assert results[9].states[0].remaining == pytest.approx(0, abs=0.01)
    assert results[-1].retry_after == pytest.approx(100, abs=1)  # one unit at 0.01 per second
    leases = [Lease("key:k:conc", 2, f"r{i}", 60) for i in range(4)]
    granted = [(await (a if i % 2 else b).admit([], lease)).allowed for i, lease in enumerate(leases)]
    assert granted == [True, True, False, False]
    await a.settle((), leases[1])  # released through the other replica than the one that granted it
    assert (await b.admit([], leases[2])).allowed


async def test_all_or_nothing_spends_no_quota_and_takes_no_lease_when_one_refuses(
    limiters: list[RateLimiter], redis: Redis, prefix: str
) -> None:
    limiter = limiters[0]
    tight, roomy = Quota("tight", 0.01, 1, 1, "requests"), Quota("roomy", 0.01, 10, 3, "tokens")
    assert (await limiter.admit([tight])).allowed
    lease = Lease("conc", 1, "r1", 60)
    verdict = await limiter.admit([roomy, tight], lease)
    assert not verdict.allowed and verdict.refused_by == "tight"
    assert verdict.states[0].remaining == pytest.approx(10, abs=0.01)  # roomy: nothing spent
    assert await redis.exists(prefix + "roomy", prefix + "conc") == 0
    alone = await limiter.admit([roomy], Lease("conc", 1, "r2", 60))
    assert alone.allowed and alone.states[0].remaining == pytest.approx(7, abs=0.01)


async def test_leases_are_released_and_expire(limiters: list[RateLimiter], redis: Redis, prefix: str) -> None:
    limiter = limiters[0]
    first, second, third = (Lease("conc", 2, f"r{i}", 0.4) for i in range(3))
    assert (await limiter.admit([], first)).allowed and (await limiter.admit([], second)).allowed
    refused = await limiter.admit([], third)
    assert not refused.allowed and refused.refused_by == "conc" and refused.retry_after == 1.0
    assert (await limiter.admit([], first)).allowed  # the same request again keeps its one slot
    await limiter.settle((), first)
    assert (await limiter.admit([], third)).allowed
    assert 0 < await redis.pttl(prefix + "conc") <= 400
    await asyncio.sleep(0.45)  # a crashed replica's slots come back after their ttl
    assert await redis.exists(prefix + "conc") == 0
    assert (await limiter.admit([], Lease("conc", 2, "long", 60))).allowed
    assert (await limiter.admit([], Lease("conc", 2, "short", 0.3))).allowed
    await asyncio.sleep(0.35)  # one slot expired while the other keeps the set alive
    assert (await limiter.admit([], Lease("conc", 2, "next", 60))).allowed
    assert not (await limiter.admit([], Lease("conc", 2, "one-too-many", 60))).allowed


async def test_settle_refunds_and_charges_and_idle_state_expires(
    limiters: list[RateLimiter], redis: Redis, prefix: str
) -> None:
    limiter = limiters[0]
    tokens = Quota("tok", 100, 1000, 800, "tokens")
    assert (await limiter.admit([tokens])).states[0].remaining == pytest.approx(200, abs=5)
    await limiter.settle([(tokens, 100.0)])  # 700 of the 800 reserved come back
    probe = await limiter.admit([Quota("tok", 100, 1000, 0.001, "tokens")])
    assert probe.states[0].remaining == pytest.approx(900, abs=20)
    await limiter.settle([(tokens, 0.0)] * 3)  # refunds stop at a full bucket
    full = await limiter.admit([Quota("tok", 100, 1000, 1000, "tokens")])
    assert full.allowed and full.states[0].reset_after == pytest.approx(10, abs=0.1)
    assert 9_000 < await redis.pttl(prefix + "tok") <= 10_000  # gone once the bucket is full again
    await limiter.settle([(Quota("tok", 100, 1000, 0, "tokens"), 500.0)])  # used more than reserved
    later = await limiter.admit([Quota("tok", 100, 1000, 1, "tokens")])
    assert not later.allowed and later.retry_after == pytest.approx(5.01, abs=0.1)


async def test_no_quotas_and_no_lease_never_touch_redis() -> None:
    async with RedisServer() as server:
        limiter = RateLimiter(server.url, on_failure="fail_closed")
        await limiter.start()
        await server.stop()
        for _ in range(3):
            verdict = await limiter.admit([])
            assert verdict.allowed and verdict.states == () and not verdict.degraded
            await limiter.settle()
            await limiter.settle([(Quota("t", 1, 10, 5, "tokens"), 5.0)])  # used what it reserved: nothing to do
        assert limiter.redis_errors == 0 and not limiter.degraded
        await limiter.close()


async def pid_of(server: RedisServer) -> int:
    client = Redis.from_url(server.url)
    info = await client.info("server")
    await client.aclose()
    return int(info["process_id"])


async def test_fail_open_decides_locally_while_redis_hangs_and_recovers() -> None:
    clock = Clock()
    quota = Quota("ip:1:req", 0.01, 3, 1, "requests")
    async with RedisServer() as server:
        limiter = RateLimiter(server.url, timeout=0.25, clock=clock, retry_interval=1.0, key_prefix="t:")
        await limiter.start()
        assert (await limiter.admit([quota])).allowed and not limiter.degraded
        pid = await pid_of(server)
        os.kill(pid, signal.SIGSTOP)  # Redis hangs: connections open, nothing answers
        try:
            started = time.perf_counter()
            first = await limiter.admit([quota])
            assert time.perf_counter() - started >= 0.2  # this call paid the timeout...
            assert first.allowed and first.degraded and limiter.degraded and limiter.redis_errors == 1
            started = time.perf_counter()
            local = [await limiter.admit([quota]) for _ in range(200)]
            await limiter.settle((), Lease("conc", 1, "gone", 60))  # never raises
            assert time.perf_counter() - started < 0.2  # ...the next ones did not wait on Redis at all
            assert limiter.redis_errors == 1
            assert [v.allowed for v in local[:3]] == [True, True, False]  # the local store's own limit
            assert all(v.degraded for v in local)
            clock.now += 1.0  # the retry interval passed: one call tries Redis, which still hangs
            assert (await limiter.admit([quota])).degraded and limiter.redis_errors == 2
        finally:
            os.kill(pid, signal.SIGCONT)
        assert (await limiter.admit([quota])).degraded  # not retried before the interval passes
        clock.now += 1.0
        back = await limiter.admit([quota])
        assert not back.degraded and not limiter.degraded
        await limiter.close()


async def test_fail_closed_refuses_while_redis_is_down_and_recovers() -> None:
    clock = Clock()
    quota = Quota("key:k:req", 0.01, 5, 1, "requests")
    server = RedisServer()
    limiter = RateLimiter(server.url, on_failure="fail_closed", clock=clock, key_prefix="t:")
    await limiter.start()  # Redis is not up yet: the gateway still starts
    assert limiter.degraded and limiter.redis_errors == 1
    with pytest.raises(LimiterUnavailable):
        await limiter.admit([quota])
    try:
        await server.start()
        clock.now += 1.0
        assert (await limiter.admit([quota])).allowed and not limiter.degraded
        await server.stop()  # killed: connections refused
        for _ in range(50):
            with pytest.raises(LimiterUnavailable):
                await limiter.admit([quota])
            await limiter.settle([(Quota("key:k:tok", 1, 10, 5, "tokens"), 1.0)])  # never raises
        assert limiter.redis_errors == 2  # one try per retry interval, not one per call
        await server.start()  # the same port, empty
        clock.now += 1.0
        verdict = await limiter.admit([quota])
        assert verdict.allowed and not verdict.degraded and not limiter.degraded
        assert verdict.states[0].remaining == pytest.approx(4, abs=0.01)
    finally:
        await limiter.close()
        await server.__aexit__(None, None, None)


async def test_a_lease_taken_locally_during_an_outage_is_released_after_it() -> None:
    clock = Clock()
    async with RedisServer() as server:
        limiter = RateLimiter(server.url, clock=clock, key_prefix="t:")
        await limiter.start()
        await server.stop()
        first = Lease("key:k:conc", 1, "r1", 60)
        assert (await limiter.admit([], first)).degraded
        await server.start()
        clock.now += 1.0
        await limiter.settle((), first)  # Redis answers again, and the local slot is freed too
        assert not limiter.degraded
        await server.stop()
        clock.now += 1.0
        verdict = await limiter.admit([], Lease("key:k:conc", 1, "r2", 60))
        assert verdict.degraded and verdict.allowed
        await limiter.close()


async def test_a_restarted_redis_is_used_again_without_failing_a_request(prefix: str) -> None:
    """Pooled connections to the old process are dead; one retry on a fresh connection hides that."""
    async with RedisServer() as server:
        limiter = RateLimiter(server.url, key_prefix=prefix)
        await limiter.start()
        await asyncio.gather(*(limiter.admit([Quota(f"q{i}", 1, 5, 1, "requests")]) for i in range(8)))
        await server.stop()
        await server.start()
        verdicts = [await limiter.admit([Quota(f"q{i}", 1, 5, 1, "requests")]) for i in range(8)]
        assert not any(v.degraded for v in verdicts) and limiter.redis_errors == 0
        await limiter.close()
