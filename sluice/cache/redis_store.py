"""The cache store shared by every gateway replica: entries in Redis, a vector index in each replica's memory.

Keys (prefix = RedisConfig.key_prefix; docs/cache-store.md):
    {prefix}cache:e:{id}    one entry (sluice/cache/codec.py), SET with PX = what is left of its TTL
    {prefix}cache:lru       sorted set: id → last use (µs, Redis's clock)
    {prefix}cache:events    stream of changes, followed by every replica's index (sluice/cache/redis_sync.py)
    {prefix}cache:seq       the number of the last event

`get` and `put` are one EVALSHA each on the hot path's lean client (sluice/resp.py): `get` reads the entry
and marks it used; `put` stores it, drops ids unused for a whole TTL (they have expired), evicts the least
recently used past `max_entries`, and records every change as an event, atomically. `nearest` reads the
replica's index and never does I/O. A semantic hit whose entry has meanwhile gone from Redis (evicted or
expired by another replica) makes `get` return None and drop the id from this replica's index.

Scripts build the keys of evicted entries from the prefix, so every key of a call must live on one Redis
(as for the rate limiter: one Redis, or a primary with replicas; not Redis Cluster).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import Any

from sluice.cache.codec import HEAD_GUESS, CodecError, EntryHead, decode, decode_head, encode, head_size, vector_bytes
from sluice.cache.redis_sync import CacheKeys, IndexFollower
from sluice.cache.types import CacheEntry, CacheUnavailable, Vector
from sluice.resp import RespClient, RespError

log = logging.getLogger("sluice.cache")

_EMIT = """
local function emit(events, counter, length, ...)
  local seq = redis.call('INCR', counter)
  redis.call('XADD', events, 'MAXLEN', '~', length, '*', 'seq', seq, ...)
end
local function now_us()
  local time = redis.call('TIME')
  return tonumber(time[1]) * 1000000 + tonumber(time[2])
end
local function score(us)
  return string.format('%.0f', us)  -- Lua's own number format keeps 14 digits; a µs time has 16
end
"""

# KEYS: entry, lru, events, seq. ARGV: id, payload, px, ttl (µs), max entries, stream length, entry key prefix,
# scope, embedder, tenant, model, probe, expires (s), vector. Reply: how many entries were dropped.
PUT = (
    _EMIT
    + """
local id, prefix = ARGV[1], ARGV[7]
local now = now_us()
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('ZADD', KEYS[2], score(now), id)
emit(KEYS[3], KEYS[4], ARGV[6], 'op', 'add', 'id', id, 'scope', ARGV[8], 'embedder', ARGV[9], 'tenant', ARGV[10],
     'model', ARGV[11], 'probe', ARGV[12], 'expires', ARGV[13], 'vector', ARGV[14])
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', score(now - tonumber(ARGV[4])), 'LIMIT', 0, 1000)
if #gone > 0 then
  redis.call('ZREM', KEYS[2], unpack(gone))
