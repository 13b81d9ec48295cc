"""The gateway in front of a real vLLM engine (Gemma 3 270M on CPU, two demonstration LoRA adapters).

The model is a small base model: these tests assert structure (framing, usage, finish reasons, routing,
metrics), never wording.
"""

from __future__ import annotations

import asyncio
import re
import time

import aiohttp
import openai
import pytest

from sluice.engine.info import load_engine_info
from sluice.sse import EventSplitter
from tests.conftest import API_KEY, StartGateway
from tests.e2e.engine_session import DATA_DIR

MODELS = ("gemma-3-270m", "medical", "code")
HEALTH = {"interval": 1, "timeout": 2, "discovery_interval": 30, "scrape_interval": 0.2}
pytestmark = pytest.mark.e2e


async def engine_gauge(session: aiohttp.ClientSession, url: str, name: str) -> float:
    async with session.get(url + "/metrics") as response:
        page = await response.text()
    values = re.findall(rf"^vllm:{name}(?:{{[^}}]*}})? ([0-9.]+)$", page, re.MULTILINE)
    return sum(float(v) for v in values)


async def test_models_list_the_base_model_and_both_adapters(real_engine: str, gateway: StartGateway) -> None:
    gw = await gateway([real_engine], health=HEALTH)
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=API_KEY, max_retries=0)
    ids = {m.id async for m in client.models.list()}
    assert set(MODELS) <= ids
    await client.close()


@pytest.mark.parametrize("model", MODELS)
async def test_openai_client_streaming_and_not(real_engine: str, gateway: StartGateway, model: str) -> None:
    gw = await gateway([real_engine], health=HEALTH)
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    messages = [{"role": "user", "content": "Name three colours."}]
    whole = await client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)  # type: ignore[arg-type]
    assert whole.model == model
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert isinstance(whole.choices[0].message.content, str)
    assert whole.usage is not None and whole.usage.prompt_tokens > 0 and 0 < whole.usage.completion_tokens <= 8

    stream = await client.chat.completions.create(
        model=model, messages=messages, max_tokens=8, temperature=0, stream=True  # type: ignore[arg-type]
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"  # vLLM's role-only first chunk passes through
    assert all(chunk.usage is None for chunk in chunks)  # usage was asked for upstream, stripped for us
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content  # greedy: the same tokens either way

    completion = await client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=4, temperature=0,
        stream=True, stream_options={"include_usage": True},
    )
    parts = [chunk async for chunk in completion]
    assert parts[-1].usage is not None and parts[-1].usage.completion_tokens <= 4 and parts[-1].choices == []
    await client.close()


async def test_gateway_records_tokens_and_ttft_from_the_real_engine(real_engine: str, gateway: StartGateway) -> None:
    gw = await gateway([real_engine], health=HEALTH)
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    stream = await client.chat.completions.create(
        model="code", messages=[{"role": "user", "content": "hi"}], max_tokens=6, stream=True  # type: ignore[arg-type]
    )
    async for _ in stream:
        pass
    metrics = gw.metrics.render().decode()
    assert re.search(r'sluice_tokens_total\{kind="completion",model="code"\} [1-6]\.0', metrics)
    assert 'sluice_time_to_first_token_seconds_count{model="code"} 1.0' in metrics
    await client.close()


async def test_disconnect_mid_stream_stops_generation(real_engine: str, gateway: StartGateway) -> None:
    gw = await gateway([real_engine], health=HEALTH)
    body = {"model": "gemma-3-270m", "prompt": "Once upon a time", "max_tokens": 1000, "stream": True,
            "ignore_eos": True}
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            gw.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}
        )
        splitter = EventSplitter()
        events = 0
        while events < 3:  # wait until tokens flow
            events += len(splitter.feed(await response.content.readany()))
        assert await engine_gauge(session, real_engine, "num_requests_running") == 1
        response.close()  # the client goes away
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if await engine_gauge(session, real_engine, "num_requests_running") == 0:
                break
            await asyncio.sleep(0.2)
        assert await engine_gauge(session, real_engine, "num_requests_running") == 0
        assert await engine_gauge(session, real_engine, "num_requests_waiting") == 0


