"""Keeps a replica's vector index in step with the entries in Redis: a snapshot load, then the event stream.

Every change to the shared cache (a put, the entries a put evicted or found expired, a purge) is written
by the same Lua script as an event on the stream `{prefix}cache:events`, numbered by a counter
`{prefix}cache:seq` incremented in that script. The follower here reads the stream with XREAD BLOCK on
its own redis-py connection (a blocking read would stall the hot path's shared RespClient connection)
and applies every event to its index, its own replica's too (simplest, and applying is idempotent).

Start-up and recovery: note the stream's last id and the counter first (atomically), then SCAN the entry
keys reading only each entry's head, then follow the stream from the noted id, so an entry changed during
the scan is replayed, never missed. The event numbers make a gap exact: an event whose number is not the
last one plus one, or a counter ahead of every event left in the stream, means events were trimmed
before this replica read them (or Redis lost its data), and the index is rebuilt by a fresh scan. So is it
after any Redis failure, which never ends the task: it retries with backoff, logs once per outage, counts
failures in `errors` and reports `healthy`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from sluice.cache.codec import HEAD_GUESS, CodecError, EntryHead, decode_head, head_size, vector_from_bytes
from sluice.cache.index import VectorIndex
from sluice.cache.types import Vector

log = logging.getLogger("sluice.cache.sync")

_BATCH = 500  # keys per SCAN step and entries per XREAD: bounded memory and latency per round trip
_MAX_BACKOFF = 2.0
_PRUNE_EVERY = 10.0  # seconds between sweeps of expired rows out of the index


@dataclass(frozen=True, slots=True)
class CacheKeys:
    """The Redis keys of one deployment's cache (prefix = RedisConfig.key_prefix)."""

    prefix: str

    @property
    def entry_prefix(self) -> str:
        return f"{self.prefix}cache:e:"

    def entry(self, entry_id: str) -> str:
        return f"{self.prefix}cache:e:{entry_id}"

    @property
    def lru(self) -> str:
        return f"{self.prefix}cache:lru"

    @property
    def events(self) -> str:
        return f"{self.prefix}cache:events"

    @property
    def seq(self) -> str:
        return f"{self.prefix}cache:seq"

    @property
    def entry_pattern(self) -> str:
        """A SCAN MATCH pattern for the entry keys (the prefix's glob characters escaped)."""
        escaped = "".join("\\" + char if char in "*?[]\\" else char for char in self.entry_prefix)
        return escaped + "*"


class _Gap(Exception):
    """Events were lost to this replica: the index must be rebuilt from the entries."""


async def _read_heads(client: redis.Redis, keys: list[bytes]) -> list[EntryHead | None]:
    """The heads of the entries at `keys` (None: gone or unreadable), reading only their first bytes."""
    async with client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.getrange(key, 0, HEAD_GUESS - 1)
        prefixes: list[bytes] = await pipe.execute()
    heads: list[EntryHead | None] = []
    for key, data in zip(keys, prefixes, strict=True):
        try:
            if not data:
                heads.append(None)
                continue
            needed = head_size(data)
            if needed > len(data):  # a long head (very long ids or a large vector): read exactly what it needs
                data = cast(bytes, await client.getrange(key, 0, needed - 1))
            heads.append(decode_head(data))
        except CodecError as exc:
            log.warning(
                "unreadable cache entry skipped", extra={"key": key.decode(errors="replace"), "error": str(exc)}
            )
            heads.append(None)
    return heads


