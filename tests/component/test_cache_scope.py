"""The cache's safety property, on real Redis: an answer stored for one request is never returned for a
request that differs in tenant, model, adapter, system prompt, an output-changing parameter or an
earlier turn — even with the same last message, which the semantic level would match if the scope let it.

The positive controls in every example (the same request hits exactly, the last message recased hits by
meaning) show the lookup would find the entry if the scope allowed it.
"""

from __future__ import annotations

import asyncio
import copy
import uuid
from typing import Any

import redis.asyncio as aioredis
import uvloop
from hypothesis import HealthCheck, given, settings

from sluice.cache.embedders import make_embedder
from sluice.cache.keys import cache_key
from sluice.cache.service import ResponseCache
from sluice.cache.stores import make_store
from sluice.config import CacheConfig, EmbedderConfig, RedisConfig
from sluice.metrics import GatewayMetrics
from sluice.testing.fake_vllm import FakeVLLMSettings, start_fake_vllm
from tests.unit.test_cache_keys import mutated

REDIS = "redis://127.0.0.1:6379/0"
BODY = (
    b'{"object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"x"},'
    b'"finish_reason":"stop"}]}'
)


def test_a_stored_answer_never_crosses_its_scope() -> None:
    prefix = f"sluice-test-{uuid.uuid4().hex[:12]}:"
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        fake = runner.run(start_fake_vllm(FakeVLLMSettings(model="embedder")))
        config = CacheConfig(enabled=True, embedder=EmbedderConfig(kind="openai", url=fake.url, model="embedder"))
        store = make_store(config, RedisConfig(url=REDIS, key_prefix=prefix))
        cache = ResponseCache(config, store, make_embedder(config.embedder), GatewayMetrics())
        runner.run(cache.start())

        async def one(case: tuple[dict[str, Any], str, dict[str, Any], str]) -> None:
            body, tenant, other, other_tenant = case
            await cache.store.purge()  # earlier examples' entries could legitimately match this one's
            stored = cache_key("chat", body, tenant)
            cache.save(stored, BODY, None, semantic=True)
            await asyncio.gather(*cache._pending)
            assert (await cache.lookup(stored, semantic=True)).result == "hit_exact"
            recased = copy.deepcopy(body)
            recased["messages"][-1]["content"] += "?"  # a new exact key, the same meaning
            assert (await cache.lookup(cache_key("chat", recased, tenant), semantic=True)).result == "hit_semantic"
            found = await cache.lookup(cache_key("chat", other, other_tenant), semantic=True)
            assert found.result == "miss" and found.entry is None, (body, tenant, other, other_tenant)

        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
        @given(mutated())
        def check(case: tuple[dict[str, Any], str, dict[str, Any], str]) -> None:
            runner.run(one(case))

        try:
            check()
        finally:
            runner.run(cache.close())
            runner.run(fake.close())
            runner.run(_delete(prefix))


async def _delete(prefix: str) -> None:
    client = aioredis.from_url(REDIS)
    keys = [key async for key in client.scan_iter(match=prefix + "*", count=1000)]
    if keys:
        await client.delete(*keys)
    await client.aclose()
