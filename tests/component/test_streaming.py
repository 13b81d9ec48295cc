"""Streams are relayed as they arrive, never buffered, and a client that leaves stops the backend."""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time

import aiohttp
import orjson

from sluice.sse import EventSplitter
from tests.conftest import API_KEY, StartFake, StartGateway

HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def chat(stream: bool = True, **extra: object) -> dict[str, object]:
    return {"model": "base", "messages": [{"role": "user", "content": "tell me a story"}], "stream": stream, **extra}


async def test_chunks_arrive_spread_out_like_the_upstream(fake: StartFake, gateway: StartGateway) -> None:
    backend = await fake("base", tokens=12, itl_ms=30)
    gw = await gateway([backend])
    arrivals: list[float] = []
    async with aiohttp.ClientSession() as session, session.post(
        gw.url + "/v1/chat/completions", json=chat(), headers=HEADERS
    ) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        splitter = EventSplitter()
        async for data in response.content.iter_any():
            for event in splitter.feed(data):
                if b'"content":"' in event and b'"content":""' not in event:
                    arrivals.append(time.perf_counter())
    assert len(arrivals) == 12
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    # Buffered relaying would deliver everything at once (gaps near 0); ours keeps the 30 ms rhythm.
    assert statistics.median(gaps) > 0.02
    assert min(gaps) > 0.01
    assert arrivals[-1] - arrivals[0] > 0.25


async def test_stream_ends_with_done_and_usage_only_when_asked(fake: StartFake, gateway: StartGateway) -> None:
    gw = await gateway([await fake("base", tokens=3)])
    async with aiohttp.ClientSession() as session:
        for include in (False, True):
            body = chat(stream_options={"include_usage": True}) if include else chat()
            async with session.post(gw.url + "/v1/chat/completions", json=body, headers=HEADERS) as response:
                events = EventSplitter().feed(await response.read())
            assert events[-1] == b"data: [DONE]\n\n"
            usage_events = [e for e in events if b'"usage"' in e]
            assert len(usage_events) == (1 if include else 0)
            if include:
                usage = orjson.loads(usage_events[0][6:])["usage"]
                assert usage["completion_tokens"] == 3


async def test_client_disconnect_closes_the_upstream_request(fake: StartFake, gateway: StartGateway) -> None:
    backend = await fake("base", tokens=200, itl_ms=20)
    gw = await gateway([backend])
    async with aiohttp.ClientSession() as session:
        response = await session.post(gw.url + "/v1/chat/completions", json=chat(), headers=HEADERS)
        await response.content.readany()
        await asyncio.sleep(0.1)
        assert backend.stats.running == 1
        response.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 2
    while (backend.stats.running or not backend.stats.aborted) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert backend.stats.running == 0
    assert backend.stats.aborted == 1
    assert backend.stats.completed == 0


async def test_many_concurrent_streams_are_all_complete(fake: StartFake, gateway: StartGateway) -> None:
    backend = await fake("base", tokens=20, itl_ms=5)
    gw = await gateway([backend])

    async def one(session: aiohttp.ClientSession) -> int:
        async with session.post(gw.url + "/v1/chat/completions", json=chat(), headers=HEADERS) as response:
            events = EventSplitter().feed(await response.read())
            assert events[-1] == b"data: [DONE]\n\n"
            return sum(1 for e in events if b'"content":"' in e and b'"content":""' not in e)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100)) as session:
        counts = await asyncio.gather(*(one(session) for _ in range(60)))
    assert counts == [20] * 60
    assert backend.stats.completed == 60


async def test_slow_reader_gets_every_byte(fake: StartFake, gateway: StartGateway) -> None:
    """Backpressure: a client that reads slowly still receives the whole stream intact."""
    backend = await fake("base", tokens=2000)
    gw = await gateway([backend])
    async with aiohttp.ClientSession(read_bufsize=2**10) as session, session.post(
        gw.url + "/v1/completions", json={"model": "base", "prompt": "x", "stream": True, "max_tokens": 2000},
        headers=HEADERS,
    ) as response:
        received = b""
        async for data in response.content.iter_chunked(4096):
            received += data
            await asyncio.sleep(0.001)
    events = EventSplitter().feed(received)
    assert events[-1] == b"data: [DONE]\n\n"
    assert sum(1 for e in events if b'"text":"' in e and b'"text":""' not in e) == 2000
