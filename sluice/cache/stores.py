"""Chooses the cache store from config: in process (embedded mode) or Redis (shared by every replica)."""

from __future__ import annotations

from sluice.cache.memory_store import MemoryCacheStore
from sluice.cache.redis_store import RedisCacheStore
from sluice.cache.types import CacheStore
from sluice.config import CacheConfig, RedisConfig


def make_store(cache: CacheConfig, redis: RedisConfig) -> CacheStore:
    """`store: auto` is Redis when `redis.url` is set, else memory; `store: redis` requires `redis.url`."""
    if cache.store == "memory" or (cache.store == "auto" and redis.url is None):
        return MemoryCacheStore(ttl=cache.ttl, max_entries=cache.max_entries)
    if redis.url is None:
        raise ValueError("cache.store is 'redis' but redis.url is not set (set redis.url, or use cache.store: auto)")
    return RedisCacheStore(
        redis.url, ttl=cache.ttl, max_entries=cache.max_entries, timeout=redis.timeout, key_prefix=redis.key_prefix
    )