end
local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[5])
if over > 0 then
  local popped = redis.call('ZPOPMIN', KEYS[2], over)
  for i = 1, #popped, 2 do
    gone[#gone + 1] = popped[i]
  end
end
for i = 1, #gone do
  redis.call('DEL', prefix .. gone[i])
end
if #gone > 0 then
  emit(KEYS[3], KEYS[4], ARGV[6], 'op', 'del', 'ids', table.concat(gone, ' '))
end
return #gone
"""
)

# KEYS: entry, lru. ARGV: id. Reply: the entry's bytes or nil.
GET = """
local data = redis.call('GET', KEYS[1])
if data then
  local time = redis.call('TIME')
  redis.call('ZADD', KEYS[2], 'XX', string.format('%.0f', tonumber(time[1]) * 1000000 + tonumber(time[2])), ARGV[1])
else
  redis.call('ZREM', KEYS[2], ARGV[1])
end
return data
"""

# KEYS: lru. ARGV: entry key prefix, ids. Reply: how many entries were deleted.
DELETE = """
local deleted = 0
for i = 2, #ARGV do
  deleted = deleted + redis.call('DEL', ARGV[1] .. ARGV[i])
end
redis.call('ZREM', KEYS[1], unpack(ARGV, 2))
return deleted
"""

# KEYS: events, seq. ARGV: the stream length, then the event's fields.
EMIT = (
    _EMIT
    + """
emit(KEYS[1], KEYS[2], ARGV[1], unpack(ARGV, 2))
return 1
"""
)

_SHAS = {script: hashlib.sha1(script.encode()).hexdigest() for script in (PUT, GET, DELETE, EMIT)}
_FAILURES = (OSError, TimeoutError, RespError)  # ConnectionError is an OSError; the watchdog raises TimeoutError
_PURGE_BATCH = 500


class RedisCacheStore:
    """`RedisCacheStore(url, ttl=…, max_entries=…)`; `start()` loads the index and follows other replicas."""

    def __init__(
        self,
        url: str,
        *,
        ttl: float,
        max_entries: int,
        timeout: float = 0.25,
        key_prefix: str = "sluice:",
        client: RespClient | None = None,
        block: float = 1.0,
    ) -> None:
        if ttl <= 0 or max_entries < 1:
            raise ValueError("ttl must be positive and max_entries at least 1")
        self.ttl = ttl
        self.max_entries = max_entries
        self.keys = CacheKeys(key_prefix)
        self.stream_length = max(4 * max_entries, 1000)  # room for a slow replica to catch up without a rebuild
        self._client = client or RespClient(url, timeout)
        self._owns_client = client is None
        self.follower = IndexFollower(url, self.keys, ttl=ttl, timeout=timeout, block=block)

    @property
    def healthy(self) -> bool:
        """Whether this replica's index is in sync with Redis."""
        return self.follower.healthy

    @property
    def errors(self) -> int:
        """Redis failures seen by the index follower (the request paths raise CacheUnavailable instead)."""
        return self.follower.errors

    async def start(self) -> None:
        await self.follower.start()

    async def close(self) -> None:
        await self.follower.close()
        if self._owns_client:
            await self._client.close()

    async def get(self, entry_id: str) -> CacheEntry | None:
        keys = self.keys
        index = self.follower.index
        generation = index.generation(entry_id)
        data = await self._run(GET, (keys.entry(entry_id), keys.lru), (entry_id,))
        if data is None:
            if generation is not None:  # gone from Redis: stop offering it here (unless re-added meanwhile)
                index.remove(entry_id, generation)
            return None
        try:
            return decode(data)
        except CodecError as exc:  # written by another version of Sluice: a miss, overwritten by the next put
            log.warning("unreadable cache entry", extra={"id": entry_id, "error": str(exc)})
            return None

    async def put(self, entry: CacheEntry) -> None:
        expires = entry.created + self.ttl
        px = int((expires - time.time()) * 1000)
        if px <= 0:
            return
        keys = self.keys
        args = (
            entry.id, encode(entry), px, int(self.ttl * 1_000_000), self.max_entries, self.stream_length,
            keys.entry_prefix, entry.scope, entry.embedder, entry.tenant, entry.model, entry.probe, repr(expires),
            vector_bytes(entry.vector),
        )  # fmt: skip
        await self._run(PUT, (keys.entry(entry.id), keys.lru, keys.events, keys.seq), args)

    def nearest(
        self, scope: str, embedder: str, vector: Vector, threshold: float, limit: int = 3
    ) -> list[tuple[str, float]]:
        return self.follower.index.nearest(scope, embedder, vector, threshold, limit, time.time())

    def forget(self, entry_id: str) -> None:
        """Drop an id from this replica's index (`get` already does so when it finds the entry gone)."""
        self.follower.index.remove(entry_id)

    async def purge(self, tenant: str | None = None, model: str | None = None) -> int:
        """Delete the matching entries (a SCAN reading only each entry's head), then tell every replica."""
        keys = self.keys
        client = self._client
        deleted = 0
        cursor: bytes | str = "0"
        try:
            while True:
                cursor, found = await client.call("SCAN", cursor, "MATCH", keys.entry_pattern, "COUNT", _PURGE_BATCH)
                doomed = [
                    head.id for head in await self._heads(found) if head is not None and _matches(head, tenant, model)
                ]
                if doomed:
                    deleted += await self._run(DELETE, (keys.lru,), (keys.entry_prefix, *doomed))
                if cursor in (b"0", "0"):
                    break
        except _FAILURES as exc:
            raise CacheUnavailable(f"cache purge failed: {exc}") from exc
        fields: list[str] = ["op", "purge"]
        if tenant is not None:
            fields += ("tenant", tenant)
        if model is not None:
            fields += ("model", model)
        await self._run(EMIT, (keys.events, keys.seq), (self.stream_length, *fields))
        return deleted

    async def size(self) -> int:
        try:
            return int(await self._client.call("ZCARD", self.keys.lru))
        except _FAILURES as exc:
            raise CacheUnavailable(f"cache size failed: {exc}") from exc

    async def wait_synced(self, timeout: float = 2.0) -> bool:
        """Wait until this replica's index has applied every event written so far (tests, admin tools)."""
        try:
            target = int(await self._client.call("GET", self.keys.seq) or 0)
        except _FAILURES as exc:
            raise CacheUnavailable(f"cache sync check failed: {exc}") from exc
        deadline = time.monotonic() + timeout
        while not (self.follower.healthy and self.follower.last_seq >= target):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    async def _heads(self, keys: list[bytes]) -> list[EntryHead | None]:
        client = self._client
        prefixes = await asyncio.gather(*(client.call("GETRANGE", key, 0, HEAD_GUESS - 1) for key in keys))
        heads: list[EntryHead | None] = []
        for key, data in zip(keys, prefixes, strict=True):
            try:
                if data and head_size(data) > len(data):
                    data = await client.call("GETRANGE", key, 0, head_size(data) - 1)
                heads.append(decode_head(data) if data else None)
            except CodecError:
                heads.append(None)  # not ours to judge: a purge leaves an unreadable entry to its TTL
        return heads

    async def _run(self, script: str, keys: tuple[str, ...], args: tuple[Any, ...]) -> Any:
        """EVALSHA, loading the script when Redis does not know it yet (first use, restart, SCRIPT FLUSH)."""
        client = self._client
        try:
            try:
                return await client.call("EVALSHA", _SHAS[script], len(keys), *keys, *args)
            except RespError as error:
                if not str(error).startswith("NOSCRIPT"):
                    raise
            await client.call("SCRIPT", "LOAD", script)
            return await client.call("EVALSHA", _SHAS[script], len(keys), *keys, *args)
        except _FAILURES as exc:
            raise CacheUnavailable(f"cache storage failed: {exc}") from exc


def _matches(head: EntryHead, tenant: str | None, model: str | None) -> bool:
    return (tenant is None or head.tenant == tenant) and (model is None or head.model == model)