class IndexFollower:
    """Owns `index`, this replica's copy of every entry's vector; `start()` loads it and follows the stream."""

    def __init__(self, url: str, keys: CacheKeys, *, ttl: float, timeout: float, block: float = 1.0) -> None:
        self.index = VectorIndex()
        self.keys = keys
        self.ttl = ttl
        self.errors = 0  # Redis failures seen by the follower
        self.rebuilds = 0
        self.last_id = "0-0"
        self.last_seq = 0
        self._healthy = False
        self._block_ms = max(1, int(block * 1000))
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=block + max(1.0, 4 * timeout),  # a blocking read legitimately waits `block`
            socket_connect_timeout=max(timeout, 0.5),
            retry=Retry(NoBackoff(), 0),  # the loop below retries, with backoff
        )
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._stale = True
        self._in_outage = False
        self._pruned = time.time()

    @property
    def healthy(self) -> bool:
        """Whether the index is loaded and the stream followed (False during a Redis outage or a rebuild)."""
        return self._healthy

    async def start(self) -> None:
        """Load the index now if Redis answers (a replica starts with the shared cache), then follow in the
        background; with Redis down, start anyway: the task keeps trying."""
        try:
            await self._rebuild()
        except (RedisError, OSError, TimeoutError) as exc:
            self._outage(exc)
        self._task = asyncio.create_task(self._run(), name="cache-index-follower")

    async def close(self) -> None:
        self._closing = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait((task,), timeout=0.2)
            if not task.done():
                # redis-py (8.x) sometimes loses a cancellation that lands during a blocking read (seen about one
                # close in five); closing the connections under it ends the read, and the loop sees `_closing`
                await self._client.connection_pool.disconnect(inuse_connections=True)
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self._client.aclose()

    async def _run(self) -> None:
        backoff = 0.05
        while not self._closing:
            try:
                if self._stale:
                    await self._rebuild()
                await self._follow()
                backoff = 0.05
            except (RedisError, OSError, TimeoutError) as exc:
                if self._closing:
                    return
                self._outage(exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)
            except _Gap as gap:
                log.warning("cache index fell behind the event stream; rebuilding", extra={"reason": str(gap)})
                self._stale = True
                self._healthy = False

    def _outage(self, exc: BaseException) -> None:
        self.errors += 1
        self._healthy = False
        self._stale = True  # events may be lost while away: rebuild on return
        if not self._in_outage:
            self._in_outage = True
            log.warning("cache index lost Redis; retrying", extra={"error": str(exc) or type(exc).__name__})

    async def _rebuild(self) -> None:
        keys = self.keys
        async with self._client.pipeline(transaction=True) as pipe:  # the counter and last id of one instant
            pipe.get(keys.seq)
            pipe.xrevrange(keys.events, "+", "-", count=1)
            seq, last = await pipe.execute()
        index = VectorIndex()
        now = time.time()
        cursor = 0
        while True:
            cursor, found = await self._client.scan(cursor, match=keys.entry_pattern, count=_BATCH)
            if found:
                for head in await _read_heads(self._client, cast(list[bytes], found)):
                    if head is not None and head.vector is not None and head.created + self.ttl > now:
                        expires = head.created + self.ttl
                        _add(index, head.id, head.scope, head.embedder, head.tenant, head.model, head.vector, expires)
            if cursor == 0:
                break
        self.index = index
        self.last_id = last[0][0].decode() if last else "0-0"
        self.last_seq = int(seq or 0)
        self.rebuilds += 1
        self._stale = False
        self._healthy = True
        if self._in_outage:
            self._in_outage = False
            log.warning("cache index back in sync with Redis", extra={"entries": len(index)})

    async def _follow(self) -> None:
        keys = self.keys
        reply: Any = await self._client.xread({keys.events: self.last_id}, count=_BATCH, block=self._block_ms)
        if not reply:
            await self._idle()
            return
        for _, events in reply:
            for event_id, fields in events:
                seq = int(fields.get(b"seq", 0))
                if seq != self.last_seq + 1:
                    raise _Gap(f"event {seq} follows event {self.last_seq}")
                self._apply(fields)
                self.last_id = event_id.decode()
                self.last_seq = seq

    async def _idle(self) -> None:
        """Nothing new for a whole block: check no events were trimmed unseen, and sweep expired rows."""
        now = time.time()
        if now - self._pruned > _PRUNE_EVERY:
            self._pruned = now
            self.index.prune(now)
        current = int(await self._client.get(self.keys.seq) or 0)
        if current < self.last_seq:
            raise _Gap("the event counter went back (Redis restarted or was flushed)")
        if current > self.last_seq and not await self._client.xrange(
            self.keys.events, f"({self.last_id}", "+", count=1
        ):
            raise _Gap(f"events up to {current} were trimmed before this replica read them")

    def _apply(self, fields: dict[bytes, bytes]) -> None:
        op = fields.get(b"op")
        index = self.index
        try:
            if op == b"add":
                entry_id = fields[b"id"].decode()
                vector = vector_from_bytes(fields[b"vector"])
                if vector is None:
                    index.remove(entry_id)
                    return
                scope, embedder = fields[b"scope"].decode(), fields[b"embedder"].decode()
                tenant, model = fields[b"tenant"].decode(), fields[b"model"].decode()
                _add(index, entry_id, scope, embedder, tenant, model, vector, float(fields[b"expires"]))
            elif op == b"del":
                for entry_id in fields[b"ids"].decode().split():
                    index.remove(entry_id)
            elif op == b"purge":
                only_tenant, only_model = fields.get(b"tenant"), fields.get(b"model")
                index.purge(
                    only_tenant.decode() if only_tenant is not None else None,
                    only_model.decode() if only_model is not None else None,
                )
            # any other op comes from a newer replica: skipped, as its writer's older peers must
        except (KeyError, ValueError, UnicodeDecodeError) as exc:
            log.warning("malformed cache event skipped", extra={"error": repr(exc)})


def _add(
    index: VectorIndex,
    entry_id: str,
    scope: str,
    embedder: str,
    tenant: str,
    model: str,
    vector: Vector,
    expires: float,
) -> None:
    try:
        index.add(entry_id, scope, embedder, tenant, model, vector, expires)
    except ValueError as exc:  # a vector of another dimension under the same embedder name: skip the entry
        log.warning("cache entry not indexed", extra={"id": entry_id, "error": str(exc)})
