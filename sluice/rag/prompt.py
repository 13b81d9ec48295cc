"""Builds what a RAG route sends to its model: the question to embed, the context message, the sources.

Everything here is a pure function of the request and the retrieved chunks, and deterministic: the
chunks are ordered by source, then position in the source (never by score, which wobbles in the last
digits between runs and embedders), so the same retrieved set always yields the same prompt bytes and
vLLM's prefix cache can reuse the KV blocks of a repeated context.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from sluice.rag.types import Chunk

SYSTEM_ROLES = frozenset({"system", "developer"})
NO_CONTEXT = "(No document in the knowledge base matches this question.)"
MAX_HEADER_BYTES = 2048  # X-Sluice-Sources: whole entries are dropped from the end to stay under this
MAX_HEADER_FIELD = 200  # characters of a source or title kept in the header


def question(messages: Sequence[dict[str, Any]]) -> str | None:
    """The text of the last user message (its text parts joined), or None when it has no text."""
    for message in reversed(messages):
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            text = "\n".join(
                part["text"]
                for part in content
                if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            )
        else:
            return None
        return text.strip() or None
    return None


def ordered(chunks: Iterable[Chunk]) -> list[Chunk]:
    """The chunks in prompt order: by source, then position in the source."""
    return sorted(chunks, key=lambda chunk: (chunk.source, chunk.index, chunk.id))


def render_context(chunks: Sequence[Chunk]) -> str:
    """`[n] <title> (<source>)` then the chunk's text, for each chunk in the given order."""
    if not chunks:
        return NO_CONTEXT
    return "\n\n".join(f"[{n}] {c.title} ({c.source})\n{c.text}" for n, c in enumerate(chunks, 1))


def with_context(messages: Sequence[dict[str, Any]], template: str, chunks: Sequence[Chunk]) -> list[dict[str, Any]]:
    """The client's leading system messages unchanged, then the route's template with the context,
    then the rest of the conversation as sent."""
    lead = 0
    while lead < len(messages) and messages[lead].get("role") in SYSTEM_ROLES:
        lead += 1
    context = {"role": "system", "content": template.replace("{context}", render_context(chunks))}
    return [*messages[:lead], context, *messages[lead:]]


def sources(chunks: Sequence[Chunk]) -> list[dict[str, Any]]:
    """The `sources` of an answer, numbered as in the prompt (entry n-1 is `[n]`)."""
    return [{"source": c.source, "title": c.title, "chunk_index": c.index, "score": round(c.score, 4)} for c in chunks]


def sources_header(entries: Sequence[dict[str, Any]]) -> bytes:
    """Compact ASCII JSON for `X-Sluice-Sources`, at most MAX_HEADER_BYTES: long fields are cut and whole
    entries dropped from the end, so the value is always valid JSON (a prefix of the sources)."""
    short = [
        {**entry, "source": entry["source"][:MAX_HEADER_FIELD], "title": entry["title"][:MAX_HEADER_FIELD]}
        for entry in entries
    ]
    while True:
        # ensure_ascii: a header value must not carry raw UTF-8; control characters come out escaped
        value = json.dumps(short, separators=(",", ":"), ensure_ascii=True).encode("ascii")
        if len(value) <= MAX_HEADER_BYTES or not short:
            return value
        short.pop()
