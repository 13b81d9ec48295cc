"""The response cache through the gateway: hits, replayed streams, what is never stored, scoping, switches.

Real Redis (a key prefix of each test's own), fake vLLM backends; the fake's embeddings ignore case and
punctuation like an uncased embedding model, which gives semantic hits on demand.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
import redis

from sluice.app import Gateway
from sluice.cache.redis_store import RedisCacheStore
from sluice.siblings import WORKERS_ENV
from sluice.testing.fake_vllm import FakeVLLM
from tests.component.test_audit_log import rows_eventually
from tests.conftest import API_KEY, StartFake, StartGateway, free_port
from tests.redis_server import RedisServer

REDIS = "redis://127.0.0.1:6379/0"
ADMIN = "admin-key-0123456789"
OTHER_KEY = "sk-other-0123456789"
QUESTION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def prefix() -> Iterator[str]:
    """A Redis key prefix of the test's own, emptied afterwards."""
    name = f"sluice-test-{uuid.uuid4().hex[:12]}:"
    yield name
    client = redis.Redis.from_url(REDIS)
    keys = list(client.scan_iter(match=name + "*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def cache_sections(embedder: FakeVLLM, prefix: str | None, **cache: Any) -> dict[str, Any]:
    sections: dict[str, Any] = {
        "cache": {"enabled": True, "embedder": {"kind": "openai", "url": embedder.url, "model": "embedder"}, **cache},
        "auth": {
            "admin_key": ADMIN,
            "api_keys": [
                {"name": "test", "key": API_KEY, "tenant": "acme"},
                {"name": "other", "key": OTHER_KEY, "tenant": "globex"},
                {"name": "nocache", "key": "sk-nocache-0123456789", "tenant": "acme", "cache": False},
            ],
        },
    }
    if prefix is not None:
        sections["redis"] = {"url": REDIS, "key_prefix": prefix}
    return sections


async def chat(
    gw: Gateway | Remote, key: str = API_KEY, headers: dict[str, str] | None = None, **body: Any
) -> tuple[int, dict[str, str], bytes]:
    payload = {"model": "base", "messages": QUESTION, "temperature": 0, **body}
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gw.url + "/v1/chat/completions",
            json=payload,
            headers={"authorization": f"Bearer {key}", **(headers or {})},
        ) as response,
    ):
        return response.status, dict(response.headers), await response.read()


async def settled(gw: Gateway) -> None:
    """Wait for the background stores of answers already sent."""
    cache = gw.cache
    assert cache is not None
    await asyncio.gather(*cache._pending)
    store = cache.store
    if isinstance(store, RedisCacheStore):
        await store.wait_synced()  # this replica's index has applied its own puts


@pytest.fixture(params=["redis", "memory"])
def store(request: pytest.FixtureRequest) -> str | None:
    """Each test of the cache's behaviour runs on Redis and in process (embedded mode)."""
    if request.param == "memory":
        return None
    return str(request.getfixturevalue("prefix"))


async def test_an_answer_is_served_again_without_the_backend(
    fake: StartFake, gateway: StartGateway, store: str | None
) -> None:
    backend = await fake("base", tokens=6)
    gw = await gateway([backend], **cache_sections(await fake("embedder"), store))
    status, headers, first = await chat(gw)
    assert (status, headers["x-sluice-cache"]) == (200, "miss")
    await settled(gw)
    status, headers, again = await chat(gw)
    assert (status, headers["x-sluice-cache"]) == (200, "hit-exact")
    assert again == first
    assert backend.stats.requests_total == 1
    # the same question, differently spaced, is the same request
    spaced = [QUESTION[0], {"role": "user", "content": "  What is the capital   of France?\n"}]
    assert (await chat(gw, messages=spaced))[1]["x-sluice-cache"] == "hit-exact"
    # and differently cased or punctuated, a semantic hit
    status, headers, similar = await chat(
        gw, messages=[QUESTION[0], {"role": "user", "content": "what is the capital of france"}]
    )
    assert (status, headers["x-sluice-cache"]) == (200, "hit-semantic")
    assert float(headers["x-sluice-cache-similarity"]) > 0.99
    assert similar == first
    assert backend.stats.requests_total == 1


