"""Failures before the first byte are retried elsewhere; failures after it end the stream in-band."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import openai
import orjson
import pytest
from multidict import CIMultiDict

from sluice.sse import EventSplitter
from sluice.testing.fake_vllm import FakeVLLMSettings, start_fake_vllm
from tests.conftest import API_KEY, StartFake, StartGateway, free_port

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
CHAT = {"model": "base", "messages": [{"role": "user", "content": "hi"}]}
SLOW_HEALTH = {"interval": 60, "timeout": 1, "discovery_interval": 60}


async def post(
    gw_url: str, body: dict[str, object], headers: dict[str, str] | None = None
) -> tuple[int, CIMultiDict[str], bytes]:
    async with aiohttp.ClientSession() as session, session.post(
        gw_url + "/v1/chat/completions", json=body, headers={**HEADERS, **(headers or {})}
    ) as response:
        return response.status, CIMultiDict(response.headers), await response.read()


async def test_backend_killed_before_request_is_retried_elsewhere(fake: StartFake, gateway: StartGateway) -> None:
    a, b = await fake("base"), await fake("base")
    gw = await gateway([a, b], health=SLOW_HEALTH)  # the gateway will not notice through health checks
    await a.close()
    results = [await post(gw.url, CHAT) for _ in range(6)]
    assert [status for status, _, _ in results] == [200] * 6
    assert b.stats.completed == 6
    dead = gw.backends.by_name["b0"]
    assert not dead.healthy and "connect" in dead.last_error
    page = gw.metrics.render().decode()
    assert 'sluice_upstream_retries_total{backend="b0",reason="no_healthy_backend"} 1.0' in page
    assert 'sluice_upstream_retries_total{backend="b1",reason="no_healthy_backend"} 0.0' in page


async def test_every_backend_has_its_failure_series_at_zero_from_the_start(
    fake: StartFake, gateway: StartGateway
) -> None:
    """rate() sees no increase in a series born with it: a backend's first failures must land on a 0."""
    gw = await gateway([await fake("base"), await fake("base")])
    page = gw.metrics.render().decode()
    for backend in ("b0", "b1"):
        assert f'sluice_stream_errors_total{{backend="{backend}"}} 0.0' in page
        for reason in ("bad_gateway", "no_healthy_backend", "upstream_timeout"):
            assert f'sluice_upstream_retries_total{{backend="{backend}",reason="{reason}"}} 0.0' in page


async def test_5xx_is_retried_on_another_backend(fake: StartFake, gateway: StartGateway) -> None:
    a, b = await fake("base", fail="500"), await fake("base")
    gw = await gateway([a, b])
    results = [await post(gw.url, CHAT) for _ in range(8)]
    assert all(status == 200 for status, _, _ in results)
    assert a.stats.requests_total > 0  # the failing backend was tried and its failures hidden
    assert b.stats.completed == 8


async def test_all_backends_failing_gives_502_with_the_backend_message(fake: StartFake, gateway: StartGateway) -> None:
    a, b = await fake("base", fail="500"), await fake("base", fail="503")
    gw = await gateway([a, b])
    status, headers, body = await post(gw.url, CHAT)
    assert status == 502
    error = orjson.loads(body)["error"]
    assert error["type"] == "upstream_error" and "answered 50" in error["message"]
    assert a.stats.requests_total == 1 and b.stats.requests_total == 1  # one retry, no more
    assert "X-Request-Id" in headers


async def test_no_healthy_backend_is_503_with_retry_after(gateway: StartGateway) -> None:
    gw = await gateway([f"http://127.0.0.1:{free_port()}"], health=SLOW_HEALTH)
    gw.backends.by_name["b0"].models = frozenset({"base"})  # known from an earlier discovery, now down
    gw.backends.rebuild()
    status, headers, body = await post(gw.url, CHAT)
    assert status == 503
    assert headers["Retry-After"] == "5"
    assert orjson.loads(body)["error"]["code"] == "no_healthy_backend"
    async with aiohttp.ClientSession() as session, session.get(gw.url + "/ready") as response:
        assert response.status == 503


async def test_hanging_backend_times_out_then_fails_over(fake: StartFake, gateway: StartGateway) -> None:
    a, b = await fake("base", fail="hang"), await fake("base")
    gw = await gateway([a, b], timeouts={"read": 0.3})
    statuses = [(await post(gw.url, CHAT))[0] for _ in range(4)]
    assert statuses == [200] * 4
    gw_single = await gateway([a], timeouts={"read": 0.3})
    started = time.monotonic()
    status, _, body = await post(gw_single.url, CHAT)
    assert status == 504 and orjson.loads(body)["error"]["code"] == "upstream_timeout"
    assert time.monotonic() - started < 2


