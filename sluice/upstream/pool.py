"""A bounded pool of keep-alive connections to one backend.

Connections are reused most-recently-idle first and closed once idle longer than the backend's own
keep-alive (vLLM's uvicorn closes idle connections after 5 s; the default here is 4 s) — lazily when a
request looks for one, and by the Deadlines sweeper, so a burst's connections do not stay open after it.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import deque

from sluice.deadlines import Deadlines
from sluice.upstream.connection import UpstreamConnection


class ConnectFailure(Exception):
    """No TCP connection to the backend could be made in time."""


class ConnectionPool:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        connect_timeout: float,
        idle_timeout: float,
        max_idle: int,
        deadlines: Deadlines,
    ) -> None:
        self.deadlines = deadlines  # enforces the read timeouts of this pool's exchanges
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle
        self._idle: deque[UpstreamConnection] = deque()
        self._closed = False

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    def take_idle(self) -> UpstreamConnection | None:
        """A pooled keep-alive connection, most recently used first, or None (then `connect`).

        A reused connection may have been closed by the backend in the meantime; the caller retries on
        a fresh one when nothing at all came back.
        """
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if conn.closed:
                continue
            if now - conn.idle_since > self.idle_timeout:
                conn.close()
                continue
            return conn
        return None

    async def connect(self) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(lambda: UpstreamConnection(self), self.host, self.port)
        except TimeoutError:
            raise ConnectFailure(f"connect to {self.host}:{self.port} timed out") from None
        except OSError as exc:
            raise ConnectFailure(f"connect to {self.host}:{self.port} failed: {exc.strerror or exc}") from None
        sock = conn.transport.get_extra_info("socket") if conn.transport else None
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        if self._closed or len(self._idle) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)

    def check_deadline(self, now: float) -> None:
        """Called by the Deadlines sweeper: close connections idle past `idle_timeout`, oldest first.

        Idleness is kept in `time.monotonic()` rather than loop time, so it is read here afresh.
        """
        horizon = time.monotonic() - self.idle_timeout
        idle = self._idle
        while idle and (idle[0].closed or idle[0].idle_since < horizon):
            idle.popleft().close()

    def forget(self, conn: UpstreamConnection) -> None:
        # Idle connections the backend closed are skipped lazily by `take_idle`; trim them when many pile up.
        if len(self._idle) > 64 and conn in self._idle:
            self._idle.remove(conn)

    def close(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().close()