async def test_a_streamed_answer_is_replayed_as_a_stream_the_openai_client_reads(
    fake: StartFake, gateway: StartGateway, store: str | None
) -> None:
    backend = await fake("base", tokens=40)
    gw = await gateway([backend], **cache_sections(await fake("embedder"), store))
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=API_KEY, max_retries=0)

    async def streamed(**extra: Any) -> tuple[str, str, Any]:
        raw = await client.chat.completions.with_raw_response.create(
            model="base",
            messages=QUESTION,
            temperature=0,
            stream=True,
            **extra,  # type: ignore[arg-type]
        )
        chunks = [chunk async for chunk in raw.parse()]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finish == ["stop"] or finish == ["length"]
        return raw.headers["x-sluice-cache"], text, chunks

    result, original, _ = await streamed()
    assert result == "miss" and len(original.split()) == 40
    await settled(gw)
    result, replayed, chunks = await streamed()
    assert (result, replayed) == ("hit-exact", original)
    assert all(c.usage is None for c in chunks)
    result, _, chunks = await streamed(stream_options={"include_usage": True})
    assert result == "hit-exact" and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 40
    # the streamed answer also serves the question asked without streaming
    answer = await client.chat.completions.with_raw_response.create(model="base", messages=QUESTION, temperature=0)  # type: ignore[arg-type]
    assert answer.headers["x-sluice-cache"] == "hit-exact"
    assert answer.parse().choices[0].message.content == original
    assert backend.stats.requests_total == 1
    await client.close()


async def test_failed_cut_and_fallback_answers_are_not_stored(
    fake: StartFake, gateway: StartGateway, prefix: str
) -> None:
    backend = await fake("base", tokens=8)
    spare = await fake("spare", tokens=8)
    sections = cache_sections(await fake("embedder"), prefix)
    gw = await gateway([backend, spare], routing={"fallbacks": {"base": ["spare"]}, "retries": 0}, **sections)
    cut = {"x-fake-fail": "drop:3"}
    assert (await chat(gw, headers=cut, stream=True))[0] == 200  # the stream starts, then breaks
    sse_error = {"x-fake-fail": "sse-error:2"}
    await chat(gw, headers=sse_error, stream=True)
    assert (await chat(gw, headers={"x-fake-fail": "500"}))[0] >= 500
    assert (await chat(gw, headers={"x-fake-fail": "400"}))[0] == 400
    await settled(gw)
    assert gw.cache is not None and await gw.cache.store.size() == 0
    await backend.close()  # the model's backend is gone: once it is marked down, the fallback model answers
    for _ in range(100):
        status, headers, _ = await chat(gw)
        if status == 200:
            break
        await asyncio.sleep(0.05)
    assert (status, headers["x-sluice-model"], headers["x-sluice-cache"]) == (200, "spare", "miss")
    await settled(gw)
    assert await gw.cache.store.size() == 0


async def test_what_is_not_cached(fake: StartFake, gateway: StartGateway, prefix: str) -> None:
    backend = await fake("base", tokens=4)
    gw = await gateway(
        [backend],
        **cache_sections(
            await fake("embedder"), prefix, models={"base-hot": {"max_temperature": 0.7}, "other": {"enabled": False}}
        ),
    )
    for body in ({"temperature": 0.2}, {"temperature": None}, {"logprobs": True}):
        payload = {"model": "base", "messages": QUESTION, **body}
        if body.get("temperature", 0) is None:
            del payload["temperature"]
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                gw.url + "/v1/chat/completions", json=payload, headers={"authorization": f"Bearer {API_KEY}"}
            ) as response,
        ):
            assert response.headers["x-sluice-cache"] == "bypass", body
    assert (await chat(gw, key="sk-nocache-0123456789"))[1]["x-sluice-cache"] == "bypass"
    await settled(gw)
    assert gw.cache is not None and await gw.cache.store.size() == 0
    assert backend.stats.requests_total == 4
    # embeddings and model listings are not cached, and say nothing about it
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gw.url + "/v1/embeddings",
            json={"model": "base", "input": "x"},
            headers={"authorization": f"Bearer {API_KEY}"},
        ) as response,
    ):
        assert response.status == 200 and "x-sluice-cache" not in response.headers


