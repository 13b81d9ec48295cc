"""The client-facing HTTP/1.1 connection: httptools parsing, keep-alive, pipelining, limits, timeouts.

One `HttpServerProtocol` per TCP connection. Requests are parsed by llhttp (via httptools), queued in
arrival order and answered one at a time by a per-connection task, so pipelined requests get their
responses in order. Protocol-level refusals (oversized headers or body, malformed HTTP or framing
that leaves the body's end in doubt, slow clients) are answered with an OpenAI-style error and the
connection is closed, so nothing the client sent after them is ever read as a request. When the client goes away the
task is cancelled, which is how a disconnect reaches the upstream request.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

import httptools

from sluice.deadlines import Deadlines
from sluice.errors import (
    GatewayError,
    HeadersTooLarge,
    InvalidRequest,
    PayloadTooLarge,
    RequestTimeout,
)
from sluice.http.request import HttpRequest
from sluice.http.response import ResponseWriter

Handler = Callable[[HttpRequest, ResponseWriter], Awaitable[None]]
MAX_PIPELINED = 16
LINGER_SECONDS = 2.0
NO_HEAD, HEAD_BEGAN = -1, -2  # `_head_bytes` when no request head is arriving / one began in the latest read


@dataclass(frozen=True, slots=True)
class ServerSettings:
    max_body_bytes: int
    max_header_bytes: int
    header_timeout: float
    body_timeout: float
    keepalive_timeout: float


class Refusal:
    """A request refused while parsing; answered in its turn, then the connection closes."""

    __slots__ = ("error",)

    def __init__(self, error: GatewayError) -> None:
        self.error = error


class RequestIds:
    """Cheap unique request ids: a random per-process prefix and a counter."""

    __slots__ = ("_count", "_prefix")

    def __init__(self) -> None:
        self._prefix = os.urandom(6).hex()
        self._count = 0

    def next(self) -> bytes:
        self._count += 1
        return b"%s%08x" % (self._prefix.encode(), self._count)


class HttpServerProtocol(asyncio.Protocol):
    def __init__(
        self,
        handler: Handler,
        settings: ServerSettings,
        ids: RequestIds,
        deadlines: Deadlines,
        connections: set[HttpServerProtocol],
    ) -> None:
        self._handler = handler
        self._connections = connections
        self._deadlines = deadlines
        self._settings = settings
        self._ids = ids
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._client_ip = ""
        self._queue: deque[HttpRequest | Refusal] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self.deadline = 0.0  # loop time when `_on_deadline` runs; checked by the Deadlines sweeper
        self._on_deadline: Callable[[], None] | None = None
        self._stopped = False  # no more requests are read from this connection
        self._draining = False  # finish what was received, then close
        self._reading_paused = False
        self._writing_paused = False
        self._lingering = False
        self.writer: ResponseWriter | None = None
        self.closed = False
        self._reset_message()

    def _reset_message(self) -> None:
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self._body: list[bytes] = []
        self._body_size = 0
        self._refused: GatewayError | None = None
        self._head_bytes = NO_HEAD  # else bytes of the head read after the read it began in

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self._client_ip = peer[0] if isinstance(peer, tuple) else ""
        self._deadlines.add(self)
        self._connections.add(self)
        self._arm(self._settings.keepalive_timeout, self._idle_timeout)
        self._task = self._loop.create_task(self._serve())

    def data_received(self, data: bytes) -> None:
        if self._stopped:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(InvalidRequest("Protocol upgrades are not supported by this endpoint."))
        except httptools.HttpParserError as exc:  # llhttp's reason is a fixed text, never the client's bytes
            self._refuse(InvalidRequest(f"Malformed HTTP request ({exc}); the connection is closed."))
        else:
            if self._head_bytes != NO_HEAD:
                self._count_head(len(data))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._stopped = True
        self._disarm()
        self._deadlines.discard(self)
        self._connections.discard(self)
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def pause_writing(self) -> None:
        self._writing_paused = True
        if self.writer is not None and self.writer.flow is not None:
            self.writer.flow.pause_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self.writer is not None and self.writer.flow is not None:
            self.writer.flow.resume_reading()

    def eof_received(self) -> bool | None:
        # A client that stops sending has gone, as nginx and uvicorn treat it: closing the transport
        # cancels the request in hand, which aborts its upstream request and frees vLLM's KV cache.
        return False

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._reset_message()
        self._head_bytes = HEAD_BEGAN
        self._arm(self._settings.header_timeout, self._slow_client)

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._header_bytes += len(url)
        if self._header_bytes > self._settings.max_header_bytes:
            self._headers_too_large()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > self._settings.max_header_bytes:
            self._headers_too_large()
        if self._refused is None:
            self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self._head_bytes = NO_HEAD
        if self._refused is not None:
            self._refuse(self._refused)
            return
        length = self._content_length()
        if length is not None and length > self._settings.max_body_bytes:
            self._refuse(self._too_large())
            return
        if length is None and not self._framing_sound():
            self._refuse(InvalidRequest(
                "Transfer-Encoding must be exactly 'chunked' (and HTTP/1.1); send the body with Content-Length "
                "or chunked. The connection is closed."
            ))  # fmt: skip
            return
        self._arm(self._settings.body_timeout, self._slow_client)
        expect = self._header(b"expect")
        if expect is not None and expect.lower() == b"100-continue" and self.writer is None and not self._queue:
            self._write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self._settings.max_body_bytes:
            self._refuse(self._too_large())
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._stopped:
            return
        self._disarm()
        parser = self._parser
        url = httptools.parse_url(self._url)
        http11 = parser.get_http_version() == "1.1"
        self._queue.append(
            HttpRequest(
                method=parser.get_method().decode("ascii", "replace"),
                path=url.path.decode("latin-1"),
                query=url.query.decode("latin-1") if url.query else "",
                headers=self._headers,
                body=b"".join(self._body) if len(self._body) != 1 else self._body[0],
                keep_alive=parser.should_keep_alive(),
                http11=http11,
                client_ip=self._client_ip,
            )
        )
        self._body = []
        if len(self._queue) >= MAX_PIPELINED and not self._reading_paused and self._transport is not None:
            self._reading_paused = True
            self._transport.pause_reading()
        self._wake()

    # the per-connection task

    async def _serve(self) -> None:
        try:
            while True:
                if not self._queue:
                    if self._stopped:
                        break
                    self._waiter = self._loop.create_future()
                    await self._waiter
                    continue
                item = self._queue.popleft()
                if self._reading_paused and len(self._queue) < MAX_PIPELINED // 2 and self._transport:
                    self._reading_paused = False
                    self._transport.resume_reading()
                if isinstance(item, Refusal):
                    self._send_refusal(item.error)
                    break
                keep_alive = item.keep_alive and not self._draining and not (self._stopped and not self._queue)
                writer = ResponseWriter(self, self._request_id(item), keep_alive, item.http11)
                self.writer = writer
                await self._handler(item, writer)
                self.writer = None
                if not writer.keep_alive or self.closed or (self._draining and not self._queue):
                    break
                if not self._queue and not self._stopped:
                    self._arm(self._settings.keepalive_timeout, self._idle_timeout)
        except asyncio.CancelledError:
            pass
        finally:
            if not self._lingering:
                self._close()

    def _request_id(self, request: HttpRequest) -> bytes:
        given = request.header(b"x-request-id")
        if given is not None and 0 < len(given) <= 128 and given.isascii() and given.replace(b"-", b"").isalnum():
            return given
        return self._ids.next()

    # helpers

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _refuse(self, error: GatewayError) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._disarm()
        self._queue.append(Refusal(error))
        if self._transport is not None:
            self._transport.pause_reading()
        self._wake()

    def _send_refusal(self, error: GatewayError) -> None:
        writer = ResponseWriter(self, self._ids.next(), keep_alive=False, http11=True)
        writer.send(error.status, error.body(), headers=error.headers)
        # Lingering close: stop writing but keep draining what the client still sends for a moment, so
        # that closing with unread data (an RST) cannot destroy the error response before it is read.
        transport = self._transport
        if transport is not None and not self.closed and transport.can_write_eof():
            self._lingering = True
            transport.write_eof()
            transport.resume_reading()
            self._arm(LINGER_SECONDS, self._close)

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"Request body exceeds the limit of {self._settings.max_body_bytes} bytes "
            "(limits.max_body_bytes); send a smaller request."
        )

    def _headers_too_large(self) -> None:
        if self._refused is None:
            self._refused = self._head_too_large()
            self._headers = []

    def _head_too_large(self) -> HeadersTooLarge:
        return HeadersTooLarge(
            f"Request line and headers exceed {self._settings.max_header_bytes} bytes (limits.max_header_bytes)."
        )

    def _count_head(self, size: int) -> None:
        """Bound the head as it arrives: llhttp holds a header line back until it ends, so a line that never
        ends would grow without limit before `on_header` could count it."""
        if self._head_bytes == HEAD_BEGAN:  # not counted: part of that read may be an earlier pipelined request
            self._head_bytes = 0
            return
        self._head_bytes += size
        if self._head_bytes > self._settings.max_header_bytes:
            self._refuse(self._head_too_large())

    def _content_length(self) -> int | None:
        value = self._header(b"content-length")
        if value is None:
            return None
        try:
            return int(value)
        except ValueError:
            return None

    def _framing_sound(self) -> bool:
        """False when Transfer-Encoding leaves the body's end in doubt: a coding other than plain `chunked`
        (which the gateway would have to decode or guess), or any coding on HTTP/1.0 (RFC 9112 §6.1, §6.3).
        llhttp already refuses Content-Length together with Transfer-Encoding, and repeated codings."""
        coding = self._header(b"transfer-encoding")
        if coding is None:
            return True
        return coding.strip().lower() == b"chunked" and self._parser.get_http_version() != "1.0"

    def _header(self, name: bytes) -> bytes | None:
        for key, value in self._headers:
            if key == name:
                return value
        return None

    def _slow_client(self) -> None:
        self._refuse(RequestTimeout("The client sent the request too slowly."))

    def drain(self) -> asyncio.Task[None] | None:
        """Graceful shutdown: answer what was received (saying `connection: close`), then close.

        Returns the connection's task to wait for, or None when it was idle and is closed already.
        """
        self._draining = True
        if not self._queue and self.writer is None:
            self._stopped = True
            self._close()
            return None
        return self._task

    def _idle_timeout(self) -> None:
        if not self._queue and self.writer is None:
            self._stopped = True
            self._close()

    def _arm(self, delay: float, callback: Callable[[], None]) -> None:
        # No timer per request: the server's Deadlines sweeper looks at `deadline` a few times a second.
        self.deadline = self._loop.time() + delay
        self._on_deadline = callback

    def _disarm(self) -> None:
        self._on_deadline = None

    def check_deadline(self, now: float) -> None:
        """Called by the sweeper: run the armed timeout if its time has come."""
        action = self._on_deadline
        if action is not None and now >= self.deadline:
            self._on_deadline = None
            action()

    def _close(self) -> None:
        self._disarm()
        self._stopped = True
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    # the Connection protocol used by ResponseWriter

    @property
    def writing_paused(self) -> bool:
        return self._writing_paused

    def _write(self, data: bytes) -> None:
        if self._transport is not None and not self.closed:
            self._transport.write(data)

    def write(self, data: bytes) -> None:
        self._write(data)

    def writelines(self, data: list[bytes]) -> None:
        if self._transport is not None and not self.closed:
            self._transport.writelines(data)
