"""Component tests of the fake vLLM's timing model: prefill cost per uncached token, the prefix cache and
the single prefill lane.

Timings are asserted with generous margins (a noisy 2-core VM): sleeps never end early, so lower bounds
are firm, and upper bounds only separate cases that differ several times over.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from sluice.testing.fake_vllm import FakeVLLM, _settings_from, build_parser
from tests.conftest import StartFake

PROMPT_WORDS = 1600
MS_PER_TOKEN = 0.5  # a 1,600-token miss costs 0.8 s
FULL_PREFILL_S = PROMPT_WORDS * MS_PER_TOKEN / 1000


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def long_prompt(tag: str, words: int = PROMPT_WORDS) -> str:
    return " ".join(f"{tag}{i}" for i in range(words))


async def prefill_fake(fake: StartFake, **kwargs: object) -> FakeVLLM:
    return await fake("m", prefill_ms_per_token=MS_PER_TOKEN, max_model_len=8192, itl_ms=1, **kwargs)


async def ttft(
    session: aiohttp.ClientSession, server: FakeVLLM, system: str, question: str = "why?", max_tokens: int = 2
) -> float:
    """Seconds from sending a streamed chat request to its first content chunk."""
    body = {
        "model": "m",
        "stream": True,
        "max_tokens": max_tokens,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
    }
    started = time.monotonic()
    first = 0.0
    async with session.post(server.url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        async for line in resp.content:
            if not first and line.startswith(b"data: {") and b'"content":"' in line and b'"content":""' not in line:
                first = time.monotonic() - started
    assert first > 0
    return first


async def test_repeated_prompt_hits_the_prefix_cache(fake: StartFake, session: aiohttp.ClientSession) -> None:
    server = await prefill_fake(fake)
    system = long_prompt("a")
    cold = await ttft(session, server, system, "first question")
    warm = await ttft(session, server, system, "a different question")
    assert cold >= FULL_PREFILL_S * 0.99
    assert warm < cold / 4
    stats = server.stats
    assert stats.prefix_hits >= PROMPT_WORDS - 16  # all full blocks of the shared system prompt
    assert stats.prefix_queries >= 2 * PROMPT_WORDS


async def test_different_prompt_pays_the_full_prefill(fake: StartFake, session: aiohttp.ClientSession) -> None:
    server = await prefill_fake(fake)
    await ttft(session, server, long_prompt("a"))
    other = await ttft(session, server, long_prompt("b"))
    assert other >= FULL_PREFILL_S * 0.99
    hits_before = server.stats.prefix_hits
    half = long_prompt("a", PROMPT_WORDS // 2) + " " + long_prompt("c", PROMPT_WORDS // 2)
    partial = await ttft(session, server, half)  # only the shared first half is cached
    assert partial >= FULL_PREFILL_S / 2 * 0.95
    assert server.stats.prefix_hits - hits_before == PROMPT_WORDS // 2


async def test_adapter_does_not_share_the_base_models_cache(fake: StartFake, session: aiohttp.ClientSession) -> None:
    server = await prefill_fake(fake, loras=["lora"])
    messages = [{"role": "system", "content": long_prompt("a", 64)}, {"role": "user", "content": "why?"}]
    hits = []
    for model in ("m", "lora", "m"):
        body = {"model": model, "max_tokens": 1, "messages": messages}
        async with session.post(server.url + "/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
        hits.append(server.stats.prefix_hits)
    assert hits == [0, 0, 64]


async def test_concurrent_prefills_queue_behind_each_other(fake: StartFake, session: aiohttp.ClientSession) -> None:
    server = await prefill_fake(fake, max_num_seqs=16)  # room for all: only the prefill lane makes them wait
    prompts = [long_prompt(tag, 400) for tag in "wxyz"]  # 0.2 s each, all misses
    ttfts = sorted(await asyncio.gather(*(ttft(session, server, p) for p in prompts)))
    step = 400 * MS_PER_TOKEN / 1000
    assert ttfts[-1] >= 4 * step * 0.99
    assert ttfts[-1] > 2 * ttfts[0]
    assert server.stats.prefix_hits == 0


async def test_scheduler_queue_adds_to_ttft(fake: StartFake, session: aiohttp.ClientSession) -> None:
    server = await fake("m", prefill_ms_per_token=MS_PER_TOKEN, max_num_seqs=1, itl_ms=300)
    first = asyncio.create_task(ttft(session, server, "short"))
    await asyncio.sleep(0.05)
    second = await ttft(session, server, "also short")  # queued until the first's second token, 0.3 s in
    assert second >= 0.2
    assert await first < second


async def test_aborted_prefill_frees_the_lane(fake: StartFake, session: aiohttp.ClientSession) -> None:
    server = await prefill_fake(fake)
    long_one = asyncio.create_task(ttft(session, server, long_prompt("a", 4000)))  # 2 s of prefill
    await asyncio.sleep(0.2)
    long_one.cancel()  # the client goes away mid-prefill
    with pytest.raises(asyncio.CancelledError):
        await long_one
    short = await ttft(session, server, long_prompt("b", 200))  # 0.1 s once the lane is free
    assert short < 1.0
    assert server.stats.aborted == 1


async def test_prefill_cost_is_a_runtime_setting_and_a_flag(fake: StartFake, session: aiohttp.ClientSession) -> None:
    server = await fake("m", max_model_len=8192)
    assert await ttft(session, server, long_prompt("a")) < FULL_PREFILL_S / 2  # default: prefill is free
    async with session.post(server.url + "/fake/config", json={"prefill_ms_per_token": MS_PER_TOKEN}) as resp:
        assert resp.status == 200 and (await resp.json())["prefill_ms_per_token"] == MS_PER_TOKEN
    assert await ttft(session, server, long_prompt("b")) >= FULL_PREFILL_S * 0.99
    async with session.post(server.url + "/fake/config", json={"prefill_ms_per_token": -1}) as resp:
        assert resp.status == 400
    args = build_parser().parse_args(["--model", "m", "--prefill-ms-per-token", "0.08"])
    assert _settings_from(args).prefill_ms_per_token == 0.08
