"""One keep-alive HTTP/1.1 connection to a backend, parsed with httptools, and the exchange on it.

An `Exchange` is one request/response on a connection. Its body is either collected (non-streaming
answers, small JSON) or handed to a `sink` callback the moment each piece arrives (SSE streams), so a
stream is relayed from inside `data_received` without a queue or a task switch. A read timeout fires
when the backend stays silent for longer than allowed between two reads, as nginx's proxy_read_timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import httptools

if TYPE_CHECKING:
    from sluice.upstream.pool import ConnectionPool


class UpstreamFailure(Exception):
    """The exchange with the backend failed; `retryable_on_fresh` if nothing at all came back."""

    def __init__(self, message: str, *, nothing_received: bool) -> None:
        super().__init__(message)
        self.nothing_received = nothing_received


class UpstreamTimeoutFailure(UpstreamFailure):
    pass


class Exchange:
    __slots__ = (
        "_timeout",
        "body",
        "conn",
        "done",
        "ended",
        "error",
        "headers_ready",
        "last_activity",
        "received_any",
        "sink",
        "status",
    )

    def __init__(self, conn: UpstreamConnection, timeout: float, want_headers: bool) -> None:
        loop = conn.loop
        self.conn = conn
        self.status = 0
        self.body: list[bytes] = []
        self.sink: Callable[[bytes], None] | None = None
        # Streams wait for the headers; whole answers wait for `done` only, and pay for one future.
        self.headers_ready: asyncio.Future[None] | None = loop.create_future() if want_headers else None
        self.done: asyncio.Future[None] = loop.create_future()
        self.error: UpstreamFailure | None = None
        self.ended = False  # finished or failed; unlike `done.done()`, not set by a cancelled waiter
        self.received_any = False
        self.last_activity = loop.time()
        self._timeout = timeout
        conn.pool.deadlines.add(self)

    def set_timeout(self, timeout: float) -> None:
        """Change the allowed silence between two reads (streams get their own once they start)."""
        self._timeout = timeout

    def check_deadline(self, now: float) -> None:
        if now - self.last_activity < self._timeout:
            return
        self.fail(
            UpstreamTimeoutFailure(
                f"no data from the backend for {self._timeout:g} s", nothing_received=not self.received_any
            )
        )
        self.conn.abort()

    def fail(self, error: UpstreamFailure) -> None:
        if self.ended:
            return
        self.ended = True
        self.error = error
        self.conn.pool.deadlines.discard(self)
        for future in (self.headers_ready, self.done):
            if future is not None and not future.done():
                future.set_exception(error)
                future.exception()  # retrieved here so an unawaited failure is not logged

    def finish(self) -> None:
        if self.ended:
            return
        self.ended = True
        self.conn.pool.deadlines.discard(self)
        if not self.done.done():
            self.done.set_result(None)


class UpstreamConnection(asyncio.Protocol):
    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.exchange: Exchange | None = None
        self.closed = False
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._keep_alive = True

    def send(self, data: list[bytes], timeout: float, want_headers: bool) -> Exchange:
        exchange = Exchange(self, timeout, want_headers)
        self.exchange = exchange
        assert self.transport is not None
        self.transport.writelines(data)
        return exchange

    def abort(self) -> None:
        """Drop the connection at once: the backend sees the client go and stops generating."""
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    # flow control, driven by the client connection of a relayed stream

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            self.abort()  # a backend talking out of turn cannot be trusted with the next request
            return
        exchange.received_any = True
        exchange.last_activity = self.loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            exchange.fail(UpstreamFailure(f"malformed HTTP from the backend: {exc}", nothing_received=False))
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        exchange = self.exchange
        if exchange is not None:
            self.exchange = None
            exchange.fail(
                UpstreamFailure("the backend closed the connection", nothing_received=not exchange.received_any)
            )
        self.pool.forget(self)

    # httptools callbacks

    def on_headers_complete(self) -> None:
        exchange = self.exchange
        if exchange is None:
            return
        exchange.status = self._parser.get_status_code()
        self._keep_alive = self._parser.should_keep_alive()
        ready = exchange.headers_ready
        if ready is not None and not ready.done():
            ready.set_result(None)

    def on_body(self, body: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            return
        if exchange.sink is not None:
            exchange.sink(body)
        else:
            exchange.body.append(body)

    def on_message_complete(self) -> None:
        exchange = self.exchange
        if exchange is None:
            return
        self.exchange = None
        exchange.finish()
        if self._keep_alive and not self.closed:
            self.pool.release(self)
        else:
            self.close()
