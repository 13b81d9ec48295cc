"""Relays an SSE stream from the backend to the client as it arrives, event by event.

Runs inside the upstream connection's `data_received`: complete events are written to the client at
once, in their original bytes. Only events mentioning `usage` are decoded, to capture the usage chunk
(and drop it when the client did not ask for it). The timing of content events gives the time to first
token and the mean time per output token. For callers whose key logs bodies, the events sent are also
kept, up to a cap, for the audit log (`ctx.capture`); when the answer may be cached, everything the
backend sent is kept too (`ctx.cache_capture`, up to `MAX_CACHE_CAPTURE`), usage chunk included.
"""

from __future__ import annotations

import time

import orjson

from sluice.context import RequestContext
from sluice.errors import render_error
from sluice.http.response import ResponseWriter
from sluice.sse import EventSplitter, data_event

DONE = b"data: [DONE]"
MAX_CACHE_CAPTURE = 4 * 1024 * 1024  # past this a stream is not kept for the cache (cache.max_entry_bytes decides)


class StreamRelay:
    __slots__ = (
        "_capture",
        "_capture_cap",
        "_ctx",
        "_first_token_at",
        "_last_token_at",
        "_splitter",
        "_strip_usage",
        "_writer",
        "saw_done",
        "tokens",
    )

    def __init__(self, ctx: RequestContext, writer: ResponseWriter, capture_cap: int = 0) -> None:
        self._ctx = ctx
        self._capture = ctx.capture
        self._capture_cap = capture_cap
        self._writer = writer
        self._strip_usage = not ctx.include_usage
        self._splitter = EventSplitter()
        self._first_token_at = 0.0
        self._last_token_at = 0.0
        self.tokens = 0
        self.saw_done = False

    def feed(self, data: bytes) -> None:
        ctx = self._ctx
        cache = ctx.cache_capture
        if cache is not None:
            if len(cache) + len(data) > MAX_CACHE_CAPTURE:
                ctx.cache_capture = None
            else:
                cache += data
        events = self._splitter.feed(data)
        if not events:
            return
        keep: list[bytes] = []
        for event in events:
            if event.startswith(DONE):
                self.saw_done = True
            elif b'"usage"' in event and self._is_usage_chunk(event):
                if self._strip_usage:
                    continue
            elif b'"content":""' not in event and b'"text":""' not in event:
                self._count_token()  # not the role-only opener nor an empty finish chunk: a token
            keep.append(event)
        if keep:
            sent = keep[0] if len(keep) == 1 else b"".join(keep)
            self._writer.write(sent)
            capture = self._capture
            if capture is not None and len(capture) < self._capture_cap:
                capture += sent[: self._capture_cap - len(capture)]

    def _count_token(self) -> None:
        now = time.perf_counter()
        if self.tokens == 0:
            self._first_token_at = now
            self._ctx.ttft = now - self._ctx.started
        self._last_token_at = now
        self.tokens += 1

    def _is_usage_chunk(self, event: bytes) -> bool:
        start = event.find(b"{")
        if start < 0:
            return False
        try:
            chunk = orjson.loads(event[start:].rstrip())
        except orjson.JSONDecodeError:
            return False
        usage = chunk.get("usage") if isinstance(chunk, dict) else None
        if not isinstance(usage, dict):
            return False
        self._ctx.usage = usage
        return not chunk.get("choices")

    def finish(self) -> None:
        """The backend ended the stream normally."""
        rest = self._splitter.pending
        if rest:
            self._writer.write(rest)
        self._timing()
        self._writer.end()

    def fail(self, message: str) -> None:
        """The backend failed mid-stream: tell the client in-band and end the response properly."""
        self._timing()
        self._writer.write(data_event(render_error(message, "upstream_error", "stream_interrupted")))
        self._writer.end()

    def _timing(self) -> None:
        if self.tokens > 1:
            self._ctx.tpot = (self._last_token_at - self._first_token_at) / (self.tokens - 1)