async def test_backend_dying_mid_stream_ends_with_an_sse_error_event(fake: StartFake, gateway: StartGateway) -> None:
    a = await fake("base", tokens=50, itl_ms=5)
    gw = await gateway([a])
    async with aiohttp.ClientSession() as session, session.post(
        gw.url + "/v1/chat/completions", json={**CHAT, "stream": True}, headers={**HEADERS, "X-Fake-Fail": "drop:3"}
    ) as response:
        assert response.status == 200
        raw = await asyncio.wait_for(response.read(), timeout=5)
    events = EventSplitter().feed(raw)
    assert b"stream_interrupted" in events[-1]
    assert all(b"[DONE]" not in e for e in events)
    assert a.stats.requests_total == 1  # never retried after bytes reached the client
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=API_KEY, max_retries=0)
    stream = await client.chat.completions.create(
        model="base", messages=[{"role": "user", "content": "hi"}], stream=True,
        extra_headers={"X-Fake-Fail": "drop:2"},
    )
    with pytest.raises(openai.APIError, match="interrupted"):
        async for _ in stream:
            pass
    await client.close()


async def test_stalled_stream_hits_the_stream_read_timeout(fake: StartFake, gateway: StartGateway) -> None:
    a = await fake("base", tokens=5, itl_ms=3000)
    gw = await gateway([a], timeouts={"stream_read": 0.4})
    started = time.monotonic()
    async with aiohttp.ClientSession() as session, session.post(
        gw.url + "/v1/chat/completions", json={**CHAT, "stream": True}, headers=HEADERS
    ) as response:
        raw = await asyncio.wait_for(response.read(), timeout=5)
    assert b"stream_interrupted" in raw and time.monotonic() - started < 2.5
    await asyncio.sleep(0.1)
    assert a.stats.running == 0  # the gateway hung up on the stalled backend


async def test_health_checks_take_backends_out_and_back(fake: StartFake, gateway: StartGateway) -> None:
    port = free_port()
    a = await start_fake_vllm(FakeVLLMSettings(model="base", port=port))
    gw = await gateway([a])
    async with aiohttp.ClientSession() as session:
        async with session.get(gw.url + "/ready") as response:
            assert response.status == 200
        await a.close()
        await asyncio.sleep(0.6)
        async with session.get(gw.url + "/ready") as response:
            assert response.status == 503
        status, _, _ = await post(gw.url, CHAT)
        assert status == 503
        page = gw.metrics.render().decode()
        assert 'sluice_backend_up{backend="b0"} 0.0' in page
        assert 'sluice_model_backends_healthy{model="base"} 0.0' in page
        a = await start_fake_vllm(FakeVLLMSettings(model="base", port=port))
        try:
            await asyncio.sleep(0.6)
            async with session.get(gw.url + "/ready") as response:
                assert response.status == 200
            assert (await post(gw.url, CHAT))[0] == 200
            assert 'sluice_model_backends_healthy{model="base"} 1.0' in gw.metrics.render().decode()
        finally:
            await a.close()


async def test_adapter_loaded_at_runtime_is_discovered_on_first_use(fake: StartFake, gateway: StartGateway) -> None:
    a = await fake("base")
    gw = await gateway([a], health=SLOW_HEALTH)
    async with aiohttp.ClientSession() as session, session.post(
        a.url + "/v1/load_lora_adapter", json={"lora_name": "fresh", "lora_path": "/adapters/fresh"}
    ) as response:
        assert response.status == 200
    await asyncio.sleep(2.1)  # past the rediscovery rate limit of the start-up discovery
    status, _, body = await post(gw.url, {**CHAT, "model": "fresh"})
    assert status == 200, body
    assert orjson.loads(body)["model"] == "fresh"


async def test_least_outstanding_spreads_concurrent_load(fake: StartFake, gateway: StartGateway) -> None:
    a, b = await fake("base", ttft_ms=100), await fake("base", ttft_ms=100)
    gw = await gateway([a, b])
    await asyncio.gather(*(post(gw.url, CHAT) for _ in range(20)))
    assert a.stats.completed == 10 and b.stats.completed == 10