async def test_cache_control_no_cache_refreshes_and_no_store_leaves_nothing(
    fake: StartFake, gateway: StartGateway, prefix: str
) -> None:
    backend = await fake("base", tokens=4)
    gw = await gateway([backend], **cache_sections(await fake("embedder"), prefix))
    _, headers, _ = await chat(gw, headers={"cache-control": "no-store"})
    assert headers["x-sluice-cache"] == "miss"
    await settled(gw)
    assert (await chat(gw))[1]["x-sluice-cache"] == "miss"  # the no-store answer was not kept
    await settled(gw)
    assert (await chat(gw))[1]["x-sluice-cache"] == "hit-exact"
    _, headers, _ = await chat(gw, headers={"cache-control": "no-cache"})
    assert headers["x-sluice-cache"] == "bypass"
    assert backend.stats.requests_total == 3


async def test_tenants_never_share_answers(fake: StartFake, gateway: StartGateway, store: str | None) -> None:
    backend = await fake("base", tokens=4)
    gw = await gateway([backend], **cache_sections(await fake("embedder"), store))
    await chat(gw)
    await settled(gw)
    similar = [QUESTION[0], {"role": "user", "content": "what is the capital of france"}]
    assert (await chat(gw, messages=similar))[1]["x-sluice-cache"] == "hit-semantic"
    unstored = {"cache-control": "no-store"}  # the other tenant's own answers would be legitimate hits
    assert (await chat(gw, key=OTHER_KEY, headers=unstored))[1]["x-sluice-cache"] == "miss"
    assert (await chat(gw, key=OTHER_KEY, headers=unstored, messages=similar))[1]["x-sluice-cache"] == "miss"
    assert backend.stats.requests_total == 3


async def test_two_gateway_processes_share_one_cache(
    fake: StartFake, gateway: StartGateway, prefix: str, tmp_path: Path
) -> None:
    backend = await fake("base", tokens=4)
    embedder = await fake("embedder")
    here = await gateway([backend], **cache_sections(embedder, prefix))
    port = free_port()
    config = tmp_path / "sluice.yaml"
    config.write_text(
        orjson.dumps(
            {
                "server": {"host": "127.0.0.1", "port": port},
                "backends": [{"name": "b0", "url": backend.url}],
                "database": {"url": f"sqlite:///{tmp_path}/sluice.db"},
                "audit": {"enabled": False},
                "logging": {"level": "warning"},
                **cache_sections(embedder, prefix),
            }
        ).decode()  # JSON is YAML
    )
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "sluice", "serve", "--config", str(config))
    try:
        there = Remote(f"http://127.0.0.1:{port}")
        for _ in range(150):
            with contextlib.suppress(aiohttp.ClientError):
                if (await chat(there, headers={"cache-control": "no-store"}))[0] == 200:
                    break
            await asyncio.sleep(0.1)
        await chat(here, messages=[QUESTION[1]])
        await settled(here)
        assert (await chat(there, messages=[QUESTION[1]]))[1]["x-sluice-cache"] == "hit-exact"
        similar = [{"role": "user", "content": "WHAT is the capital of France"}]
        await eventually_hit(there, similar, "hit-semantic")  # the other process's index follows the stream
        other = [{"role": "user", "content": "Name the largest planet."}]
        assert (await chat(there, messages=other))[1]["x-sluice-cache"] == "miss"
        await eventually_hit(here, other, "hit-exact")  # stored by the other process, in the background
        await eventually_hit(here, [{"role": "user", "content": "name the LARGEST planet"}], "hit-semantic")
    finally:
        process.terminate()
        await process.wait()


@dataclass
class Remote:
    """A gateway in another process, as `chat` sees it."""

    url: str


