"""Which requests may share an answer: the cache's scope, its exact key and the text compared by meaning.

Safe by construction: everything that can change an answer goes into the `scope` hash — the tenant, the
route, the model (base or adapter), the RAG corpus version, every request field except the few known
not to change the output (`stream`, `stream_options`, `user`), and every turn of the conversation but
the last one. The exact key adds the last turn. The semantic level compares only the last user message,
and only against entries of the same scope, so a different system prompt, sampling parameter or earlier
turn can never produce a hit however similar the question. Unknown fields are part of the scope too: a
parameter added to the API later partitions the cache rather than being ignored.

Normalisation is deliberately light (surrounding and repeated whitespace in text): case, punctuation
and wording are left for the semantic level to judge, so the exact level never merges two requests
that the model could answer differently.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

import orjson

VERSION = b"sluice-cache-v1"
NOT_OUTPUT = frozenset({"stream", "stream_options", "user"})
SPACES = re.compile(r"\s+")
CLOSING = re.compile(r"[\s?!.。？！]+$")
# Past this size the embedding model (256 word pieces for all-MiniLM-L6-v2) no longer sees all of the
# text, so two long prompts that differ at the end could look identical: those are matched exactly only.
MAX_PROBE_CHARS = 1000
MAX_PROBE_WORDS = 150


@dataclass(frozen=True, slots=True)
class CacheKey:
    scope: str  # hex: what must match for any hit
    exact: str  # hex: the scope plus the last turn (the entry's id)
    probe: str | None  # the last user message, compared by meaning; None: exact level only
    tenant: str
    model: str


def cache_key(route: str, body: dict[str, Any], tenant: str, corpus: str = "") -> CacheKey:
    """The key of a validated chat or completions request (`body` as the client sent it)."""
    model: str = body["model"]
    params = {name: value for name, value in body.items() if name not in NOT_OUTPUT}
    probe: str | None = None
    if route == "chat":
        messages = [_message(m) for m in params.pop("messages")]
        earlier, last = messages[:-1], messages[-1]
        if last.get("role") == "user" and isinstance(last.get("content"), str):
            probe = last["content"]
    else:
        prompt = params.pop("prompt")
        earlier, last = [], {"prompt": _text(prompt) if isinstance(prompt, str) else prompt}
        if isinstance(prompt, str):
            probe = last["prompt"]
    scope = _digest(VERSION, route, tenant, model, corpus, params, earlier)
    exact = _digest(VERSION, scope, last)
    if probe is not None and (len(probe) > MAX_PROBE_CHARS or len(probe.split()) > MAX_PROBE_WORDS or not probe):
        probe = None
    return CacheKey(scope, exact, probe, tenant, model)


def embedding_text(probe: str) -> str:
    """What is embedded for a probe: without its closing punctuation, which all-MiniLM-L6-v2 weighs
    heavily ("How many moons does Mars have?" and the same without "?" score only 0.90) while it never
    changes the question. Numbers, negations and names are still checked on the probe itself (the guard).
    """
    return CLOSING.sub("", probe)


def _digest(*parts: Any) -> str:
    # orjson with sorted keys is a canonical form: equal data, equal bytes (numbers keep their type:
    # temperature 0 and 0.0 differ, which can only cost a hit, never cause a wrong one)
    data = orjson.dumps(parts, option=orjson.OPT_SORT_KEYS, default=repr)
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _text(text: str) -> str:
    return SPACES.sub(" ", text).strip()


def _message(message: dict[str, Any]) -> dict[str, Any]:
    """A chat message with its text normalised; images, tool calls and names kept as sent."""
    content = message.get("content")
    if isinstance(content, str):
        return {**message, "content": _text(content)}
    if isinstance(content, list):
        parts = [
            {**part, "text": _text(part["text"])}
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            else part
            for part in content
        ]
        if len(parts) == 1 and isinstance(parts[0], dict) and parts[0].get("type") == "text":
            return {**message, "content": parts[0]["text"]}  # [{"type":"text","text":t}] means t
        return {**message, "content": parts}
    return message
