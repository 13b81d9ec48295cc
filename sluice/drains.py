"""The drains in force: which backends get no new requests, and why (an alert's name, or "console").

A drained backend is healthy but left out of the routing index (`Backends.rebuild`); requests in flight
finish. A backend stays drained while any reason holds. A drain that would leave one of the backend's
models without a healthy, undrained backend is refused: draining must never turn a slow model into a
missing one.

Automatic repair (sluice/repair.py) and the console's drain buttons (sluice/admin_backends.py) both go
through here. A drain reaches the sibling workers of this replica at once (topic `drain` on
sluice/siblings.py: the console's next poll may land on any of them). With `redis.url` drains are also
kept in a hash shared by every replica, read every `repair.sync_interval`, so all of them act whichever
one was asked; without Redis they hold in this replica's workers, and a worker the supervisor restarts
learns them from its siblings before it listens (topic `drains-held`): they end when the whole replica
stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Literal

import redis.asyncio as redis

from sluice.siblings import Siblings
from sluice.upstream.backends import Backend, Backends

log = logging.getLogger("sluice.drains")
SEPARATOR = "|"
TOPIC = "drain"
HELD_TOPIC = "drains-held"
Outcome = Literal["done", "already", "refused_last_backend"]


class Drains:
    def __init__(
        self,
        backends: Backends,
        redis_url: str | None,
        prefix: str,
        sync_interval: float,
        siblings: Siblings | None = None,
    ) -> None:
        self._backends = backends
        self._siblings = siblings
        if siblings is not None:
            siblings.answers[TOPIC] = self._told
            siblings.answers[HELD_TOPIC] = self._held
        self._key = prefix + "drained"
        self._sync_interval = sync_interval
        self._client = (
            redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2) if redis_url else None
        )
        self._drains: set[tuple[str, str]] = set()  # (backend, reason) pairs in force
        self._task: asyncio.Task[None] | None = None

    @property
    def shared(self) -> bool:
        """Whether drains reach every replica (through Redis) rather than this replica's workers only."""
        return self._client is not None

    async def start(self) -> None:
        if self._client is not None:
            self._task = asyncio.create_task(self._follow(), name="drains-sync")  # Redis has them all
        elif self._siblings is not None:
            await self._catch_up()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    async def drain(self, backend: Backend, reason: str) -> Outcome:
        if (backend.name, reason) in self._drains:
            return "already"
        if not backend.drained_by and self.orphaned_by(backend):  # already drained: nothing changes for routing
            return "refused_last_backend"
        await self._store(backend.name, reason, True)
        self._drains.add((backend.name, reason))
        self.apply()
        await self._tell_siblings(backend.name, reason, True)
        return "done"

    async def undrain(self, backend: Backend, reason: str) -> Outcome:
        if (backend.name, reason) not in self._drains:
            return "already"
        await self._store(backend.name, reason, False)
        self._drains.discard((backend.name, reason))
        self.apply()
        await self._tell_siblings(backend.name, reason, False)
        return "done"

    def orphaned_by(self, backend: Backend) -> list[str]:
        """The models that would have no healthy, undrained backend left without `backend`."""
        others = [b for b in self._backends.all if b is not backend and b.healthy and not b.drained_by]
        return sorted(m for m in backend.models if not any(m in b.models for b in others))

    async def _store(self, backend: str, reason: str, drained: bool) -> None:
        if self._client is None:
            return
        field = f"{backend}{SEPARATOR}{reason}"
        try:
            if drained:
                await self._client.hset(self._key, field, "1")
            else:
                await self._client.hdel(self._key, field)
        except (redis.RedisError, OSError) as exc:
            log.warning("drain not shared with other replicas (Redis)", extra={"error": str(exc)})

    async def _tell_siblings(self, backend: str, reason: str, drained: bool) -> None:
        if self._siblings is not None:
            await self._siblings.ask(TOPIC, SEPARATOR.join((backend, reason, "1" if drained else "0")))

    def _told(self, argument: str) -> bytes:
        """A sibling's drain or undrain (`<backend>|<reason>|1` or `…|0`)."""
        parts = argument.rsplit(SEPARATOR, 2)
        if len(parts) == 3 and parts[0] and parts[1] and parts[2] in ("0", "1"):
            backend, reason, drained = parts
            (self._drains.add if drained == "1" else self._drains.discard)((backend, reason))
            self.apply()
        return b"ok"

    def _held(self, _: str) -> bytes:
        """The drains in force here, one `<backend>|<reason>` per line."""
        return "\n".join(SEPARATOR.join(pair) for pair in sorted(self._drains)).encode()

    async def _catch_up(self) -> None:
        """A restarted worker takes the drains its siblings hold (no Redis: nothing else kept them)."""
        assert self._siblings is not None
        for line in await self._siblings.ask_lines(HELD_TOPIC):
            backend, _, reason = line.partition(SEPARATOR)
            if backend and reason:
                self._drains.add((backend, reason))
        self.apply()

    def apply(self) -> None:
        """Mark each backend with the reasons draining it (also after a reload replaced backends)."""
        reasons: dict[str, set[str]] = {}
        for name, reason in self._drains:
            reasons.setdefault(name, set()).add(reason)
        changed = False
        for backend in self._backends.all:
            drained_by = frozenset(reasons.get(backend.name, ()))
            if drained_by != backend.drained_by:
                backend.drained_by = drained_by
                changed = True
        if changed:
            self._backends.rebuild()

    async def _follow(self) -> None:
        """Read the shared drains every sync interval (what another replica received counts here too)."""
        assert self._client is not None
        while True:
            with contextlib.suppress(redis.RedisError, OSError):  # keep the last known state meanwhile
                fields = await self._client.hkeys(self._key)
                pairs = (_text(field).partition(SEPARATOR) for field in fields)
                self._drains = {(backend, reason) for backend, _, reason in pairs if reason}
                self.apply()
            await asyncio.sleep(self._sync_interval)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
