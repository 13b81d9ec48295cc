"""Converts between the two shapes of an answer: a streamed SSE answer and a whole JSON body.

The cache keeps one shape, the non-streaming body, whichever way the answer first came: a streamed
answer is assembled into a body (`assemble`), and a hit for a streaming request is replayed as a
proper SSE stream (`render_stream`: role, content in pieces, finish reason, the usage chunk when the
client asked for it, `[DONE]`). So a question first asked with `stream: true` serves the same question
asked without it, and the other way round.

Only complete answers are kept: a stream without `[DONE]`, with an error event, with a choice that has
no finish reason, or carrying log probabilities (not reassembled) gives None and is not stored.
"""

from __future__ import annotations

from typing import Any

import orjson

from sluice.sse import DONE_EVENT, data_event

COMPLETE = frozenset({"stop", "length", "tool_calls", "function_call"})
WORDS_PER_CHUNK = 16


def is_complete(body: dict[str, Any]) -> bool:
    """A successful answer whose every choice ended normally (finish reason stop, length or a tool call)."""
    choices = body.get("choices")
    return (
        isinstance(choices, list)
        and bool(choices)
        and all(isinstance(c, dict) and c.get("finish_reason") in COMPLETE and not c.get("logprobs") for c in choices)
    )


def assemble(stream: bytes) -> bytes | None:
    """The non-streaming body equivalent to a captured SSE answer, or None if it is not complete."""
    chunks: list[dict[str, Any]] = []
    done = False
    for event in stream.replace(b"\r\n", b"\n").split(b"\n\n"):
        for line in event.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                done = True
                continue
            try:
                chunk = orjson.loads(data)
            except orjson.JSONDecodeError:
                return None
            if not isinstance(chunk, dict) or "error" in chunk:
                return None
            chunks.append(chunk)
    if not done or not chunks:
        return None
    first = chunks[0]
    chat = first.get("object") == "chat.completion.chunk"
    choices: dict[int, dict[str, Any]] = {}
    usage = None
    for chunk in chunks:
        if isinstance(chunk.get("usage"), dict):
            usage = chunk["usage"]
        for part in chunk.get("choices") or ():
            if not isinstance(part, dict):
                return None
            index = part.get("index", 0)
            choice = choices.setdefault(index, _empty_choice(index, chat))
            if not _merge(choice, part, chat):
                return None
    body: dict[str, Any] = {
        "id": first.get("id"),
        "object": "chat.completion" if chat else "text_completion",
        "created": first.get("created"),
        "model": first.get("model"),
        "choices": [_finished(choices[i], chat) for i in sorted(choices)],
    }
    if first.get("system_fingerprint") is not None:
        body["system_fingerprint"] = first["system_fingerprint"]
    if usage is not None:
        body["usage"] = usage
    return orjson.dumps(body) if is_complete(body) else None


def _empty_choice(index: int, chat: bool) -> dict[str, Any]:
    if chat:
        return {"index": index, "message": {"role": "assistant", "content": ""}, "finish_reason": None}
    return {"index": index, "text": "", "finish_reason": None}


def _merge(choice: dict[str, Any], part: dict[str, Any], chat: bool) -> bool:
    if part.get("logprobs"):
        return False
    if part.get("finish_reason") is not None:
        choice["finish_reason"] = part["finish_reason"]
    if not chat:
        text = part.get("text")
        if isinstance(text, str):
            choice["text"] += text
        return True
    delta = part.get("delta")
    if not isinstance(delta, dict):
        return delta is None
    message = choice["message"]
    if isinstance(delta.get("role"), str):
        message["role"] = delta["role"]
    if isinstance(delta.get("content"), str):
        message["content"] += delta["content"]
    for name in ("reasoning_content", "refusal"):
        if isinstance(delta.get(name), str):
            message[name] = message.get(name, "") + delta[name]
    for call in delta.get("tool_calls") or ():
        if not isinstance(call, dict):
            return False
        calls = message.setdefault("tool_calls", {})
        slot = calls.setdefault(call.get("index", 0), {"id": None, "type": "function", "function": {}})
        if call.get("id"):
            slot["id"] = call["id"]
        if call.get("type"):
            slot["type"] = call["type"]
        function = call.get("function") or {}
        for key in ("name", "arguments"):
            if isinstance(function.get(key), str):
                slot["function"][key] = slot["function"].get(key, "") + function[key]
    return True


def _finished(choice: dict[str, Any], chat: bool) -> dict[str, Any]:
    if chat:
        calls = choice["message"].get("tool_calls")
        if calls is not None:
            choice["message"]["tool_calls"] = [calls[i] for i in sorted(calls)]
            if not choice["message"]["content"]:
                choice["message"]["content"] = None
    choice["logprobs"] = None
    return choice


def render_stream(body: bytes, include_usage: bool) -> list[bytes]:
    """The SSE events (each ending in a blank line, `[DONE]` last) that stream the answer in `body`."""
    answer = orjson.loads(body)
    chat = answer.get("object") == "chat.completion"
    head = {"id": answer.get("id"), "created": answer.get("created"), "model": answer.get("model")}
    head["object"] = "chat.completion.chunk" if chat else "text_completion"
    if answer.get("system_fingerprint") is not None:
        head["system_fingerprint"] = answer["system_fingerprint"]
    events: list[bytes] = []

    def emit(choices: list[dict[str, Any]], **extra: Any) -> None:
        events.append(data_event(orjson.dumps({**head, "choices": choices, **extra})))

    for choice in answer.get("choices") or ():
        index = choice.get("index", 0)
        if chat:
            message = choice.get("message") or {}
            emit([{"index": index, "delta": {"role": message.get("role", "assistant"), "content": ""},
                   "logprobs": None, "finish_reason": None}])  # fmt: skip
            for piece in _pieces(message.get("content") or ""):
                emit([{"index": index, "delta": {"content": piece}, "logprobs": None, "finish_reason": None}])
            for name in ("reasoning_content", "refusal"):
                if message.get(name):
                    emit([{"index": index, "delta": {name: message[name]}, "logprobs": None, "finish_reason": None}])
            calls = [{**call, "index": i} for i, call in enumerate(message.get("tool_calls") or ())]
            if calls:
                emit([{"index": index, "delta": {"tool_calls": calls}, "logprobs": None, "finish_reason": None}])
            emit([{"index": index, "delta": {}, "logprobs": None, "finish_reason": choice.get("finish_reason")}])
        else:
            for piece in _pieces(choice.get("text") or ""):
                emit([{"index": index, "text": piece, "logprobs": None, "finish_reason": None}])
            emit([{"index": index, "text": "", "logprobs": None, "finish_reason": choice.get("finish_reason")}])
    if include_usage and isinstance(answer.get("usage"), dict):
        emit([], usage=answer["usage"])
    events.append(DONE_EVENT)
    return events


def _pieces(text: str) -> list[str]:
    """`text` cut after every few words (whitespace kept), so a replay streams like an answer does."""
    if not text:
        return []
    pieces: list[str] = []
    start = count = 0
    for i, char in enumerate(text):
        if char == " ":
            count += 1
            if count == WORDS_PER_CHUNK:
                pieces.append(text[start : i + 1])
                start, count = i + 1, 0
    if start < len(text):
        pieces.append(text[start:])
    return pieces
