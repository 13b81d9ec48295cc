"""The official openai client, sync and async, streaming and not, through the gateway to fake vLLM servers."""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.conftest import API_KEY, StartFake, StartGateway

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}]


async def test_async_chat_and_completion(fake: StartFake, gateway: StartGateway) -> None:
    backend = await fake("base", tokens=5)
    gw = await gateway([backend])
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=API_KEY, max_retries=0)
    chat = await client.chat.completions.create(model="base", messages=MESSAGES)  # type: ignore[arg-type]
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content
    assert chat.usage is not None and chat.usage.completion_tokens == 5
    completion = await client.completions.create(model="base", prompt="Once upon a time", max_tokens=3)
    assert completion.choices[0].text
    assert completion.usage is not None and completion.usage.completion_tokens == 3
    embedding = await client.embeddings.create(model="base", input=["a", "b"])
    assert len(embedding.data) == 2 and len(embedding.data[0].embedding) > 0
    await client.close()


async def test_async_streaming_chat_without_usage_request(fake: StartFake, gateway: StartGateway) -> None:
    backend = await fake("base", tokens=6)
    gw = await gateway([backend])
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=API_KEY, max_retries=0)
    stream = await client.chat.completions.create(model="base", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 6
    # The gateway asked vLLM for usage, but the client did not: the usage chunk must not reach it.
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)
    body = backend.stats.last_request_body
    assert isinstance(body, dict) and body["stream_options"] == {"include_usage": True}
    await client.close()


async def test_async_streaming_with_usage(fake: StartFake, gateway: StartGateway) -> None:
    backend = await fake("base", tokens=4)
    gw = await gateway([backend])
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=API_KEY, max_retries=0)
    stream = await client.completions.create(
        model="base", prompt="count", stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    assert chunks[-1].choices == []
    await client.close()


async def test_sync_client_streaming_and_not(fake: StartFake, gateway: StartGateway) -> None:
    backend = await fake("base", tokens=3)
    gw = await gateway([backend])

    def use_sync_client() -> tuple[str, str]:
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key=API_KEY, max_retries=0)
        whole = client.chat.completions.create(model="base", messages=MESSAGES)  # type: ignore[arg-type]
        streamed = "".join(
            chunk.choices[0].delta.content or ""
            for chunk in client.chat.completions.create(model="base", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
            if chunk.choices
        )
        client.close()
        return whole.choices[0].message.content or "", streamed

    whole, streamed = await asyncio.to_thread(use_sync_client)
    assert whole.split() == streamed.split() and len(whole.split()) == 3


async def test_models_lists_base_and_lora_from_every_backend(fake: StartFake, gateway: StartGateway) -> None:
    a = await fake("llama", loras=["medical", "legal"])
    b = await fake("qwen", loras=["code"])
    gw = await gateway([a, b])
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=API_KEY, max_retries=0)
    ids = {m.id async for m in client.models.list()}
    assert ids == {"llama", "medical", "legal", "qwen", "code"}
    await client.close()


async def test_lora_names_route_to_the_backend_that_serves_them(fake: StartFake, gateway: StartGateway) -> None:
    a = await fake("llama", loras=["medical"])
    b = await fake("qwen", loras=["code"])
    gw = await gateway([a, b])
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=API_KEY, max_retries=0)
    for _ in range(4):
        await client.chat.completions.create(model="code", messages=MESSAGES)  # type: ignore[arg-type]
        await client.chat.completions.create(model="medical", messages=MESSAGES, stream=False)  # type: ignore[arg-type]
    assert b.stats.requests_by_model == {"code": 4}
    assert a.stats.requests_by_model == {"medical": 4}
    await client.close()


async def test_unknown_model_is_model_not_found(fake: StartFake, gateway: StartGateway) -> None:
    gw = await gateway([await fake("base")])
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as caught:
        await client.chat.completions.create(model="nope", messages=MESSAGES)  # type: ignore[arg-type]
    assert caught.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        bad = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="sk-wrong-key", max_retries=0)
        await bad.chat.completions.create(model="base", messages=MESSAGES)  # type: ignore[arg-type]
    await client.close()