async def test_queueing_in_the_engine_reaches_the_gateway_metrics(real_engine: str, gateway: StartGateway) -> None:
    gw = await gateway([real_engine], health=HEALTH)
    body = {"model": "gemma-3-270m", "prompt": "Count: one, two,", "max_tokens": 24, "ignore_eos": True}
    seen_waiting = 0.0
    async with aiohttp.ClientSession() as session:
        requests = [
            asyncio.ensure_future(
                session.post(gw.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
            )
            for _ in range(8)  # --max-num-seqs 4: half of them have to wait
        ]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(r.done() for r in requests):
            metrics = gw.metrics.render().decode()
            match = re.search(r'sluice_backend_requests_waiting\{backend="b0"\} ([0-9.]+)', metrics)
            if match:
                seen_waiting = max(seen_waiting, float(match.group(1)))
            if seen_waiting > 0:
                break
            await asyncio.sleep(0.1)
        responses = await asyncio.gather(*requests)
        assert [r.status for r in responses] == [200] * 8
        for r in responses:
            r.close()
    assert seen_waiting > 0


async def test_registered_adapter_is_loaded_at_run_time(real_engine: str, gateway: StartGateway) -> None:
    info = load_engine_info(DATA_DIR)
    assert info is not None
    registry = [{"name": "medical-rt", "path": str(info.adapters["medical"]), "base_model": "gemma-3-270m"}]
    gw = await gateway([real_engine], health=HEALTH, adapters={"registry": registry})
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    try:
        assert "medical-rt" in {m.id async for m in client.models.list()}  # loadable, so listed
        answer = await client.chat.completions.create(
            model="medical-rt", messages=[{"role": "user", "content": "hi"}], max_tokens=4  # type: ignore[list-item]
        )
        assert answer.model == "medical-rt"
        assert gw.metrics.adapter_operations.child("b0", "medical-rt", "load", "ok").value == 1
        async with aiohttp.ClientSession() as session, session.get(real_engine + "/v1/models") as response:
            assert "medical-rt" in {card["id"] for card in (await response.json())["data"]}
    finally:
        await client.close()
        async with aiohttp.ClientSession() as session:
            await session.post(real_engine + "/v1/unload_lora_adapter", json={"lora_name": "medical-rt"})


async def test_real_engine_answers_are_cached_and_replayed(real_engine: str, gateway: StartGateway) -> None:
    """vLLM's own stream framing assembles into the body it would have sent, and replays as a stream."""
    gw = await gateway([real_engine], health=HEALTH, cache={"enabled": True, "semantic": {"enabled": False}})
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    messages = [{"role": "user", "content": "Name two rivers."}]
    first = await client.chat.completions.with_raw_response.create(
        model="gemma-3-270m", messages=messages, max_tokens=8, temperature=0, stream=True  # type: ignore[arg-type]
    )
    assert first.headers["x-sluice-cache"] == "miss"
    streamed = "".join([c.choices[0].delta.content or "" async for c in first.parse() if c.choices])
    assert gw.cache is not None
    await asyncio.gather(*gw.cache._pending)
    whole = await client.chat.completions.with_raw_response.create(
        model="gemma-3-270m", messages=messages, max_tokens=8, temperature=0  # type: ignore[arg-type]
    )
    assert whole.headers["x-sluice-cache"] == "hit-exact"
    answer = whole.parse()
    assert answer.choices[0].message.content == streamed
    assert answer.usage is not None and 0 < answer.usage.completion_tokens <= 8
    again = await client.chat.completions.with_raw_response.create(
        model="gemma-3-270m", messages=messages, max_tokens=8, temperature=0, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
    )
    assert again.headers["x-sluice-cache"] == "hit-exact"
    chunks = [c async for c in again.parse()]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == streamed
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == answer.usage.completion_tokens
    await client.close()
