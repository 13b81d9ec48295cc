"""The framework-independent part of the hot path shared by every stack under study."""

from __future__ import annotations

from dataclasses import dataclass

import orjson

CHAT_PATH = "/v1/chat/completions"
JSON_TYPE = "application/json"

UNAUTHORIZED = orjson.dumps(
    {"error": {"message": "invalid API key", "type": "authentication_error", "code": "invalid_api_key"}}
)
BAD_REQUEST = orjson.dumps(
    {
        "error": {
            "message": "body must be JSON with a string 'model'",
            "type": "invalid_request_error",
            "code": "invalid_body",
        }
    }
)
NOT_FOUND = orjson.dumps({"error": {"message": "not found", "type": "not_found_error", "code": "not_found"}})
BAD_GATEWAY = orjson.dumps({"error": {"message": "upstream failed", "type": "upstream_error", "code": "bad_gateway"}})


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """What the proxy needs from a chat request body."""

    model: str
    stream: bool


def bearer_ok(header: bytes | str | None, keys: frozenset[bytes]) -> bool:
    """True when ``header`` is ``Bearer <key>`` with a key from ``keys``."""
    if header is None:
        return False
    raw = header.encode("latin-1") if isinstance(header, str) else header
    scheme, _, token = raw.partition(b" ")
    return scheme.lower() == b"bearer" and token.strip() in keys


def parse_chat(body: bytes) -> ChatRequest | None:
    """Parse a chat body; ``None`` when it is not JSON or has no string ``model``."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    model = data.get("model")
    if not isinstance(model, str):
        return None
    return ChatRequest(model=model, stream=data.get("stream") is True)
