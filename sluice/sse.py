"""Incremental Server-Sent Events framing for relayed streams.

`EventSplitter` cuts a byte stream into complete events (each ending in a blank line) without
decoding or re-serialising them: the relay forwards the original bytes. It accepts `\\n`, `\\r\\n` and
`\\r` line endings as the SSE specification does. `parse_event` reads the fields of one event, for the
few events the relay has to look inside (the usage chunk) and for tests.
"""

from __future__ import annotations

import re

# An event ends at the first blank line: two line terminators in a row, in any of the three spellings.
_EVENT_END = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)")


class EventSplitter:
    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, data: bytes) -> list[bytes]:
        """Complete events found so far, each with its terminating blank line; keeps the partial tail."""
        buffer = self._pending + data if self._pending else data
        events: list[bytes] = []
        start = 0
        while True:
            match = _EVENT_END.search(buffer, start)
            if match is None:
                break
            end = match.end()
            # A final \r may yet turn out to be half of a \r\n: the event is complete either way, so it goes
            # now (holding it would delay every event of a CR-only stream); a \n that follows is only an
            # empty line at the head of the next event, which SSE clients skip.
            events.append(buffer[start:end])
            start = end
        self._pending = buffer[start:]
        return events

    @property
    def pending(self) -> bytes:
        """Bytes of an event not yet terminated (a stream that ends here was cut mid-event)."""
        return self._pending


def parse_event(event: bytes) -> dict[str, str]:
    """The fields of one event: `data` lines joined by newlines, the last `event`, `id` and `retry`."""
    fields: dict[str, str] = {}
    data: list[str] = []
    for raw in re.split(rb"\r\n|\r|\n", event):
        if not raw or raw.startswith(b":"):
            continue
        name, _, value = raw.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        key = name.decode("utf-8", "replace")
        text = value.decode("utf-8", "replace")
        if key == "data":
            data.append(text)
        elif key in ("event", "id", "retry"):
            fields[key] = text
    if data:
        fields["data"] = "\n".join(data)
    return fields


def data_event(payload: bytes) -> bytes:
    """One `data:` event carrying a single-line payload."""
    return b"data: " + payload + b"\n\n"


DONE_EVENT = b"data: [DONE]\n\n"