async def test_engine_reported_load_is_scraped_used_and_exported(fake: StartFake, gateway: StartGateway) -> None:
    busy, idle = await fake("base", max_num_seqs=1, ttft_ms=1500), await fake("base")
    gw = await gateway([busy], health={"interval": 0.2, "timeout": 1, "scrape_interval": 0.1})
    # Another client (think: another gateway replica) fills the busy engine's queue directly.
    async with aiohttp.ClientSession() as session:
        pending = [
            asyncio.ensure_future(session.post(busy.url + "/v1/chat/completions", json=CHAT)) for _ in range(4)
        ]
        await asyncio.sleep(0.5)
        metrics = gw.metrics.render().decode()
        assert 'sluice_backend_requests_waiting{backend="b0"} 3.0' in metrics
        assert 'sluice_backend_requests_running{backend="b0"} 1.0' in metrics
        both = await gateway([busy, idle], health={"interval": 0.2, "timeout": 1, "scrape_interval": 0.1})
        await asyncio.sleep(0.3)
        for _ in range(5):  # the gateway has nothing in flight anywhere; only the scrape tells them apart
            assert (await post(both.url, CHAT))[0] == 200
        assert idle.stats.completed == 5
        for request in pending:
            (await request).close()


async def test_a_restarted_backend_takes_traffic_when_its_health_check_passes(
    fake: StartFake, gateway: StartGateway
) -> None:
    """Its circuit opened while it was down; a passed health check half-opens it, not recovery_timeout."""
    port = free_port()
    restarted = await start_fake_vllm(FakeVLLMSettings(model="base", port=port))
    steady = await fake("base")
    gw = await gateway(
        [restarted, steady], breaker={"failure_threshold": 1, "recovery_timeout": 60},
        routing={"strategy": "round_robin", "retries": 1},
    )  # fmt: skip
    await restarted.close()
    assert [(await post(gw.url, CHAT))[0] for _ in range(4)] == [200] * 4  # retried on `steady`
    breaker = gw.backends.by_name["b0"].breaker
    assert breaker is not None and breaker.state == 2  # open, for a minute
    restarted = await start_fake_vllm(FakeVLLMSettings(model="base", port=port))
    try:
        await asyncio.sleep(0.6)  # health checks every 0.2 s
        assert [(await post(gw.url, CHAT))[0] for _ in range(6)] == [200] * 6
        assert restarted.stats.completed >= 2 and breaker.state == 0  # probed, then closed
    finally:
        await restarted.close()


async def test_circuit_opens_on_failures_moves_traffic_and_closes_after_probes(
    fake: StartFake, gateway: StartGateway
) -> None:
    flaky, steady = await fake("base", fail="500"), await fake("base")
    breaker = {"failure_threshold": 3, "recovery_timeout": 0.5, "half_open_max_tries": 2}
    gw = await gateway([flaky, steady], breaker=breaker, routing={"strategy": "round_robin", "retries": 1})
    for _ in range(12):
        assert (await post(gw.url, CHAT))[0] == 200  # the retry hides every failure from the client
    assert flaky.stats.requests_total == 3  # then the open circuit kept requests away from it
    metrics = gw.metrics.render().decode()
    assert 'sluice_model_circuit_state{backend="b0",model="base"} 2.0' in metrics  # 500s: the model's circuit
    assert 'sluice_circuit_transitions_total{backend="b0",model="base",state="open"} 1.0' in metrics
    assert 'sluice_backend_circuit_state{backend="b0"} 0.0' in metrics  # it answered: reachable
    flaky.settings.fail = None  # the backend recovers
    await asyncio.sleep(0.6)
    for _ in range(6):
        assert (await post(gw.url, CHAT))[0] == 200
    assert gw.backends.by_name["b0"].model_breakers["base"].state == 0
    assert flaky.stats.completed >= 2  # the probes, then normal traffic again


async def test_a_failing_adapter_opens_only_its_own_circuit(fake: StartFake, gateway: StartGateway) -> None:
    a, b = await fake("base", loras=["medical"]), await fake("base", loras=["medical"])
    gw = await gateway(
        [a, b], health=SLOW_HEALTH, breaker={"failure_threshold": 2, "recovery_timeout": 60},
        routing={"retries": 1, "fallbacks": {"medical": ["base"]}},
    )
    broken = {"X-Fake-Fail": "500"}  # the adapter's requests fail on every backend, the base model's do not
    medical = {**CHAT, "model": "medical"}
    statuses = [(await post(gw.url, medical, broken))[0] for _ in range(2)]
    assert statuses == [502, 502]  # each tried on both backends: both circuits of `medical` open
    metrics = gw.metrics.render().decode()
    for name in ("b0", "b1"):
        assert f'sluice_model_circuit_state{{backend="{name}",model="medical"}} 2.0' in metrics
        assert f'sluice_backend_circuit_state{{backend="{name}"}} 0.0' in metrics
    assert [(await post(gw.url, CHAT))[0] for _ in range(4)] == [200] * 4  # the base model is unaffected
    assert a.stats.requests_by_model["base"] == 2 and b.stats.requests_by_model["base"] == 2
    status, headers, _ = await post(gw.url, medical)  # open everywhere: the fallback answers
    assert status == 200 and headers["X-Sluice-Model"] == "base"


