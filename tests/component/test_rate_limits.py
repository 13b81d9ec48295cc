"""Rate limits through the gateway: per key (requests, tokens, concurrency) and per client address."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from typing import Any

import aiohttp
import orjson
from multidict import CIMultiDictProxy

from sluice.app import Gateway
from tests.conftest import API_KEY, StartFake, StartGateway
from tests.redis_server import RedisServer

CHAT = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
HEALTH = {"interval": 60, "timeout": 1, "discovery_interval": 60}


def redis_section(url: str = "redis://127.0.0.1:6379/0") -> dict[str, Any]:
    return {"url": url, "key_prefix": f"sluice-test-{secrets.token_hex(4)}:"}


def keys(**limits: Any) -> dict[str, Any]:
    return {"api_keys": [{"name": "limited", "key": API_KEY, **limits}]}


async def post(
    gw: Gateway, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None
) -> tuple[int, CIMultiDictProxy[str], bytes]:
    async with aiohttp.ClientSession() as session, session.post(
        gw.url + "/v1/chat/completions",
        json=body or CHAT,
        headers={"Authorization": f"Bearer {API_KEY}", **(headers or {})},
    ) as response:
        return response.status, response.headers, await response.read()


async def test_requests_per_minute_refuse_with_429_and_openai_headers(fake: StartFake, gateway: StartGateway) -> None:
    gw = await gateway([await fake("base")], health=HEALTH, auth=keys(requests_per_minute=120), redis=redis_section())
    results = [await post(gw) for _ in range(4)]  # burst: one second's worth, 2 requests
    assert [status for status, _, _ in results] == [200, 200, 429, 429]
    ok_headers = results[0][1]
    assert ok_headers["x-ratelimit-limit-requests"] == "120"
    assert ok_headers["x-ratelimit-remaining-requests"] == "1"
    assert ok_headers["x-ratelimit-reset-requests"].endswith("ms")
    _, headers, body = results[2]
    error = orjson.loads(body)["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
    assert "requests-per-minute" in error["message"] and int(headers["retry-after"]) >= 1
    assert headers["x-ratelimit-remaining-requests"] == "0"
    await asyncio.sleep(0.6)  # 2 per second: one more is allowed after half a second
    assert (await post(gw))[0] == 200
    assert 'sluice_rate_limited_total{reason="requests"} 2.0' in gw.metrics.render().decode()


async def test_tokens_are_reserved_then_settled_with_the_real_usage(fake: StartFake, gateway: StartGateway) -> None:
    backend = await fake("base")
    gw = await gateway([backend], health=HEALTH, auth=keys(tokens_per_minute=2000), redis=redis_section())
    big = {**CHAT, "max_tokens": 1500}  # reserves ~1,520 of 2,000
    short = {"X-Fake-Tokens": "5"}  # the answer stops after 5 tokens: ~10 used in all
    status, headers, _ = await post(gw, big, short)
    assert status == 200
    reserved_left = int(headers["x-ratelimit-remaining-tokens"])
    assert reserved_left < 500
    await asyncio.sleep(0.2)  # settled in the background: the answer used ~10 tokens, the rest comes back
    status, headers, _ = await post(gw, big, short)
    assert status == 200, "the first reservation was refunded"
    streamed = {**big, "stream": True}
    async with aiohttp.ClientSession() as session:
        await asyncio.sleep(0.2)
        for _ in range(2):
            async with session.post(
                gw.url + "/v1/chat/completions", json=streamed, headers={"Authorization": f"Bearer {API_KEY}", **short}
            ) as response:
                assert response.status == 200
                assert b"[DONE]" in await response.read()
            await asyncio.sleep(0.2)
    too_big = {**CHAT, "max_tokens": 5000}
    status, _, body = await post(gw, too_big)
    assert status == 429 and "more than this key's limit of 2000 tokens" in body.decode()


async def test_concurrent_requests_per_key(fake: StartFake, gateway: StartGateway) -> None:
    gw = await gateway(
        [await fake("base", ttft_ms=400)], health=HEALTH, auth=keys(max_concurrency=2), redis=redis_section()
    )
    statuses = sorted(status for status, _, _ in await asyncio.gather(*(post(gw) for _ in range(5))))
    assert statuses == [200, 200, 429, 429, 429]
    await asyncio.sleep(0.1)  # the two leases are released as the answers end
    assert sorted(s for s, _, _ in await asyncio.gather(*(post(gw) for _ in range(2)))) == [200, 200]


async def test_per_ip_limits_trust_x_forwarded_for_only_from_proxies(fake: StartFake, gateway: StartGateway) -> None:
    per_ip = {"requests": {"rate": 1, "burst": 2}, "stream_requests": {"rate": 1, "burst": 3}}
    gw = await gateway(
        [await fake("base")], health=HEALTH, redis=redis_section(), rate_limits={"per_ip": per_ip}
    )
    alice, bob = {"X-Forwarded-For": "203.0.113.7"}, {"X-Forwarded-For": "198.51.100.1, 127.0.0.1"}
    assert [(await post(gw, headers=alice))[0] for _ in range(3)] == [200, 200, 429]
    assert [(await post(gw, headers=bob))[0] for _ in range(3)] == [200, 200, 429]  # another client
    streams = {**CHAT, "stream": True}
    assert [(await post(gw, streams, alice))[0] for _ in range(4)] == [200, 200, 200, 429]  # counted apart
    untrusting = await gateway(
        [await fake("base")], health=HEALTH, redis=redis_section(),
        rate_limits={"per_ip": per_ip, "trusted_proxies": []},
    )
    spoofed = [(await post(untrusting, headers={"X-Forwarded-For": f"192.0.2.{i}"}))[0] for i in range(3)]
    assert spoofed == [200, 200, 429]  # the header is ignored: all of them are the peer, 127.0.0.1


async def test_without_redis_limits_live_in_the_process(fake: StartFake, gateway: StartGateway) -> None:
    gw = await gateway([await fake("base")], health=HEALTH, auth=keys(requests_per_minute=60))
    assert [(await post(gw))[0] for _ in range(2)] == [200, 429]


async def test_redis_outage_fail_open_then_recovers(fake: StartFake, gateway: StartGateway) -> None:
    async with RedisServer() as redis:
        gw = await gateway(
            [await fake("base")], health=HEALTH, auth=keys(requests_per_minute=60),
            redis={**redis_section(redis.url), "timeout": 0.2},
        )
        assert [(await post(gw))[0] for _ in range(2)] == [200, 429]
        await redis.stop()
        statuses = [(await post(gw))[0] for _ in range(3)]
        assert statuses[0] == 200 and statuses[1:] == [429, 429]  # local limits: one per second again
        metrics = gw.metrics.render().decode()
        assert "sluice_rate_limit_degraded 1.0" in metrics
        await redis.start()
        await asyncio.sleep(1.2)  # the limiter tries Redis again after its retry interval
        assert (await post(gw))[0] in (200, 429)
        assert "sluice_rate_limit_degraded 0.0" in gw.metrics.render().decode()


async def test_redis_outage_fail_closed_answers_503_then_recovers(fake: StartFake, gateway: StartGateway) -> None:
    async with RedisServer() as redis:
        gw = await gateway(
            [await fake("base")], health=HEALTH, auth=keys(requests_per_minute=600),
            redis={**redis_section(redis.url), "timeout": 0.2}, rate_limits={"on_redis_failure": "fail_closed"},
        )
        assert (await post(gw))[0] == 200
        await redis.stop()
        status, headers, body = await post(gw)
        assert status == 503 and headers["retry-after"] == "1"
        assert orjson.loads(body)["error"]["code"] == "rate_limiter_unavailable"
        await redis.start()
        await asyncio.sleep(1.2)
        assert (await post(gw))[0] == 200


async def test_a_stream_the_client_leaves_keeps_its_token_reservation(fake: StartFake, gateway: StartGateway) -> None:
    backend = await fake("base", tokens=200, itl_ms=20)
    gw = await gateway([backend], health=HEALTH, auth=keys(tokens_per_minute=2000), redis=redis_section())
    body = {**CHAT, "max_tokens": 1500, "stream": True}
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            gw.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}
        )
        assert response.status == 200
        await response.content.readline()
        response.close()  # gone mid-stream: no usage seen, so nothing is refunded
    await asyncio.sleep(0.3)
    status, _, _ = await post(gw, {**CHAT, "max_tokens": 1500})
    assert status == 429


async def test_a_client_leaving_during_admission_gives_its_concurrency_slot_back(
    fake: StartFake, gateway: StartGateway
) -> None:
    gw = await gateway([await fake("base")], health=HEALTH, auth=keys(max_concurrency=1), redis=redis_section())
    admit = gw.limiter.admit

    async def slow_admit(*args: Any, **kwargs: Any) -> Any:
        verdict = await admit(*args, **kwargs)  # Redis has granted the slot...
        await asyncio.sleep(0.5)  # ...but the answer is still on its way when the client leaves
        return verdict

    gw.limiter.admit = slow_admit  # type: ignore[method-assign]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(post(gw), 0.2)
    gw.limiter.admit = admit  # type: ignore[method-assign]
    await asyncio.sleep(0.6)
    assert (await post(gw))[0] == 200  # the abandoned request's slot came back
