"""Writes one HTTP/1.1 response to the client: complete bodies, or chunked streams without buffering."""

from __future__ import annotations

from collections.abc import Iterable
from http import HTTPStatus
from typing import Protocol

STATUS_LINES: dict[int, bytes] = {
    s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus
}
# Sent on every response: the gateway only ever serves JSON and SSE to API clients.
FIXED_HEADERS = b"x-content-type-options: nosniff\r\n"
JSON = b"application/json"
Headers = Iterable[tuple[str, str]]


class Connection(Protocol):
    """What a response writer needs from the client connection."""

    def write(self, data: bytes) -> None: ...

    def writelines(self, data: list[bytes]) -> None: ...

    @property
    def closed(self) -> bool: ...

    @property
    def writing_paused(self) -> bool: ...


class FlowListener(Protocol):
    """Told when the client cannot take more data, so the producer (the upstream) stops reading."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class ResponseWriter:
    """The response to one request. `send` writes a whole response; `start`/`write`/`end` stream one."""

    __slots__ = (
        "body_bytes",
        "chunked",
        "conn",
        "extra",
        "finished",
        "flow",
        "http11",
        "keep_alive",
        "request_id",
        "started",
        "status",
    )

    def __init__(self, conn: Connection, request_id: bytes, keep_alive: bool, http11: bool) -> None:
        self.conn = conn
        self.request_id = request_id
        self.keep_alive = keep_alive
        self.http11 = http11
        self.started = False
        self.finished = False
        self.chunked = False
        self.status = 0
        self.body_bytes = 0
        self.flow: FlowListener | None = None
        self.extra = b""  # header lines added to whatever response is sent (e.g. x-ratelimit-*)

    def _head(self, status: int, content_type: bytes, extra: Headers, length: int | None) -> bytes:
        parts = [
            STATUS_LINES.get(status) or f"HTTP/1.1 {status} Unknown\r\n".encode(),
            b"content-type: ", content_type, b"\r\nx-request-id: ", self.request_id, b"\r\n", FIXED_HEADERS,
        ]
        for name, value in extra:
            parts.append(f"{name}: {value}\r\n".encode("latin-1"))
        if self.extra:
            parts.append(self.extra)
        if length is not None and status != 204:  # a 204 has no body and must not say so (RFC 9110 §8.6)
            parts.append(b"content-length: %d\r\n" % length)
        elif self.chunked:
            parts.append(b"transfer-encoding: chunked\r\n")
        if not self.keep_alive:
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def send(self, status: int, body: bytes, content_type: bytes = JSON, headers: Headers = ()) -> None:
        """Write a complete response."""
        self.started = self.finished = True
        self.status = status
        self.body_bytes = len(body)
        self.conn.writelines([self._head(status, content_type, headers, len(body)), body])

    def start(self, status: int, content_type: bytes, headers: Headers = ()) -> None:
        """Begin a streamed response of unknown length (chunked; HTTP/1.0 clients get close-delimited)."""
        self.started = True
        self.status = status
        self.chunked = self.http11
        if not self.http11:
            self.keep_alive = False
        self.conn.write(self._head(status, content_type, headers, None))

    def set_flow(self, listener: FlowListener | None) -> None:
        """Route the client's flow control to `listener` (pausing it now if the client is already full)."""
        self.flow = listener
        if listener is not None and self.conn.writing_paused:
            listener.pause_reading()

    def write(self, data: bytes) -> None:
        if not data or self.finished:
            return
        self.body_bytes += len(data)
        if self.chunked:
            self.conn.writelines([b"%x\r\n" % len(data), data, b"\r\n"])
        else:
            self.conn.write(data)

    def end(self) -> None:
        if self.finished:
            return
        self.finished = True
        if self.chunked:
            self.conn.write(b"0\r\n\r\n")
