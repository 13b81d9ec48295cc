"""Property tests for the SSE splitter: however the bytes are cut, the same events come out."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sluice.sse import EventSplitter, data_event, parse_event

line_text = st.text(
    alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=40
)
newline = st.sampled_from(["\n", "\r\n", "\r"])


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[bytes], list[str]]:
    """A stream of events with mixed line endings, and the data of each event."""
    events: list[bytes] = []
    datas: list[str] = []
    for _ in range(draw(st.integers(1, 8))):
        lines = draw(st.lists(line_text, min_size=1, max_size=3))
        nl = draw(newline)
        fields = [f"data: {line}" for line in lines]
        if draw(st.booleans()):
            fields.insert(0, f": comment {draw(line_text)}")
        if draw(st.booleans()):
            fields.insert(0, "event: message")
        events.append((nl.join(fields) + nl + nl).encode())
        datas.append("\n".join(lines))
    return events, datas


@given(streams(), st.lists(st.integers(0, 10_000), max_size=12))
@settings(max_examples=300)
def test_any_cut_gives_the_same_events(stream: tuple[list[bytes], list[str]], cuts: list[int]) -> None:
    events, datas = stream
    raw = b"".join(events)
    points = sorted({c % (len(raw) + 1) for c in cuts})
    pieces = [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)], strict=True)]
    splitter = EventSplitter()
    out: list[bytes] = []
    for piece in pieces:
        out.extend(splitter.feed(piece))
    # Bytes come out exactly as they went in (the relay never re-serialises), whatever the cuts, and
    # every event is released as soon as its blank line is complete.
    assert b"".join(out) + splitter.pending == raw
    assert splitter.pending in (b"", b"\n")  # at most the LF of a CRLF whose CR already ended an event
    assert [parse_event(e)["data"] for e in out if "data" in parse_event(e)] == datas
    if not points:
        assert out == events


@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise_and_never_lose_data(raw: bytes) -> None:
    splitter = EventSplitter()
    out = splitter.feed(raw)
    assert b"".join(out) + splitter.pending == raw


def test_partial_event_is_held_until_complete() -> None:
    splitter = EventSplitter()
    assert splitter.feed(b'data: {"a":') == []
    assert splitter.feed(b"1}\n") == []
    assert splitter.feed(b"\ndata: [DONE]\n\n") == [b'data: {"a":1}\n\n', b"data: [DONE]\n\n"]


def test_cr_only_events_are_released_at_once() -> None:
    splitter = EventSplitter()
    assert splitter.feed(b"data: x\r\r") == [b"data: x\r\r"]
    assert splitter.feed(b"data: y\r\n\r") == [b"data: y\r\n\r"]
    assert splitter.feed(b"\ndata: z\n\n") == [b"\ndata: z\n\n"]
    assert parse_event(b"\ndata: z\n\n") == {"data": "z"}


def test_parse_event_fields() -> None:
    assert parse_event(b"event: e\nid: 7\nretry: 10\ndata:a\ndata: b\n\n") == {
        "event": "e", "id": "7", "retry": "10", "data": "a\nb",
    }
    assert data_event(b"[DONE]") == b"data: [DONE]\n\n"
