"""The cache stores against real Redis (and the in-process store, where the behaviour is the same): entries,
TTL, LRU eviction, purges, replicas sharing one cache, index rebuilds, and a Redis outage."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import numpy as np
import pytest
import redis.asyncio as redis

from sluice.cache.memory_store import MemoryCacheStore
from sluice.cache.redis_store import RedisCacheStore
from sluice.cache.stores import make_store
from sluice.cache.types import CacheEntry, CacheUnavailable
from sluice.config import CacheConfig, RedisConfig
from sluice.resp import RespClient
from tests.conftest import eventually
from tests.redis_server import RedisServer

REDIS = "redis://127.0.0.1:6379/0"
Store = MemoryCacheStore | RedisCacheStore
MakeStore = Callable[..., Awaitable[Store]]


def unit(*components: float) -> np.ndarray:
    vector = np.array(components, np.float32)
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def entry(
    entry_id: str, vector: np.ndarray | None = None, *, tenant: str = "acme", model: str = "m", scope: str = "s"
) -> CacheEntry:
    return CacheEntry(
        id=entry_id, scope=scope, tenant=tenant, model=model, probe=f"question {entry_id}",
        vector=unit(1, 0, 0) if vector is None else vector, embedder="minilm", body=f'{{"id": "{entry_id}"}}'.encode(),
        created=time.time(),
    )  # fmt: skip


def ids(store: Store, vector: np.ndarray, scope: str = "s") -> set[str]:
    return {entry_id for entry_id, _ in store.nearest(scope, "minilm", vector, -1.0, 10_000)}


async def synced(*stores: Store) -> None:
    for store in stores:
        if isinstance(store, RedisCacheStore):
            assert await store.wait_synced(3.0)



@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    """A key prefix of the test's own on the machine's Redis; its keys are deleted afterwards."""
    value = f"sluice-test-cache-{secrets.token_hex(4)}:"
    yield value
    client = redis.Redis.from_url(REDIS)
    keys = [key async for key in client.scan_iter(match=f"{value}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture
async def make(prefix: str) -> AsyncIterator[MakeStore]:
    """Start stores: `await make("redis", ttl=…, max_entries=…)`; all closed afterwards."""
    started: list[Store] = []

    async def start(kind: str, ttl: float = 60.0, max_entries: int = 100, url: str = REDIS, **extra: object) -> Store:
        store: Store
        if kind == "memory":
            store = MemoryCacheStore(ttl=ttl, max_entries=max_entries)
        else:
            store = RedisCacheStore(url, ttl=ttl, max_entries=max_entries, key_prefix=prefix, block=0.2, **extra)  # type: ignore[arg-type]
        await store.start()
        started.append(store)
        return store

    yield start
    for store in started:
        await store.close()


both = pytest.mark.parametrize("kind", ["memory", "redis"])


@both
async def test_an_entry_round_trips_and_is_found_by_meaning(kind: str, make: MakeStore) -> None:
    store = await make(kind)
    original = entry("a" * 64, unit(1, 2, 3))
    await store.put(original)
    found = await store.get(original.id)
    assert found is not None and found.vector is not None
    assert (found.body, found.probe, found.tenant, found.created) == (
        original.body,
        original.probe,
        "acme",
        original.created,
    )
    assert np.array_equal(found.vector, original.vector)  # type: ignore[arg-type]
    assert await store.get("missing") is None
    await synced(store)
    [(entry_id, similarity)] = store.nearest("s", "minilm", unit(1, 2, 3.1), 0.9)
    assert entry_id == original.id and similarity > 0.99
    assert store.nearest("s", "minilm", unit(-1, 0, 0), 0.9) == []
    assert store.nearest("s", "other-embedder", unit(1, 2, 3), 0.9) == []
    assert await store.size() == 1


@both
async def test_an_entry_expires_after_the_ttl(kind: str, make: MakeStore) -> None:
    store = await make(kind, ttl=1.0)
    await store.put(entry("e1"))
    await synced(store)
    assert await store.get("e1") is not None and ids(store, unit(1, 0, 0)) == {"e1"}
    await asyncio.sleep(1.1)
    assert await store.get("e1") is None
    assert ids(store, unit(1, 0, 0)) == set()
    await store.put(_aged(entry("stale"), 2.0))
    assert await store.get("stale") is None  # stored already past its TTL: not stored at all


def _aged(value: CacheEntry, seconds: float) -> CacheEntry:
    return CacheEntry(
        **{name: getattr(value, name) for name in CacheEntry.__dataclass_fields__}
        | {"created": value.created - seconds}
    )


@both
async def test_the_least_recently_used_entry_is_evicted_exactly_past_the_bound(kind: str, make: MakeStore) -> None:
    store = await make(kind, max_entries=3)
    for name in ("a", "b", "c"):
        await store.put(entry(name))
    assert await store.size() == 3
    assert await store.get("a") is not None  # used: now "b" is the least recently used
    await store.put(entry("d"))
    assert await store.size() == 3
    assert await store.get("b") is None
    assert all([await store.get(name) for name in ("a", "c", "d")])
    await synced(store)
    assert ids(store, unit(1, 0, 0)) == {"a", "c", "d"}
    await store.put(entry("c"))  # replacing an entry is not growing past the bound
    assert await store.size() == 3 and await store.get("a") is not None


@both
async def test_purge_by_tenant_by_model_and_everything(kind: str, make: MakeStore) -> None:
    store = await make(kind)
    for i, (tenant, model) in enumerate([("t1", "m1"), ("t1", "m2"), ("t2", "m1"), ("t2", "m2")] * 2):
        await store.put(entry(f"id{i}", tenant=tenant, model=model))
    assert await store.purge(tenant="t1") == 4
    assert await store.purge(model="m1") == 2
    await synced(store)
    assert await store.size() == 2
    assert ids(store, unit(1, 0, 0)) == {"id3", "id7"}
    assert [await store.get(f"id{i}") is not None for i in range(8)] == [False, False, False, True] * 2
    assert await store.purge() == 2
    await synced(store)
    assert await store.size() == 0 and ids(store, unit(1, 0, 0)) == set()


async def test_a_semantic_hit_whose_entry_is_gone_from_redis_is_a_miss_and_leaves_the_index(
    make: MakeStore, prefix: str
) -> None:
    store = await make("redis")
    await store.put(entry("gone"))
    await synced(store)
    assert ids(store, unit(1, 0, 0)) == {"gone"}
    client = redis.Redis.from_url(REDIS)
    await client.delete(f"{prefix}cache:e:gone")  # expired or evicted behind this replica's back
    await client.aclose()
    assert await store.get("gone") is None
    assert ids(store, unit(1, 0, 0)) == set()


async def test_two_replicas_share_entries_evictions_and_purges(make: MakeStore) -> None:
    a = await make("redis", max_entries=3)
    b = await make("redis", max_entries=3)
    await a.put(entry("x1", unit(1, 0, 0)))
    await eventually(lambda: ids(b, unit(1, 0, 0)) == {"x1"}, timeout=1.0)
    found = await b.get("x1")
    assert found is not None and found.body == b'{"id": "x1"}'
    for name in ("x2", "x3", "x4"):  # through B: evicts x1, in A's index too
        await b.put(entry(name))
    await eventually(lambda: ids(a, unit(1, 0, 0)) == {"x2", "x3", "x4"}, timeout=1.0)
    await b.put(entry("other", tenant="t2"))
    assert await a.purge(tenant="acme") == 2
    await eventually(lambda: ids(b, unit(1, 0, 0)) == {"other"}, timeout=1.0)
    assert ids(a, unit(1, 0, 0)) == {"other"}


async def test_a_replica_started_later_loads_the_existing_entries(make: MakeStore) -> None:
    first = await make("redis", max_entries=2000)
    for i in range(1200):  # more than one SCAN step
        await first.put(entry(f"id{i}", unit(1, i / 1200, 0)))
    await first.put(entry("plain", scope="s2", vector=unit(0, 1, 0)))
    later = await make("redis", max_entries=2000)
    assert later.follower.rebuilds == 1 and later.healthy
    assert len(ids(later, unit(1, 0, 0))) == 1200
    assert later.nearest("s", "minilm", unit(1, 0.5, 0), 0.99999, 1)[0][0] == "id600"
    assert ids(later, unit(0, 1, 0), scope="s2") == {"plain"}


async def test_events_trimmed_before_a_replica_read_them_trigger_a_rebuild(make: MakeStore, prefix: str) -> None:
    client = RespClient(REDIS, timeout=1.0)
    writer = await make("redis", client=client)
    reader = await make("redis")
    await writer.put(entry("before"))
    await synced(reader)
    rebuilds = reader.follower.rebuilds
    # Two puts and a trim in one transaction: the reader wakes to find only the second event (a jump)
    await client.call("MULTI")
    await writer.put(entry("first", unit(0, 1, 0)))
    await writer.put(entry("second", unit(0, 0, 1)))
    await client.call("XTRIM", f"{prefix}cache:events", "MAXLEN", 1)
    await client.call("EXEC")
    await eventually(lambda: reader.follower.rebuilds > rebuilds, timeout=2.0)
    await eventually(lambda: ids(reader, unit(1, 0, 0)) == {"before", "first", "second"}, timeout=2.0)
    # A put and a trim to nothing: no event left to jump; the counter, checked when idle, shows the loss
    rebuilds = reader.follower.rebuilds
    await client.call("MULTI")
    await writer.put(entry("third"))
    await client.call("XTRIM", f"{prefix}cache:events", "MAXLEN", 0)
    await client.call("EXEC")
    await eventually(lambda: reader.follower.rebuilds > rebuilds, timeout=2.0)
    assert "third" in ids(reader, unit(1, 0, 0))
    await client.close()


async def test_a_redis_outage_fails_calls_fast_and_the_index_recovers(make: MakeStore) -> None:
    async with RedisServer() as server:
        store = await make("redis", url=server.url, timeout=0.25)
        assert isinstance(store, RedisCacheStore)
        await store.put(entry("before"))
        await synced(store)
        await server.stop()
        for call in (store.get("before"), store.put(entry("during")), store.size(), store.purge(tenant="acme")):
            started = time.monotonic()
            with pytest.raises(CacheUnavailable):
                await call
            assert time.monotonic() - started < 0.4
        await eventually(lambda: not store.healthy and store.errors > 0, timeout=3.0)
        assert ids(store, unit(1, 0, 0)) == {"before"}  # lookups go on from memory; `get` decides
        errors = store.errors
        await asyncio.sleep(0.5)
        assert store.errors > errors  # still retrying, not crashed
        await server.start()  # an empty Redis on the same port
        await eventually(lambda: store.healthy, timeout=5.0)
        assert ids(store, unit(1, 0, 0)) == set()  # rebuilt from what Redis now holds
        await store.put(entry("after"))
        await synced(store)
        assert ids(store, unit(1, 0, 0)) == {"after"} and await store.get("after") is not None


async def test_a_redis_store_started_while_redis_is_down_catches_up_when_it_comes_back(make: MakeStore) -> None:
    async with RedisServer() as server:
        await server.stop()
        store = await make("redis", url=server.url, timeout=0.25)
        assert not store.healthy
        await server.start()
        await eventually(lambda: store.healthy, timeout=5.0)
        await store.put(entry("a"))
        await synced(store)
        assert ids(store, unit(1, 0, 0)) == {"a"}


def test_make_store_picks_redis_only_when_there_is_a_url() -> None:
    assert isinstance(make_store(CacheConfig(), RedisConfig()), MemoryCacheStore)
    assert isinstance(make_store(CacheConfig(store="memory"), RedisConfig(url=REDIS)), MemoryCacheStore)
    chosen = make_store(CacheConfig(ttl=5, max_entries=7), RedisConfig(url=REDIS, key_prefix="p:", timeout=0.5))
    assert isinstance(chosen, RedisCacheStore)
    assert (chosen.ttl, chosen.max_entries, chosen.keys.prefix) == (5, 7, "p:")
    with pytest.raises(ValueError, match=r"redis\.url"):
        make_store(CacheConfig(store="redis"), RedisConfig())
