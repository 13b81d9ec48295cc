"""Streamed answers assemble into the body a non-streaming request gets, and bodies replay as valid streams."""

from __future__ import annotations

from typing import Any

import orjson

from sluice.cache.replay import assemble, render_stream
from sluice.sse import data_event


def _stream(*chunks: dict[str, Any], done: bool = True) -> bytes:
    events = b"".join(data_event(orjson.dumps(chunk)) for chunk in chunks)
    return events + (b"data: [DONE]\n\n" if done else b"")


HEAD = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m"}


def _chat_chunk(delta: dict[str, Any], finish: str | None = None, index: int = 0) -> dict[str, Any]:
    return {**HEAD, "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}


USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def test_a_chat_stream_assembles_into_a_completion() -> None:
    stream = _stream(
        _chat_chunk({"role": "assistant", "content": ""}),
        _chat_chunk({"content": "Hello"}),
        _chat_chunk({"content": " world"}),
        _chat_chunk({}, "stop"),
        {**HEAD, "choices": [], "usage": USAGE},
    )
    body = orjson.loads(assemble(stream) or b"")
    assert body["object"] == "chat.completion"
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello world"},
            "finish_reason": "stop",
            "logprobs": None,
        }
    ]
    assert body["usage"] == USAGE
    assert (body["id"], body["model"], body["created"]) == ("chatcmpl-1", "m", 7)


def test_tool_calls_are_merged_by_index() -> None:
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    stream = _stream(
        _chat_chunk({"role": "assistant", "content": None, "tool_calls": [call]}),
        _chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
        _chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": ' "Oslo"}'}}]}),
        _chat_chunk({}, "tool_calls"),
    )
    message = orjson.loads(assemble(stream) or b"")["choices"][0]["message"]
    assert message["content"] is None
    assert message["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    ]


def test_incomplete_streams_are_not_assembled() -> None:
    opened = [_chat_chunk({"role": "assistant", "content": "Hi"})]
    assert assemble(_stream(*opened, _chat_chunk({}, "stop"), done=False)) is None  # no [DONE]
    assert assemble(_stream(*opened)) is None  # no finish reason
    error = {"error": {"message": "interrupted", "type": "upstream_error", "code": "stream_interrupted"}}
    assert assemble(_stream(*opened, error)) is None
    assert assemble(_stream(*opened, _chat_chunk({}, "abort"))) is None
    logprobs = _chat_chunk({"content": "x"}, "stop")
    logprobs["choices"][0]["logprobs"] = {"content": []}
    assert assemble(_stream(*opened, logprobs)) is None
    assert assemble(b"data: {not json\n\ndata: [DONE]\n\n") is None


def test_completion_streams_and_several_choices() -> None:
    head = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m"}
    stream = _stream(
        {**head, "choices": [{"index": 1, "text": "B", "logprobs": None, "finish_reason": None}]},
        {**head, "choices": [{"index": 0, "text": "A", "logprobs": None, "finish_reason": None}]},
        {**head, "choices": [{"index": 0, "text": "a", "logprobs": None, "finish_reason": "length"}]},
        {**head, "choices": [{"index": 1, "text": "b", "logprobs": None, "finish_reason": "stop"}]},
    )
    body = orjson.loads(assemble(stream) or b"")
    assert body["object"] == "text_completion"
    assert [(c["index"], c["text"], c["finish_reason"]) for c in body["choices"]] == [
        (0, "Aa", "length"),
        (1, "Bb", "stop"),
    ]


def test_a_rendered_stream_assembles_back_to_the_same_body() -> None:
    long_text = " ".join(f"word{i}" for i in range(50))
    body = {
        "id": "chatcmpl-9",
        "object": "chat.completion",
        "created": 3,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": long_text},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": USAGE,
    }
    events = render_stream(orjson.dumps(body), include_usage=True)
    assert events[-1] == b"data: [DONE]\n\n"
    assert len(events) > 4  # the content is streamed in pieces
    assert all(event.startswith(b"data: ") and event.endswith(b"\n\n") for event in events)
    assert orjson.loads(assemble(b"".join(events)) or b"") == body
    without_usage = render_stream(orjson.dumps(body), include_usage=False)
    assert not any(b'"usage"' in event for event in without_usage)