async def test_a_purge_a_worker_did_not_confirm_answers_503(
    fake: StartFake, gateway: StartGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In-process store, several workers: a sibling that does not answer makes the purge say so (retry)."""
    monkeypatch.setenv(WORKERS_ENV, str(tmp_path))
    gw = await gateway([await fake("base", tokens=4)], **cache_sections(await fake("embedder"), None))
    # A worker that died without cleaning up after this one started (one found at start-up is forgotten then,
    # when the new worker asks its siblings for their drains and logouts): nothing listens on its socket.
    (tmp_path / "999999.sock").write_bytes(b"")
    await chat(gw)
    await settled(gw)
    admin = {"authorization": f"Bearer {ADMIN}"}
    async with aiohttp.ClientSession(headers=admin) as session:
        async with session.post(gw.url + "/admin/cache/purge", json={"all": True}) as response:
            body = await response.json()
            assert response.status == 503 and response.headers["retry-after"] == "5"
            assert body["error"]["code"] == "cache_unavailable"
            assert "1 worker(s) did not confirm" in body["error"]["message"]
        assert not (tmp_path / "999999.sock").exists()  # forgotten: the next purge asks only live workers
        async with session.post(gw.url + "/admin/cache/purge", json={"all": True}) as response:
            assert (response.status, await response.json()) == (200, {"purged": 0})  # purged the first time


async def eventually_hit(gw: Gateway | Remote, messages: list[dict[str, str]], result: str) -> None:
    for _ in range(100):
        headers = (await chat(gw, messages=messages, headers={"cache-control": "no-store"}))[1]
        if headers["x-sluice-cache"] == result:
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"never a {result} for {messages}")


async def test_admin_purge(fake: StartFake, gateway: StartGateway, store: str | None) -> None:
    backend = await fake("base", tokens=4)
    gw = await gateway([backend], **cache_sections(await fake("embedder"), store))
    await chat(gw)
    await chat(gw, key=OTHER_KEY)
    await settled(gw)
    admin = {"authorization": f"Bearer {ADMIN}"}
    async with aiohttp.ClientSession(headers=admin) as session:
        async with session.get(gw.url + "/admin/cache") as response:
            assert (await response.json())["entries"] == 2
        for bad in (
            b"{}",
            b'{"tenant": 1}',
            b'{"tenant": "a", "caller": "b"}',
            b"not json",
            b'{"all": true, "model": "x"}',
        ):
            async with session.post(gw.url + "/admin/cache/purge", data=bad) as response:
                assert response.status == 400, bad
                assert "error" in await response.json()
        async with session.post(gw.url + "/admin/cache/purge", json={"tenant": "acme"}) as response:
            assert (response.status, await response.json()) == (200, {"purged": 1})
        assert (await chat(gw))[1]["x-sluice-cache"] == "miss"
        assert (await chat(gw, key=OTHER_KEY))[1]["x-sluice-cache"] == "hit-exact"
        await settled(gw)
        async with session.post(gw.url + "/admin/cache/purge", json={"model": "base"}) as response:
            assert (await response.json()) == {"purged": 2}
        async with session.post(gw.url + "/admin/cache/purge", json={"all": True}) as response:
            assert (await response.json()) == {"purged": 0}
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gw.url + "/admin/cache/purge", json={"all": True}, headers={"authorization": f"Bearer {API_KEY}"}
        ) as response,
    ):
        assert response.status in (401, 403)


async def test_admin_cache_is_404_when_the_cache_is_off(fake: StartFake, gateway: StartGateway) -> None:
    backend = await fake("base")
    gw = await gateway([backend], auth={"admin_key": ADMIN, "api_keys": [{"name": "test", "key": API_KEY}]})
    admin = {"authorization": f"Bearer {ADMIN}"}
    async with aiohttp.ClientSession(headers=admin) as session, session.get(gw.url + "/admin/cache") as response:
        assert response.status == 404
        assert "cache.enabled" in (await response.json())["error"]["message"]
    assert "x-sluice-cache" not in (await chat(gw))[1]


async def test_the_audit_log_and_metrics_record_the_cache_result(
    fake: StartFake, gateway: StartGateway, prefix: str
) -> None:
    backend = await fake("base", tokens=4)
    gw = await gateway([backend], **cache_sections(await fake("embedder"), prefix))
    await chat(gw)
    await settled(gw)
    await chat(gw)
    assert gw.database is not None
    rows = await rows_eventually(gw.database, 2)
    assert [(r["cache_result"], r["backend"], r["completion_tokens"]) for r in rows] == [
        ("miss", "b0", 4),
        ("hit_exact", None, 0),
    ]
    metrics = gw.metrics.render().decode()
    assert 'sluice_cache_lookups_total{result="hit_exact",route="chat"} 1.0' in metrics
    assert 'sluice_cache_stores_total{outcome="stored"} 1.0' in metrics
    assert "sluice_cache_store_up 1.0" in metrics
    assert orjson.loads((await chat(gw))[2])["usage"]["completion_tokens"] == 4  # the answer keeps its usage


async def test_redis_down_bypasses_the_cache_and_requests_still_succeed(fake: StartFake, gateway: StartGateway) -> None:
    async with RedisServer() as server:
        backend = await fake("base", tokens=4)
        sections = cache_sections(await fake("embedder"), None)
        sections["redis"] = {"url": server.url, "timeout": 0.2}
        gw = await gateway([backend], **sections)
        await chat(gw)
        await settled(gw)
        assert (await chat(gw))[1]["x-sluice-cache"] == "hit-exact"
        await server.stop()
        for stream in (False, True, False):
            status, headers, body = await chat(gw, stream=stream)
            assert (status, headers["x-sluice-cache"]) == (200, "bypass")
            assert b"error" not in body
        metrics = gw.metrics.render().decode()
        assert "sluice_cache_store_up 0.0" in metrics
        assert 'sluice_dependency_up{dependency="redis"} 0.0' in metrics
        assert 'sluice_cache_errors_total{part="store"}' in metrics
        await server.start()  # the same port, empty
        for _ in range(50):
            status, headers, _ = await chat(gw)
            if headers["x-sluice-cache"] == "miss":
                break
            await asyncio.sleep(0.1)
        await settled(gw)
        assert (await chat(gw))[1]["x-sluice-cache"] == "hit-exact"
        assert "sluice_cache_store_up 1.0" in gw.metrics.render().decode()
        assert 'sluice_dependency_up{dependency="redis"} 1.0' in gw.metrics.render().decode()


async def test_a_managed_key_can_be_kept_out_of_the_cache(fake: StartFake, gateway: StartGateway, prefix: str) -> None:
    backend = await fake("base", tokens=4)
    sections = cache_sections(await fake("embedder"), prefix)
    sections["auth"] = {**sections["auth"], "key_secret": "s" * 40}
    gw = await gateway([backend], **sections)
    admin = {"authorization": f"Bearer {ADMIN}"}
    async with aiohttp.ClientSession(headers=admin) as session:
        keys = {}
        for name, cache in (("cached", True), ("uncached", False)):
            async with session.post(gw.url + "/admin/keys", json={"name": name, "cache": cache}) as response:
                assert response.status == 201
                created = await response.json()
                assert created["cache"] is cache
                keys[name] = created["key"]
    for _ in range(2):
        assert (await chat(gw, key=keys["uncached"]))[1]["x-sluice-cache"] == "bypass"
    await chat(gw, key=keys["cached"])
    await settled(gw)
    assert (await chat(gw, key=keys["cached"]))[1]["x-sluice-cache"] == "hit-exact"


async def test_semantic_hits_with_the_local_embedding_model(fake: StartFake, gateway: StartGateway) -> None:
    backend = await fake("base", tokens=4)
    gw = await gateway([backend], cache={"enabled": True, "embedder": {"kind": "local"}})
    assert gw.cache is not None and gw.cache._warming is not None
    await gw.cache._warming  # the model loads in the background at start-up (seconds)
    asked = [{"role": "user", "content": "How many moons does Mars have?"}]
    await chat(gw, messages=asked)
    await settled(gw)
    reworded = [{"role": "user", "content": "how many moons does mars have"}]
    status, headers, _ = await chat(gw, messages=reworded)
    assert (status, headers["x-sluice-cache"]) == (200, "hit-semantic")
    assert float(headers["x-sluice-cache-similarity"]) >= 0.98
    for different in ("How many moons does Jupiter have?", "How many moons does Mars not have?"):
        assert (await chat(gw, messages=[{"role": "user", "content": different}]))[1]["x-sluice-cache"] == "miss"
    assert backend.stats.requests_total == 3
