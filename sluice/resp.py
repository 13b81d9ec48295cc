"""A lean Redis client for the hot path (rate limits, cache lookups): one pipelined connection, hiredis on both ends.

Why not redis-py on this path: it was measured at about 400 µs of client CPU per EVALSHA on this machine
(connection-pool checkout, command packing and reply parsing in Python, its retry machinery), against
about 45 µs for the network round trip itself; rate limiting runs on every request, so that alone
halved the gateway's throughput (docs/decisions/rate-limiting.md). Here every call is one `write` of a
command packed by hiredis (C) on a single connection, replies are parsed by hiredis's reader (C) as they
arrive and handed to the waiting futures in order, so concurrent requests share the connection without a
pool. Timeouts are one watchdog per connection, not a timer per call. Everything else that talks to
Redis (revocation pub/sub, the admin paths) uses redis-py.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import hiredis


class RespError(Exception):
    """Redis answered with an error (a script error, NOSCRIPT, a wrong password…)."""


class _Connection(asyncio.Protocol):
    def __init__(self, timeout: float) -> None:
        self._reader = hiredis.Reader()
        self._waiting: deque[tuple[asyncio.Future[Any], float]] = deque()
        self._timeout = timeout
        self._watchdog: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        waiting = self._waiting
        while True:
            reply = reader.gets()
            if reply is False:
                return
            if not waiting:  # a reply nobody asked for: the stream is out of step
                self._fail(ConnectionError("Redis sent an unexpected reply"))
                return
            future, _ = waiting.popleft()
            if future.done():
                continue
            if isinstance(reply, hiredis.ReplyError):
                future.set_exception(RespError(str(reply)))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError(f"Redis closed the connection ({exc or 'EOF'})"))

    def call(self, packed: bytes) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if self.closed or self.transport is None:
            future.set_exception(ConnectionError("the Redis connection is closed"))
            return future
        self.transport.write(packed)
        self._waiting.append((future, time.monotonic()))
        if self._watchdog is None:
            self._watchdog = loop.call_later(self._timeout / 2, self._watch)
        return future

    def _watch(self) -> None:
        """Every half timeout while calls are outstanding: give up on the connection if the oldest is late."""
        self._watchdog = None
        if not self._waiting or self.closed:
            return
        if time.monotonic() - self._waiting[0][1] > self._timeout:
            self._fail(TimeoutError(f"Redis did not answer within {self._timeout:g} s"))
            return
        self._watchdog = asyncio.get_running_loop().call_later(self._timeout / 2, self._watch)

    def _fail(self, error: Exception) -> None:
        self.closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self.transport is not None:
            self.transport.abort()
        while self._waiting:
            future, _ = self._waiting.popleft()
            if not future.done():
                future.set_exception(error)

    def close(self) -> None:
        self._fail(ConnectionError("the Redis client was closed"))


class RespClient:
    """`await client.call("EVALSHA", sha, 2, "k1", "k2", ...)` over one lazily (re)connected connection."""

    def __init__(self, url: str, timeout: float) -> None:
        parts = urlsplit(url)
        self._timeout = timeout
        self._unix = parts.path if parts.scheme == "unix" else None
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 6379
        self._ssl = ssl.create_default_context() if parts.scheme == "rediss" else None
        self._password = unquote(parts.password) if parts.password else None
        self._username = unquote(parts.username) if parts.username else None
        path = parts.path.strip("/") if parts.scheme != "unix" else ""
        self._db = int(path) if path.isdigit() else 0
        self._conn: _Connection | None = None
        self._connecting: asyncio.Future[_Connection] | None = None

    async def call(self, *args: str | bytes | int | float) -> Any:
        conn = self._conn
        if conn is None or conn.closed:
            conn = await self._connect()
        return await conn.call(hiredis.pack_command(cast(Any, args)))

    async def _connect(self) -> _Connection:
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.ensure_future(self._open())
        return await asyncio.shield(self._connecting)

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._timeout):
            if self._unix is not None:
                _, conn = await loop.create_unix_connection(lambda: _Connection(self._timeout), self._unix)
            else:
                _, conn = await loop.create_connection(
                    lambda: _Connection(self._timeout), self._host, self._port, ssl=self._ssl
                )
            if self._password is not None:
                login = (self._username, self._password) if self._username else (self._password,)
                await conn.call(hiredis.pack_command(cast(Any, ("AUTH", *login))))
            if self._db:
                await conn.call(hiredis.pack_command(cast(Any, ("SELECT", self._db))))
        self._conn = conn
        return conn

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
