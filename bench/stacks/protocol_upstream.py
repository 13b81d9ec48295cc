"""Upstream side of the protocol-level stack: keep-alive connections parsed with httptools, and a pool.

A connection relays each response to a ``ResponseSink`` as it is parsed (head, then body pieces), so the
same path serves whole JSON bodies and SSE streams without buffering either.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import httptools

from bench.stacks.hotpath import CHAT_PATH, JSON_TYPE

IDLE_LIMIT = 256


class ResponseSink(Protocol):
    """Receives an upstream response as it is parsed."""

    def head(self, status: int, content_type: bytes, length: int | None) -> None: ...

    def body(self, data: bytes) -> None: ...

    def done(self) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection to the upstream; one exchange at a time."""

    def __init__(self, host_header: bytes) -> None:
        self._host = host_header
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._sink: ResponseSink | None = None
        self._finished: asyncio.Future[bool] | None = None
        self._content_type = JSON_TYPE.encode()
        self._length: int | None = None
        self.usable = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self.usable = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.usable = False
        if self._finished is not None and not self._finished.done():
            self._finished.set_exception(ConnectionError("upstream closed the connection"))

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.usable = False
            if self._finished is not None and not self._finished.done():
                self._finished.set_exception(ConnectionError(f"bad upstream response: {exc}"))
            self.abort()

    def exchange(self, body: bytes, sink: ResponseSink) -> asyncio.Future[bool]:
        """Send a chat request; the future resolves to whether the connection may be reused."""
        assert self._transport is not None
        self._sink = sink
        self._finished = asyncio.get_running_loop().create_future()
        self._content_type = JSON_TYPE.encode()
        self._length = None
        self._transport.write(
            b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (CHAT_PATH.encode(), self._host, len(body), body)
        )
        return self._finished

    def abort(self) -> None:
        self.usable = False
        if self._transport is not None:
            self._transport.abort()

    def on_header(self, name: bytes, value: bytes) -> None:
        lower = name.lower()
        if lower == b"content-type":
            self._content_type = value
        elif lower == b"content-length":
            self._length = int(value)

    def on_headers_complete(self) -> None:
        if self._sink is not None:
            self._sink.head(self._parser.get_status_code(), self._content_type, self._length)

    def on_body(self, data: bytes) -> None:
        if self._sink is not None:
            self._sink.body(data)

    def on_message_complete(self) -> None:
        sink, self._sink = self._sink, None
        if sink is not None:
            sink.done()
        if self._finished is not None and not self._finished.done():
            self._finished.set_result(self._parser.should_keep_alive())


class UpstreamPool:
    """Idle keep-alive connections to one upstream, reused last-in first-out."""

    def __init__(self, host: str, port: int) -> None:
        self._host = host
        self._port = port
        self._host_header = f"{host}:{port}".encode()
        self._idle: list[UpstreamConnection] = []

    async def acquire(self) -> UpstreamConnection:
        while self._idle:
            conn = self._idle.pop()
            if conn.usable:
                return conn
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: UpstreamConnection(self._host_header), self._host, self._port)
        return conn

    def release(self, conn: UpstreamConnection, reusable: bool) -> None:
        if reusable and conn.usable and len(self._idle) < IDLE_LIMIT:
            self._idle.append(conn)
        else:
            conn.abort()

    def close(self) -> None:
        for conn in self._idle:
            conn.abort()
        self._idle.clear()
