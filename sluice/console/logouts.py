"""Console sessions ended by logging out: refused everywhere until they would have expired anyway.

A session token is stateless (sluice/console/session.py), so a logout must be remembered. Each token
carries a random id, and `POST /console/logout` records that id until the token's expiry: in this
process at once, in the sibling workers (topic `console-logout` on sluice/siblings.py, before the
logout answers), and with `redis.url` in Redis (`<redis.key_prefix>console:logout:<id>`, expiring with
the token) for every other replica. A console request checks this process's record, then Redis.

When Redis cannot be reached, the check answers from this process's record alone (logged at most once a
minute): a session logged out on another replica is accepted until Redis answers again. The console
stays usable during the outage, when an operator needs it most; the admin key itself (bearer) is not
affected, and rotating `auth.admin_key` still ends every session at once. Without `redis.url`, a logout
reaches this replica's workers only. A worker the supervisor restarts asks its siblings for the logouts
they hold before it listens (topic `console-logouts-held`), so a restart forgets none.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import redis.asyncio as redis

from sluice.console.session import Session
from sluice.siblings import Siblings

log = logging.getLogger("sluice.console")
TOPIC = "console-logout"
HELD_TOPIC = "console-logouts-held"
WARN_EVERY = 60.0


class Logouts:
    def __init__(
        self,
        redis_url: str | None,
        key_prefix: str,
        timeout: float,
        siblings: Siblings | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._prefix = key_prefix + "console:logout:"
        self._client = (
            redis.Redis.from_url(redis_url, socket_timeout=timeout, socket_connect_timeout=timeout)
            if redis_url
            else None
        )
        self._siblings = siblings
        self._clock = clock
        self._ended: dict[str, float] = {}  # session id -> its expiry
        self._warned_at = -WARN_EVERY
        if siblings is not None:
            siblings.answers[TOPIC] = self._told
            siblings.answers[HELD_TOPIC] = self._held

    @property
    def shared(self) -> bool:
        """Whether logouts reach other replicas (through Redis), so a check must ask there too."""
        return self._client is not None

    async def start(self) -> None:
        """Take the logouts the sibling workers hold (this worker may be a restarted one)."""
        if self._siblings is not None:
            for line in await self._siblings.ask_lines(HELD_TOPIC):
                self._told(line)

    def ended_here(self, session: Session) -> bool:
        """Whether this process knows `session` was logged out (no I/O)."""
        return session.id in self._ended

    async def ended(self, session: Session) -> bool:
        """Whether `session` was logged out here, in a sibling worker or on any replica sharing Redis."""
        if session.id in self._ended:
            return True
        if self._client is None:
            return False
        try:
            found = await self._client.exists(self._prefix + session.id)
        except (redis.RedisError, OSError) as exc:
            self._warn("console logouts: Redis did not answer; checking this replica's logouts only", exc)
            return False
        if found:
            self._remember(session.id, session.expires)
        return bool(found)

    async def record(self, session: Session) -> None:
        """End `session`: here at once, then in the sibling workers and in Redis."""
        self._remember(session.id, session.expires)
        if self._siblings is not None:
            await self._siblings.ask(TOPIC, f"{session.id}:{session.expires}")
        if self._client is not None:
            try:
                await self._client.set(self._prefix + session.id, b"1", exat=session.expires)
            except (redis.RedisError, OSError) as exc:
                self._warn("console logout not shared: Redis did not answer; other replicas accept the session", exc)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    def _told(self, argument: str) -> bytes:
        """A sibling's logout (`<id>:<expiry>`)."""
        session_id, _, expires = argument.partition(":")
        if session_id and expires.isdigit():
            self._remember(session_id, int(expires))
        return b"ok"

    def _held(self, _: str) -> bytes:
        """The logouts this worker holds, one `<id>:<expiry>` per line."""
        return "\n".join(f"{session_id}:{int(until)}" for session_id, until in self._ended.items()).encode()

    def _remember(self, session_id: str, expires: float) -> None:
        now = self._clock()
        for known, until in list(self._ended.items()):  # logouts are rare: the record stays small
            if until <= now:
                del self._ended[known]
        if expires > now:
            self._ended[session_id] = expires

    def _warn(self, message: str, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY:
            self._warned_at = now
            log.warning(message, extra={"error": str(exc)})