async def test_timeouts_open_the_backend_circuit(fake: StartFake, gateway: StartGateway) -> None:
    hanging, steady = await fake("base", fail="hang"), await fake("base")
    gw = await gateway(
        [hanging, steady], health=SLOW_HEALTH, timeouts={"read": 0.3},
        breaker={"failure_threshold": 2, "recovery_timeout": 60}, routing={"strategy": "round_robin"},
    )
    assert [(await post(gw.url, CHAT))[0] for _ in range(6)] == [200] * 6  # each timeout retried on `steady`
    assert gw.backends.by_name["b0"].breaker is not None and gw.backends.by_name["b0"].breaker.state == 2
    assert hanging.stats.requests_total == 2


async def test_an_open_circuit_never_cuts_a_model_off(fake: StartFake, gateway: StartGateway) -> None:
    only = await fake("base", fail="503")
    gw = await gateway([only], breaker={"failure_threshold": 2, "recovery_timeout": 60})
    statuses = [(await post(gw.url, CHAT))[0] for _ in range(4)]
    assert statuses == [502] * 4  # the backend's own errors, not a gateway-made 503
    assert only.stats.requests_total == 4  # still tried: with no other backend, rejecting cannot help


async def test_fallback_model_answers_when_the_adapter_has_no_healthy_backend(
    fake: StartFake, gateway: StartGateway
) -> None:
    adapters, base = await fake("llama", loras=["medical"]), await fake("qwen")
    gw = await gateway(
        [adapters, base], health=SLOW_HEALTH, routing={"fallbacks": {"medical": ["llama", "qwen"]}}
    )
    body = {**CHAT, "model": "medical"}
    status, headers, answer = await post(gw.url, body)
    assert status == 200 and headers["X-Sluice-Model"] == "medical" and orjson.loads(answer)["model"] == "medical"
    await adapters.close()  # the only backend with the adapter (and with llama) goes away
    status, headers, answer = await post(gw.url, body)  # connect fails: backend marked down, retried
    status, headers, answer = await post(gw.url, body)
    assert status == 200
    assert headers["X-Sluice-Model"] == "qwen" and orjson.loads(answer)["model"] == "qwen"
    assert base.stats.last_request_body["model"] == "qwen"  # type: ignore[index]
    async with aiohttp.ClientSession() as session, session.post(
        gw.url + "/v1/chat/completions", json={**body, "stream": True}, headers=HEADERS
    ) as response:
        assert response.headers["X-Sluice-Model"] == "qwen"
        assert b"[DONE]" in await response.read()
    assert 'sluice_fallbacks_total{fallback="qwen",model="medical"} 2.0' in gw.metrics.render().decode()


async def test_fallback_on_open_circuit_and_a_friendly_error_at_the_end(
    fake: StartFake, gateway: StartGateway
) -> None:
    failing, other = await fake("llama", fail="500"), await fake("qwen")
    gw = await gateway(
        [failing, other], breaker={"failure_threshold": 2, "recovery_timeout": 60},
        routing={"retries": 0, "fallbacks": {"llama": ["qwen"]}},
    )
    llama = {**CHAT, "model": "llama"}
    assert [(await post(gw.url, llama))[0] for _ in range(2)] == [502, 502]  # opens the circuit
    status, headers, _ = await post(gw.url, llama)
    assert status == 200 and headers["X-Sluice-Model"] == "qwen"
    await other.close()
    gw.backends.by_name["b1"].healthy = False
    gw.backends.rebuild()
    status, headers, answer = await post(gw.url, {**CHAT, "model": "qwen"})
    assert status == 503 and headers["Retry-After"] == "5"
    assert "qwen" in orjson.loads(answer)["error"]["message"]


async def test_drain_lets_streams_finish_refuses_new_work_and_reports_not_ready(
    fake: StartFake, gateway: StartGateway
) -> None:
    backend = await fake("base", tokens=30, itl_ms=20)
    gw = await gateway([backend])
    async with aiohttp.ClientSession() as session:
        idle = await session.get(gw.url + "/health")  # leaves an idle keep-alive connection behind
        idle.release()
        response = await session.post(gw.url + "/v1/chat/completions", json={**CHAT, "stream": True}, headers=HEADERS)
        await response.content.readany()
        drained = asyncio.ensure_future(gw.drain(timeout=5))
        await asyncio.sleep(0.05)
        async with aiohttp.ClientSession() as fresh:
            with pytest.raises(aiohttp.ClientConnectionError):
                await fresh.get(gw.url + "/ready")  # no longer accepting
        body = await response.read()  # the stream in flight completes
        assert body.rstrip().endswith(b"data: [DONE]")
        assert await drained is True
    assert backend.stats.completed == 1


