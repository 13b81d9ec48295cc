"""Tells every gateway replica at once that a managed key was revoked or rotated (Redis pub/sub).

Replicas cache key lookups for `auth.key_cache_ttl` seconds; a revocation published here makes each
subscriber drop its cached entry for that key immediately, so a revoked key stops working everywhere
within a second instead of at the end of the cache TTL. The admin API also tells the sibling workers of
its replica at once (`REVOKED_TOPIC` on sluice/siblings.py), with or without Redis; without Redis other
replicas and `sluice keys revoke` take effect within the TTL. A lost connection is retried every second;
while it is down, the TTL is the bound.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import redis.asyncio as redis

log = logging.getLogger("sluice.revocations")
CHANNEL = "sluice:keys:revoked"
REVOKED_TOPIC = "key-revoked"  # between the workers of one replica (sluice/siblings.py)


async def publish_revocation(url: str, key_id: str) -> int:
    """Announce that `key_id` changed; returns how many replicas heard it."""
    client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    try:
        return int(await client.publish(CHANNEL, key_id))
    finally:
        await client.aclose()


class RevocationFeed:
    def __init__(self, url: str, on_revoked: Callable[[str], None]) -> None:
        self._url = url
        self._on_revoked = on_revoked
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="key-revocations")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def publish(self, key_id: str) -> None:
        try:
            await publish_revocation(self._url, key_id)
        except (redis.RedisError, OSError) as exc:
            log.warning("revocation not broadcast", extra={"key_id": key_id, "error": str(exc)})

    async def _listen(self) -> None:
        while True:
            client = redis.Redis.from_url(self._url, socket_connect_timeout=2)
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(CHANNEL)
                    self.connected.set()
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            data = message["data"]
                            self._on_revoked(data.decode() if isinstance(data, bytes) else str(data))
            except (redis.RedisError, OSError) as exc:
                self.connected.clear()
                log.warning("revocation feed lost; retrying", extra={"error": str(exc)})
            finally:
                await client.aclose()
            await asyncio.sleep(1.0)
