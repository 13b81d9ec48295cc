"""Component tests of the vLLM-compatible fake server (`sluice.testing.fake_vllm`).

The official `openai` client proves SDK compatibility; raw aiohttp checks the wire format, failure
injection, queueing, disconnect accounting and the runtime LoRA API; the CLI is run as a subprocess.
"""

from __future__ import annotations

import asyncio
import json
import math
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from openai import AsyncOpenAI, OpenAI
from prometheus_client.parser import text_string_to_metric_families

from sluice.testing.fake_vllm import FakeVLLM, FakeVLLMSettings, start_fake_vllm

REPO_ROOT = Path(__file__).resolve().parents[2]
CHAT = {"model": "m", "messages": [{"role": "user", "content": "tell me a story about the sea"}]}


@pytest.fixture
async def server() -> AsyncIterator[FakeVLLM]:
    server = await start_fake_vllm(FakeVLLMSettings(model="m", loras=["a"]))
    yield server
    await server.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def openai_client(fake: FakeVLLM) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=fake.url + "/v1", api_key="x", max_retries=0)


async def eventually(check: Callable[[], bool], timeout: float = 1.0) -> float:
    """Wait until `check()` holds; return how long it took."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)
    return time.monotonic() - start


def sse_payloads(raw: bytes) -> list[str]:
    """The `data:` payloads of an SSE body, asserting the framing is exactly `data: ...\\n\\n`."""
    text = raw.decode()
    assert text.endswith("\n\n")
    events = text[:-2].split("\n\n")
    assert all(event.startswith("data: ") and "\n" not in event for event in events), events
    return [event[len("data: ") :] for event in events]


def metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"{name} {labels} not exported")


async def metrics_text(session: aiohttp.ClientSession, fake: FakeVLLM) -> str:
    async with session.get(fake.url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return await resp.text()


# --- the openai SDK -------------------------------------------------------------------------------


async def test_openai_chat_non_streaming_and_streaming_agree(server: FakeVLLM) -> None:
    client = openai_client(server)
    messages: Any = CHAT["messages"]
    full = await client.chat.completions.create(model="m", messages=messages, max_tokens=5)
    assert full.id.startswith("chatcmpl-")
    assert full.object == "chat.completion"
    assert full.model == "m"
    choice = full.choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.role == "assistant"
    content = choice.message.content or ""
    assert len(content.split()) == 5 and content.endswith(" ")
    assert full.usage is not None
    assert (full.usage.prompt_tokens, full.usage.completion_tokens, full.usage.total_tokens) == (7, 5, 12)

    stream = await client.chat.completions.create(
        model="m", messages=messages, max_tokens=5, stream=True, stream_options={"include_usage": True}
    )
    parts: list[str] = []
    finish: list[str] = []
    usage = None
    async for chunk in stream:
        for c in chunk.choices:
            parts.append(c.delta.content or "")
            if c.finish_reason:
                finish.append(c.finish_reason)
        usage = chunk.usage or usage
    assert "".join(parts) == content  # deterministic, seeded by the prompt
    assert finish == ["length"]
    assert usage is not None and usage.completion_tokens == 5

    other = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "something else entirely"}], max_tokens=5
    )
    assert other.choices[0].message.content != content
    await client.close()


async def test_openai_chat_default_length_and_lora_model(server: FakeVLLM) -> None:
    client = openai_client(server)
    reply = await client.chat.completions.create(model="a", messages=[{"role": "user", "content": "hi"}])
    assert reply.model == "a"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.completion_tokens == 16  # the --tokens default
    assert server.stats.requests_by_model == {"a": 1}
    await client.close()


async def test_openai_sync_client_completions(server: FakeVLLM) -> None:
    def run() -> tuple[Any, list[str]]:
        with OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as client:
            full = client.completions.create(model="m", prompt="once upon a time", max_tokens=4)
            stream = client.completions.create(model="m", prompt="once upon a time", max_tokens=4, stream=True)
            return full, [c.choices[0].text for c in stream if c.choices]

    full, texts = await asyncio.to_thread(run)
    assert full.id.startswith("cmpl-")
    assert full.object == "text_completion"
    assert full.choices[0].finish_reason == "length"
    assert len(full.choices[0].text.split()) == 4
    assert "".join(texts) == full.choices[0].text
    assert full.usage.prompt_tokens == 4


async def test_openai_models_list_base_and_loras(server: FakeVLLM) -> None:
    client = openai_client(server)
    models = [m async for m in client.models.list()]
    assert [m.id for m in models] == ["m", "a"]
    base, lora = (m.model_dump() for m in models)
    assert base["owned_by"] == "vllm" and base["root"] == "m" and base["parent"] is None
    assert base["max_model_len"] == 2048 and base["permission"][0]["object"] == "model_permission"
    assert lora["parent"] == "m" and lora["root"] == "/fake-adapters/a"
    await client.close()


async def test_openai_embeddings_are_deterministic_unit_vectors(
    server: FakeVLLM, session: aiohttp.ClientSession
) -> None:
    client = openai_client(server)
    result = await client.embeddings.create(model="m", input=["hello world", "goodbye", "hello world"])
    vectors = [d.embedding for d in result.data]  # the SDK asked for base64 and decoded it
    assert [d.index for d in result.data] == [0, 1, 2]
    assert all(len(v) == 32 for v in vectors)
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1.0) < 1e-5 for v in vectors)
    assert vectors[0] == vectors[2] and vectors[0] != vectors[1]
    assert result.usage.prompt_tokens == 5

    body = {"model": "m", "input": "hello world", "encoding_format": "float"}
    async with session.post(server.url + "/v1/embeddings", json=body) as resp:
        floats = (await resp.json())["data"][0]["embedding"]
    assert all(abs(a - b) < 1e-6 for a, b in zip(floats, vectors[0], strict=True))
    single = await client.embeddings.create(model="a", input="hello world", encoding_format="float")
    assert single.data[0].embedding == floats
    await client.close()


# --- the wire format ------------------------------------------------------------------------------


async def test_chat_stream_wire_format(server: FakeVLLM, session: aiohttp.ClientSession) -> None:
    body = {**CHAT, "stream": True, "max_tokens": 3, "stream_options": {"include_usage": True}}
    async with session.post(server.url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.headers["Transfer-Encoding"] == "chunked"
        http_chunks: list[bytes] = []
        pending = b""
        async for data, end_of_chunk in resp.content.iter_chunks():
            pending += data
            if end_of_chunk:
                http_chunks.append(pending)
                pending = b""
    assert all(len(sse_payloads(chunk)) == 1 for chunk in http_chunks if chunk)  # one event per write
    payloads = sse_payloads(b"".join(http_chunks))
    assert payloads[-1] == "[DONE]"
    events = [json.loads(p) for p in payloads[:-1]]
    assert len(events) == 1 + 3 + 1 + 1  # role, tokens, finish, usage
    assert len({e["id"] for e in events}) == 1 and events[0]["id"].startswith("chatcmpl-")
    assert all(e["object"] == "chat.completion.chunk" and e["model"] == "m" for e in events)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    for event in events[1:4]:
        assert set(event["choices"][0]["delta"]) == {"content"}
        assert event["choices"][0]["finish_reason"] is None
    assert events[4]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in e for e in events[:5])
    assert events[5]["choices"] == []
    assert events[5]["usage"] == {
        "prompt_tokens": 7,
        "total_tokens": 10,
        "completion_tokens": 3,
        "prompt_tokens_details": None,
    }


async def test_stream_without_include_usage_has_no_usage(server: FakeVLLM, session: aiohttp.ClientSession) -> None:
    body = {"model": "m", "prompt": "abc", "stream": True, "max_tokens": 2}
    async with session.post(server.url + "/v1/completions", json=body) as resp:
        payloads = sse_payloads(await resp.read())
    assert payloads[-1] == "[DONE]"
    events = [json.loads(p) for p in payloads[:-1]]
    assert len(events) == 3  # no role chunk for completions: two tokens, then the finish chunk
    assert all("usage" not in e and e["object"] == "text_completion" for e in events)
    assert [e["choices"][0]["finish_reason"] for e in events] == [None, None, "length"]
    assert all(isinstance(e["choices"][0]["text"], str) for e in events)


async def test_non_streaming_bodies_carry_vllm_fields(server: FakeVLLM, session: aiohttp.ClientSession) -> None:
    async with session.post(server.url + "/v1/chat/completions", json={**CHAT, "max_tokens": 2}) as resp:
        chat = await resp.json()
    for key in ("prompt_logprobs", "kv_transfer_params", "service_tier", "system_fingerprint"):
        assert key in chat and chat[key] is None
    message = chat["choices"][0]["message"]
    assert message["reasoning_content"] is None and message["tool_calls"] == []
    assert chat["choices"][0]["stop_reason"] is None and chat["choices"][0]["logprobs"] is None
    async with session.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}) as resp:
        completion = await resp.json()
    assert completion["model"] == "m"  # an absent model means the base model, as in vLLM
    assert completion["choices"][0]["stop_reason"] is None and "text" in completion["choices"][0]


async def test_validation_errors_match_vllm(server: FakeVLLM, session: aiohttp.ClientSession) -> None:
    url = server.url + "/v1/chat/completions"
    async with session.post(url, data=b"{not json", headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["type"] == "BadRequestError"
    async with session.post(url, json={"model": "m"}) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
        assert error["type"] == "BadRequestError" and error["code"] == 400 and "messages" in error["message"]
    async with session.post(server.url + "/v1/completions", json={"model": "m"}) as resp:
        assert resp.status == 400
    async with session.post(url, json={**CHAT, "model": "nope"}) as resp:
        assert resp.status == 404
        assert await resp.json() == {
            "error": {
                "message": "The model `nope` does not exist.",
                "type": "NotFoundError",
                "param": "model",
                "code": 404,
            }
        }
    async with session.post(url, json={**CHAT, "max_tokens": 5000}) as resp:
        assert resp.status == 400
        assert "maximum context length is 2048" in (await resp.json())["error"]["message"]
    async with session.post(url, json={**CHAT, "stream_options": {"include_usage": True}}) as resp:
        assert resp.status == 400
    assert server.stats.failed == 6 and server.stats.completed == 0


async def test_health_version_and_separate_registries(server: FakeVLLM, session: aiohttp.ClientSession) -> None:
    async with session.get(server.url + "/health") as resp:
        assert resp.status == 200 and await resp.read() == b""
    async with session.get(server.url + "/version") as resp:
        version = (await resp.json())["version"]
        assert version.startswith("0.32") and "fake" in version
    other = await start_fake_vllm(FakeVLLMSettings(model="other"))
    try:
        async with session.post(other.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}):
            pass
        text = await metrics_text(session, other)
        assert metric(text, "vllm:generation_tokens_total", model_name="other", engine="0") == 2
        assert metric(await metrics_text(session, server), "vllm:generation_tokens_total", model_name="m") == 0
    finally:
        await other.close()


async def test_prefix_cache_counters(server: FakeVLLM, session: aiohttp.ClientSession) -> None:
    long_prompt = " ".join(f"w{i}" for i in range(40))  # two full 16-token blocks
    for _ in range(2):
        async with session.post(server.url + "/v1/completions", json={"prompt": long_prompt, "max_tokens": 1}):
            pass
    text = await metrics_text(session, server)
    assert metric(text, "vllm:prefix_cache_queries_total", model_name="m") == 80
    assert metric(text, "vllm:prefix_cache_hits_total", model_name="m") == 32
    assert metric(text, "vllm:prompt_tokens_total", model_name="m") == 80
    assert metric(text, "vllm:request_success_total", model_name="m", finished_reason="length") == 2
    assert metric(text, "vllm:e2e_request_latency_seconds_count", model_name="m") == 2


# --- failure injection and knobs ------------------------------------------------------------------


async def test_injected_status_and_error_rate(server: FakeVLLM, session: aiohttp.ClientSession) -> None:
    url = server.url + "/v1/chat/completions"
    async with session.post(url, json=CHAT, headers={"X-Fake-Fail": "500"}) as resp:
        assert resp.status == 500
        error = (await resp.json())["error"]
        assert error["type"] == "InternalServerError" and error["code"] == 500
    async with session.post(url, json=CHAT, headers={"X-Fake-Fail": "503"}) as resp:
        assert resp.status == 503
    async with session.post(url, json=CHAT, headers={"X-Fake-Error-Rate": "1"}) as resp:
        assert resp.status == 500
    async with session.post(url, json=CHAT, headers={"X-Fake-Error-Rate": "0"}) as resp:
        assert resp.status == 200
    server.settings.error_rate = 0.5
    server.engine.rng.seed(7)
    statuses = []
    for _ in range(40):
        async with session.post(url, json=CHAT) as resp:
            statuses.append(resp.status)
    assert set(statuses) == {200, 500}
    assert 8 <= statuses.count(500) <= 32
    async with session.post(url, json=CHAT, headers={"X-Fake-Fail": "bogus"}) as resp:
        assert resp.status == 400


async def test_injected_close_and_hang(server: FakeVLLM, session: aiohttp.ClientSession) -> None:
    url = server.url + "/v1/chat/completions"
    with pytest.raises(aiohttp.ClientConnectionError):
        async with session.post(url, json=CHAT, headers={"X-Fake-Fail": "close"}) as resp:
            await resp.read()
    assert server.stats.failed == 1
    started = time.monotonic()
    with pytest.raises(asyncio.TimeoutError):
        async with session.post(
            url, json=CHAT, headers={"X-Fake-Fail": "hang"}, timeout=aiohttp.ClientTimeout(total=0.3)
        ) as resp:
            await resp.read()
    assert time.monotonic() - started >= 0.25  # no answer came: the client timed out
    await eventually(lambda: server.stats.aborted == 1)
    async with session.post(url, json=CHAT) as resp:  # the server is still fine
        assert resp.status == 200


async def test_drop_cuts_the_stream_after_n_chunks(server: FakeVLLM, session: aiohttp.ClientSession) -> None:
    body = {**CHAT, "stream": True, "max_tokens": 10}
    received = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async with session.post(
            server.url + "/v1/chat/completions", json=body, headers={"X-Fake-Fail": "drop:3"}
        ) as resp:
            assert resp.status == 200
            async for data in resp.content.iter_any():
                received += data
    payloads = sse_payloads(received)
    assert "[DONE]" not in payloads
    events = [json.loads(p) for p in payloads]
    assert len(events) == 4  # the role chunk and three tokens
    assert all(e["choices"][0]["finish_reason"] is None for e in events)
    await eventually(lambda: server.stats.failed == 1 and server.stats.running == 0)
    assert server.stats.aborted == 0 and server.stats.completed == 0

    with pytest.raises(aiohttp.ClientConnectionError):
        async with session.post(
            server.url + "/v1/completions", json={"prompt": "x"}, headers={"X-Fake-Fail": "drop:2"}
        ) as resp:
            await resp.read()


async def test_sse_error_mid_stream(server: FakeVLLM, session: aiohttp.ClientSession) -> None:
    body = {**CHAT, "stream": True, "max_tokens": 10}
    headers = {"X-Fake-Fail": "sse-error:2"}
    async with session.post(server.url + "/v1/chat/completions", json=body, headers=headers) as resp:
        payloads = sse_payloads(await resp.read())
    assert payloads[-1] == "[DONE]"
    assert json.loads(payloads[-2])["error"]["code"] == 500
    assert len(payloads) == 1 + 2 + 2


async def test_header_overrides_tokens_and_timing(server: FakeVLLM, session: aiohttp.ClientSession) -> None:
    url = server.url + "/v1/chat/completions"
    async with session.post(url, json=CHAT, headers={"X-Fake-Tokens": "3"}) as resp:
        choice = (await resp.json())["choices"][0]
        assert len(choice["message"]["content"].split()) == 3 and choice["finish_reason"] == "stop"
    async with session.post(url, json={**CHAT, "max_tokens": 2}, headers={"X-Fake-Tokens": "9"}) as resp:
        choice = (await resp.json())["choices"][0]
        assert len(choice["message"]["content"].split()) == 2 and choice["finish_reason"] == "length"

    headers = {"X-Fake-TTFT-Ms": "300", "X-Fake-ITL-Ms": "40", "X-Fake-Tokens": "4"}
    started = time.monotonic()
    stamps: list[float] = []
    async with session.post(url, json={**CHAT, "stream": True}, headers=headers) as resp:
        assert time.monotonic() - started < 0.25  # headers go out before the first token, as in vLLM
        async for line in resp.content:
            if line.startswith(b"data: {") and b'"content":"' in line and b'"content":""' not in line:
                stamps.append(time.monotonic() - started)
    assert len(stamps) == 4
    assert 0.295 <= stamps[0] < 1.0
    assert stamps[-1] - stamps[0] >= 3 * 0.04 - 0.005

    started = time.monotonic()
    async with session.post(url, json=CHAT, headers=headers) as resp:  # ttft + (n - 1) * itl in total
        assert resp.status == 200
    assert time.monotonic() - started >= 0.3 + 3 * 0.04 - 0.005
    async with session.post(url, json=CHAT, headers={"X-Fake-ITL-Ms": "fast"}) as resp:
        assert resp.status == 400


async def test_runtime_config_and_stats_over_http(server: FakeVLLM, session: aiohttp.ClientSession) -> None:
    async with session.post(server.url + "/fake/config", json={"ttft_ms": 120, "tokens": 2}) as resp:
        assert resp.status == 200
        assert (await resp.json())["ttft_ms"] == 120
    started = time.monotonic()
    async with session.post(server.url + "/v1/chat/completions", json=CHAT, headers={"X-Trace": "t1"}) as resp:
        reply = await resp.json()
    assert time.monotonic() - started >= 0.115
    assert reply["usage"]["completion_tokens"] == 2
    async with session.post(server.url + "/fake/config", json={"ttft_ms": -1}) as resp:
        assert resp.status == 400
    async with session.post(server.url + "/fake/config", json={"colour": "red"}) as resp:
        assert resp.status == 400 and "colour" in (await resp.json())["error"]["message"]
    assert server.settings.ttft_ms == 120
    async with session.post(server.url + "/fake/config", json={"fail": "500"}) as resp:
        assert resp.status == 200
    async with session.post(server.url + "/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 500
    async with session.get(server.url + "/fake/stats") as resp:
        stats = await resp.json()
    assert stats["requests_total"] == 2 and stats["requests_by_model"] == {"m": 2}
    assert (stats["completed"], stats["failed"], stats["aborted"]) == (1, 1, 0)
    assert (stats["running"], stats["waiting"]) == (0, 0)
    assert stats["last_request_body"] == CHAT
    assert stats["last_request_headers"]["Content-Type"] == "application/json"
    async with session.post(server.url + "/fake/reset") as resp:
        assert (await resp.json())["requests_total"] == 0


# --- load, queueing and disconnects ---------------------------------------------------------------


async def test_max_num_seqs_queue_shows_in_metrics(session: aiohttp.ClientSession) -> None:
    fake = await start_fake_vllm(FakeVLLMSettings(model="m", max_num_seqs=2, itl_ms=20, kv_capacity_tokens=100))
    try:
        body = {**CHAT, "max_tokens": 15}
        order: list[int] = []

        async def one(i: int) -> None:
            async with session.post(fake.url + "/v1/chat/completions", json=body) as resp:
                assert resp.status == 200
                await resp.read()
                order.append(i)

        tasks = []
        for i in range(5):
            tasks.append(asyncio.create_task(one(i)))
            await eventually(lambda: fake.stats.running + fake.stats.waiting == len(tasks))
        text = await metrics_text(session, fake)
        assert metric(text, "vllm:num_requests_running", model_name="m", engine="0") == 2
        assert metric(text, "vllm:num_requests_waiting", model_name="m", engine="0") == 3
        assert 0.14 <= metric(text, "vllm:kv_cache_usage_perc", model_name="m") <= 0.5  # 2 * (7 + ~n) / 100
        await asyncio.gather(*tasks)
        assert sorted(order[:2]) == [0, 1] and order[2:] == [2, 3, 4]  # first come, first served
        text = await metrics_text(session, fake)
        assert metric(text, "vllm:num_requests_waiting", model_name="m") == 0
        assert metric(text, "vllm:kv_cache_usage_perc", model_name="m") == 0
        assert metric(text, "vllm:request_success_total", model_name="m", finished_reason="length") == 5
        assert metric(text, "vllm:time_to_first_token_seconds_count", model_name="m") == 5
        assert metric(text, "vllm:inter_token_latency_seconds_count", model_name="m") == 5 * 14
        assert metric(text, "vllm:time_per_output_token_seconds_count", model_name="m") == 5
    finally:
        await fake.close()


async def test_client_disconnect_mid_stream_is_aborted_promptly(session: aiohttp.ClientSession) -> None:
    fake = await start_fake_vllm(FakeVLLMSettings(model="m", itl_ms=50, max_num_seqs=1))
    try:
        body = {**CHAT, "stream": True, "max_tokens": 200}
        resp = await session.post(fake.url + "/v1/chat/completions", json=body)
        for _ in range(3):
            assert (await resp.content.readuntil(b"\n\n")).startswith(b"data: {")
        queued = asyncio.create_task(session.post(fake.url + "/v1/chat/completions", json=body))
        await eventually(lambda: fake.stats.waiting == 1)
        resp.close()  # drop the connection mid-stream
        took = await eventually(lambda: fake.stats.aborted == 1 and fake.stats.running == 1)
        assert took < 0.3  # the queued request took the freed slot
        queued_resp = await queued
        await queued_resp.content.readuntil(b"\n\n")
        queued_resp.close()
        await eventually(lambda: fake.stats.aborted == 2 and fake.stats.running == 0)
        generated_before = metric(await metrics_text(session, fake), "vllm:generation_tokens_total")
        await asyncio.sleep(0.15)  # generation stopped: no more tokens are produced
        text = await metrics_text(session, fake)
        assert metric(text, "vllm:generation_tokens_total") == generated_before < 10
        assert metric(text, "vllm:request_success_total", finished_reason="abort") == 2
        assert fake.stats.completed == 0

        running = await session.post(fake.url + "/v1/chat/completions", json=body)
        queued_resp = await session.post(fake.url + "/v1/chat/completions", json=body)  # headers come at once
        await eventually(lambda: fake.stats.running == 1 and fake.stats.waiting == 1)
        queued_resp.close()  # a client that gives up while queued leaves the queue
        await eventually(lambda: fake.stats.waiting == 0 and fake.stats.aborted == 3)
        assert fake.stats.running == 1
        running.close()
        await eventually(lambda: fake.stats.running == 0 and fake.stats.aborted == 4)
    finally:
        await fake.close()


async def test_disconnect_during_ttft_is_aborted(session: aiohttp.ClientSession) -> None:
    fake = await start_fake_vllm(FakeVLLMSettings(model="m", ttft_ms=5000))
    try:
        task = asyncio.create_task(session.post(fake.url + "/v1/chat/completions", json=CHAT))
        await eventually(lambda: fake.stats.running == 1)
        task.cancel()
        await eventually(lambda: fake.stats.aborted == 1 and fake.stats.running == 0, timeout=0.5)
    finally:
        await fake.close()


# --- runtime LoRA ---------------------------------------------------------------------------------


async def test_runtime_lora_load_and_unload(session: aiohttp.ClientSession) -> None:
    fake = await start_fake_vllm(FakeVLLMSettings(model="m", loras=["a=/models/a"], max_loras=2))
    url = fake.url

    async def post(path: str, body: dict[str, Any]) -> tuple[int, str]:
        async with session.post(url + path, json=body) as resp:
            return resp.status, await resp.text()

    async def model_ids() -> list[str]:
        async with session.get(url + "/v1/models") as resp:
            return [m["id"] for m in (await resp.json())["data"]]

    try:
        assert await post("/v1/chat/completions", {**CHAT, "model": "b"}) == (
            404,
            '{"error":{"message":"The model `b` does not exist.","type":"NotFoundError","param":"model","code":404}}',
        )
        status, text = await post("/v1/load_lora_adapter", {"lora_name": "b", "lora_path": "/models/b"})
        assert (status, text) == (200, "Success: LoRA adapter 'b' added successfully.")
        assert await model_ids() == ["m", "a", "b"]
        assert (await post("/v1/chat/completions", {**CHAT, "model": "b"}))[0] == 200
        status, text = await post("/v1/load_lora_adapter", {"lora_name": "b", "lora_path": "/models/b"})
        assert status == 400 and "already been loaded" in text
        status, _ = await post("/v1/load_lora_adapter", {"lora_name": "c", "lora_path": "/models/c"})
        assert status == 400  # max_loras reached
        assert (await post("/v1/load_lora_adapter", {"lora_name": "c"}))[0] == 400
        status, text = await post("/v1/unload_lora_adapter", {"lora_name": "b"})
        assert (status, text) == (200, "Success: LoRA adapter 'b' removed successfully.")
        assert (await post("/v1/unload_lora_adapter", {"lora_name": "b"}))[0] == 404
        assert await model_ids() == ["m", "a"]
        assert (await post("/v1/chat/completions", {**CHAT, "model": "b"}))[0] == 404
    finally:
        await fake.close()


async def test_running_lora_shows_in_lora_requests_info(server: FakeVLLM, session: aiohttp.ClientSession) -> None:
    body = {**CHAT, "model": "a", "stream": True, "max_tokens": 50}
    async with session.post(server.url + "/v1/chat/completions", json=body, headers={"X-Fake-ITL-Ms": "20"}) as resp:
        await resp.content.readuntil(b"\n\n")
        text = await metrics_text(session, server)
        assert metric(text, "vllm:lora_requests_info", running_lora_adapters="a", max_lora="4") > 0
        assert metric(text, "vllm:num_requests_running", model_name="m") == 1  # labelled with the base model
    await eventually(lambda: server.stats.running == 0)
    text = await metrics_text(session, server)
    assert metric(text, "vllm:lora_requests_info", running_lora_adapters="") > 0


def test_settings_reject_bad_values() -> None:
    with pytest.raises(ValueError, match="max_num_seqs"):
        FakeVLLMSettings(model="m", max_num_seqs=0).validate()
    with pytest.raises(ValueError, match="max_loras"):
        FakeVLLMSettings(model="m", loras=["a", "b"], max_loras=1).validate()
    with pytest.raises(ValueError, match="fail mode"):
        FakeVLLMSettings(model="m", fail="sometimes").validate()


# --- the CLI --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_exit(proc: asyncio.subprocess.Process, timeout: float) -> int:
    waiter: Awaitable[int] = proc.wait()
    return await asyncio.wait_for(waiter, timeout)


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
async def test_cli_subprocess_serves_and_stops_cleanly(
    session: aiohttp.ClientSession, stop_signal: signal.Signals
) -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sluice.testing.fake_vllm",
        "--port",
        str(port),
        "--model",
        "m",
        "--lora",
        "a",
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode().strip()
        assert line == f"fake vLLM serving m (+ loras: a) on http://127.0.0.1:{port}"
        async with session.get(f"http://127.0.0.1:{port}/health") as resp:
            assert resp.status == 200
        async with session.get(f"http://127.0.0.1:{port}/v1/models") as resp:
            assert [m["id"] for m in (await resp.json())["data"]] == ["m", "a"]
        proc.send_signal(stop_signal)
        assert await wait_exit(proc, 5) == 0
        assert await proc.stderr.read() == b""
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_cli_rejects_bad_flags() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sluice.testing.fake_vllm",
        "--model",
        "m",
        "--fail",
        "sometimes",
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    assert proc.returncode == 2 and b"invalid fail mode" in err