async def test_ready_is_503_while_draining(fake: StartFake, gateway: StartGateway) -> None:
    gw = await gateway([await fake("base")])
    gw.draining = True
    async with aiohttp.ClientSession() as session, session.get(gw.url + "/ready") as response:
        assert response.status == 503 and "shutting down" in (await response.json())["error"]["message"]


async def test_load_shedding_refuses_fast_past_the_caps(fake: StartFake, gateway: StartGateway) -> None:
    slow = await fake("base", ttft_ms=600)
    gw = await gateway(
        [slow], limits={"queue_size": 2, "queue_timeout": 0.2}, backends_extra={"max_concurrency": 2}
    )
    started = time.monotonic()
    results = await asyncio.gather(*(post(gw.url, CHAT) for _ in range(6)))
    elapsed = time.monotonic() - started
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [200, 200, 503, 503, 503, 503]
    refused = [(h, b) for s, h, b in results if s == 503]
    assert all(h["Retry-After"] == "5" and orjson.loads(b)["error"]["code"] == "overloaded" for h, b in refused)
    assert elapsed < 1.5  # nobody waited for the slow backend beyond the queue timeout
    assert slow.stats.requests_total == 2


async def test_queued_request_gets_the_next_free_slot(fake: StartFake, gateway: StartGateway) -> None:
    backend = await fake("base", ttft_ms=200)
    gw = await gateway([backend], limits={"queue_size": 4, "queue_timeout": 5}, backends_extra={"max_concurrency": 1})
    results = await asyncio.gather(*(post(gw.url, CHAT) for _ in range(3)))
    assert [status for status, _, _ in results] == [200, 200, 200]
    assert backend.stats.requests_total == 3 and backend.stats.waiting == 0


async def test_a_retry_waits_for_a_free_slot_on_the_next_backend(fake: StartFake, gateway: StartGateway) -> None:
    failing, slow = await fake("base", fail="500"), await fake("base", ttft_ms=600)
    gw = await gateway(
        [failing, slow], health=SLOW_HEALTH, limits={"queue_size": 4, "queue_timeout": 5},
        backends_extra={"max_concurrency": 1},
    )
    first = asyncio.ensure_future(post(gw.url, CHAT))
    await asyncio.sleep(0.2)
    assert gw.backends.by_name["b1"].in_flight == 1  # on `slow`, directly or after `failing` answered 500
    second = asyncio.ensure_future(post(gw.url, CHAT))
    await asyncio.sleep(0.2)
    assert gw.admission.waiting == 1  # failed on `failing`, queued for `slow` instead of exceeding its cap
    assert gw.backends.by_name["b1"].in_flight == 1
    assert [(await first)[0], (await second)[0]] == [200, 200]
    assert slow.stats.completed == 2


async def test_affinity_keeps_sessions_and_prefixes_together_and_moves_them_when_down(
    fake: StartFake, gateway: StartGateway
) -> None:
    backends = [await fake("base") for _ in range(3)]
    gw = await gateway(backends, routing={"strategy": "affinity"}, health=SLOW_HEALTH)

    def served_by() -> list[int]:
        return [b.stats.requests_total for b in backends]

    async def where(body: dict[str, object], headers: dict[str, str] | None = None) -> int:
        before = served_by()
        assert (await post(gw.url, body, headers))[0] == 200
        return next(i for i, (a, b) in enumerate(zip(before, served_by(), strict=True)) if b > a)

    system = {"role": "system", "content": "You are the support assistant of ACME. " * 40}
    homes = {await where({**CHAT, "messages": [system, {"role": "user", "content": f"q{i}"}]}) for i in range(6)}
    assert len(homes) == 1  # one shared system prompt, one backend (its prefix cache)
    sessions = {await where(CHAT, {"X-Session-Id": "user-42"}) for _ in range(4)}
    assert len(sessions) == 1
    spread = {await where(CHAT, {"X-Session-Id": f"s{i}"}) for i in range(30)}
    assert len(spread) == 3  # different keys use every backend
    home = homes.pop()
    await backends[home].close()  # the prefix's backend goes away
    moved = {await where({**CHAT, "messages": [system, {"role": "user", "content": f"r{i}"}]}) for i in range(4)}
    assert home not in moved and len(moved) == 1  # it moves, and stays together on its new home
