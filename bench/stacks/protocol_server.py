"""Client side of the protocol-level stack: an asyncio ``Protocol`` per connection, parsed with httptools.

Requests are queued in arrival order and answered one at a time by a per-connection task (so pipelined
requests are answered in order); upstream responses are relayed as they are parsed, re-framed with
``Content-Length`` or chunked encoding. Deliberately minimal: no flow control towards slow clients and no
limits — the real gateway (``sluice/http``) has those; this file measures the stack's ceiling.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from http import HTTPStatus

import httptools

from bench.stacks.hotpath import BAD_GATEWAY, BAD_REQUEST, CHAT_PATH, NOT_FOUND, UNAUTHORIZED, bearer_ok, parse_chat
from bench.stacks.protocol_upstream import UpstreamConnection, UpstreamPool

_CHAT_URL = CHAT_PATH.encode()


@dataclass(frozen=True, slots=True)
class _Request:
    method: bytes
    url: bytes
    auth: bytes | None
    body: bytes
    keep_alive: bool


def _head(status: int, content_type: bytes, framing: bytes, keep_alive: bool) -> bytes:
    try:
        reason = HTTPStatus(status).phrase.encode()
    except ValueError:
        reason = b"Unknown"
    connection = b"" if keep_alive else b"Connection: close\r\n"
    return b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\n%s%s\r\n" % (status, reason, content_type, framing, connection)


class _Relay:
    """Writes one upstream response to the client as it arrives."""

    __slots__ = ("_chunked", "_keep_alive", "_transport", "started")

    def __init__(self, transport: asyncio.Transport, keep_alive: bool) -> None:
        self._transport = transport
        self._keep_alive = keep_alive
        self._chunked = False
        self.started = False

    def head(self, status: int, content_type: bytes, length: int | None) -> None:
        self.started = True
        self._chunked = length is None
        framing = b"Transfer-Encoding: chunked\r\n" if length is None else b"Content-Length: %d\r\n" % length
        self._transport.write(_head(status, content_type, framing, self._keep_alive))

    def body(self, data: bytes) -> None:
        self._transport.write(b"%x\r\n%s\r\n" % (len(data), data) if self._chunked else data)

    def done(self) -> None:
        if self._chunked:
            self._transport.write(b"0\r\n\r\n")


class ProxyProtocol(asyncio.Protocol):
    """One client connection."""

    def __init__(self, pool: UpstreamPool, keys: frozenset[bytes]) -> None:
        self._pool = pool
        self._keys = keys
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._queue: deque[_Request] = deque()
        self._task: asyncio.Task[None] | None = None
        self._upstream: UpstreamConnection | None = None
        self._url = b""
        self._auth: bytes | None = None
        self._body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._upstream is not None:
            self._upstream.abort()
        if self._task is not None:
            self._task.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            if self._transport is not None:
                self._transport.write(
                    _head(400, b"application/json", b"Content-Length: %d\r\n" % len(BAD_REQUEST), False) + BAD_REQUEST
                )
                self._transport.close()

    def on_message_begin(self) -> None:
        self._url, self._auth, self._body = b"", None, []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"authorization":
            self._auth = value

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._queue.append(
            _Request(
                self._parser.get_method(), self._url, self._auth, b"".join(self._body), self._parser.should_keep_alive()
            )
        )
        if self._task is None:
            self._task = self._loop.create_task(self._drain())

    async def _drain(self) -> None:
        while self._queue and self._transport is not None:
            request = self._queue.popleft()
            await self._answer(request)
            if not request.keep_alive and self._transport is not None:
                self._transport.close()
        self._task = None

    def _local(self, status: int, body: bytes, keep_alive: bool) -> None:
        if self._transport is not None:
            head = _head(status, b"application/json", b"Content-Length: %d\r\n" % len(body), keep_alive)
            self._transport.write(head + body)

    async def _answer(self, request: _Request) -> None:
        if request.url != _CHAT_URL or request.method != b"POST":
            self._local(404, NOT_FOUND, request.keep_alive)
            return
        if not bearer_ok(request.auth, self._keys):
            self._local(401, UNAUTHORIZED, request.keep_alive)
            return
        if parse_chat(request.body) is None:
            self._local(400, BAD_REQUEST, request.keep_alive)
            return
        assert self._transport is not None
        relay = _Relay(self._transport, request.keep_alive)
        try:
            conn = await self._pool.acquire()
        except OSError:
            self._local(502, BAD_GATEWAY, request.keep_alive)
            return
        self._upstream = conn
        try:
            reusable = await conn.exchange(request.body, relay)
        except ConnectionError:
            reusable = False
            if not relay.started:
                self._local(502, BAD_GATEWAY, request.keep_alive)
            elif self._transport is not None:
                self._transport.close()
        finally:
            self._upstream = None
        self._pool.release(conn, reusable)
