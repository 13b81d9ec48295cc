"""JSON schemas of the gateway's request and response bodies, for its OpenAPI document (sluice/openapi.py).

Proxied request bodies state what `pipeline/validation.py` checks and allow every other field (vLLM's
sampling parameters, judged by vLLM). Admin request bodies are generated from the pydantic models their
handlers validate with. Streamed answers are described one server-sent event at a time (OpenAPI 3.1).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from sluice.admin import NewKey
from sluice.admin_cache import Purge
from sluice.repair import Notification

Schema = dict[str, Any]
REF_TEMPLATE = "#/components/schemas/{model}"
BODY_MODELS: tuple[type[BaseModel], ...] = (NewKey, Purge, Notification)


def ref(name: str) -> Schema:
    return {"$ref": REF_TEMPLATE.format(model=name)}


def nullable(schema: Schema) -> Schema:
    return {**schema, "type": [schema["type"], "null"]}


def json_object(properties: Schema, required: tuple[str, ...] = (), **more: Any) -> Schema:
    return {"type": "object", "properties": properties, "required": list(required), **more}


STRING, INTEGER, NUMBER, BOOLEAN = ({"type": kind} for kind in ("string", "integer", "number", "boolean"))
SAMPLING = {
    "stream": {**nullable(BOOLEAN), "description": "Answer as server-sent events (`text/event-stream`)."},
    "stream_options": {
        "type": ["object", "null"],
        "properties": {"include_usage": {**BOOLEAN, "description": "End the stream with a usage chunk."}},
        "additionalProperties": True,
    },
    **{name: nullable(NUMBER) for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty")},
    **{name: {**nullable(INTEGER), "minimum": 1} for name in ("max_tokens", "max_completion_tokens", "n")},
}
MODEL = {"type": "string", "minLength": 1, "description": "A model or adapter name from `GET /v1/models`."}
MESSAGE = json_object(
    {
        "role": {**STRING, "description": "system, developer, user, assistant or tool."},
        "content": {
            "type": ["string", "array", "null"],
            "description": "Text, or an array of content parts (`text`, `image_url`, `input_audio`, `file`), "
            "passed to the backend as they are.",
        },
        "name": STRING,
        "tool_calls": {"type": "array", "description": "An assistant's tool calls."},
        "tool_call_id": {**STRING, "description": "In a `tool` message: the call it answers."},
    },
    ("role",),
    additionalProperties=True,
)
USAGE = json_object({"prompt_tokens": INTEGER, "completion_tokens": INTEGER, "total_tokens": INTEGER})
KEY_RECORD = json_object(
    {
        "id": STRING,
        "name": STRING,
        "prefix": {**STRING, "description": "The key's first characters, to recognise it; never the key."},
        "state": {"enum": ["active", "expired", "revoked"]},
        "models": {"type": ["array", "null"], "items": STRING},
        "tenant": nullable(STRING),
        **{name: nullable(INTEGER) for name in ("requests_per_minute", "tokens_per_minute", "max_concurrency")},
        "created_at": {**STRING, "format": "date-time"},
        **{name: {**nullable(STRING), "format": "date-time"} for name in ("expires_at", "revoked_at", "rotated_at")},
        "log_bodies": BOOLEAN,
        "cache": BOOLEAN,
    },
    ("id", "name", "prefix", "state", "created_at"),
)
SCHEMAS: dict[str, Schema] = {
    "Error": json_object(
        {
            "error": json_object(
                {
                    "message": STRING,
                    "type": STRING,
                    "param": nullable(STRING),
                    "code": {"type": ["string", "integer", "null"]},
                },
                ("message", "type"),
            )
        },
        ("error",),
        description="OpenAI's error body. The gateway's own errors always carry all four fields.",
    ),
    "ChatMessage": MESSAGE,
    "ChatCompletionRequest": json_object(
        {
            "model": MODEL,
            "messages": {"type": "array", "minItems": 1, "items": ref("ChatMessage")},
            **SAMPLING,
            "tools": {"type": "array", "description": "Tool definitions, passed to the backend."},
        },
        ("model", "messages"),
        additionalProperties=True,
        description="Fields the gateway checks; any other field (vLLM's sampling parameters) is passed through.",
    ),
    "CompletionRequest": json_object(
        {
            "model": MODEL,
            "prompt": {
                "anyOf": [
                    STRING,
                    {"type": "array", "minItems": 1, "items": {"type": ["string", "integer", "array"]}},
                ],
                "description": "A string, an array of strings, an array of token ids or an array of those.",
            },
            **SAMPLING,
        },
        ("model", "prompt"),
        additionalProperties=True,
    ),
    "EmbeddingRequest": json_object(
        {
            "model": MODEL,
            "input": {
                "anyOf": [STRING, {"type": "array", "minItems": 1}],
                "description": "A string, or an array of strings or token ids.",
            },
            **SAMPLING,  # checked on every route, though meaningless here
            "stream": {**nullable(BOOLEAN), "description": "Checked, but embeddings are never streamed."},
        },
        ("model", "input"),
        additionalProperties=True,
    ),
    "Usage": USAGE,
    "ChatCompletion": json_object(
        {
            "id": STRING,
            "object": {"const": "chat.completion"},
            "created": INTEGER,
            "model": STRING,
            "choices": {"type": "array", "items": json_object({"index": INTEGER, "message": MESSAGE})},
            "usage": ref("Usage"),
            "sources": {"type": "array", "description": "RAG routes: the chunks the answer was grounded on."},
        },
        ("choices",),
    ),
    "ChatCompletionChunk": json_object(
        {
            "id": STRING,
            "object": {"const": "chat.completion.chunk"},
            "created": INTEGER,
            "model": STRING,
            "choices": {"type": "array", "items": json_object({"index": INTEGER, "delta": {"type": "object"}})},
            "usage": {"anyOf": [ref("Usage"), {"type": "null"}]},
        },
        ("choices",),
    ),
    "Completion": json_object(
        {
            "id": STRING,
            "object": {"const": "text_completion"},
            "created": INTEGER,
            "model": STRING,
            "choices": {"type": "array", "items": json_object({"index": INTEGER, "text": STRING})},
            "usage": {"anyOf": [ref("Usage"), {"type": "null"}]},
        },
        ("choices",),
    ),
    "EmbeddingList": json_object(
        {
            "object": {"const": "list"},
            "model": STRING,
            "data": {
                "type": "array",
                "items": json_object({"index": INTEGER, "embedding": {"type": ["array", "string"]}}, ("embedding",)),
            },
            "usage": ref("Usage"),
        },
        ("data",),
    ),
    "ModelList": json_object(
        {
            "object": {"const": "list"},
            "data": {
                "type": "array",
                "items": json_object(
                    {
                        "id": STRING,
                        "object": STRING,
                        "owned_by": STRING,
                        "parent": {**nullable(STRING), "description": "An adapter's or RAG route's base model."},
                    },
                    ("id",),
                ),
            },
        },
        ("object", "data"),
    ),
    "KeyRecord": KEY_RECORD,
    "NewKeyCreated": {
        "allOf": [ref("KeyRecord"), json_object({"key": STRING}, ("key",))],
        "description": "The key's record and the key itself, shown this once.",
    },
}


def body_schemas() -> dict[str, Schema]:
    """The admin request bodies: JSON schemas of the pydantic models, nested models as components too."""
    _, definitions = models_json_schema([(m, "validation") for m in BODY_MODELS], ref_template=REF_TEMPLATE)
    return dict(definitions["$defs"])


def sse_event(chunk: str) -> Schema:
    """One server-sent event of a streamed answer: a `chunk`, OpenAI's error body (a failure after the
    stream started), or the closing `[DONE]`."""
    data = {
        "contentMediaType": "application/json",
        "contentSchema": {"anyOf": [ref(chunk), ref("Error")]},
    }
    return json_object(
        {"event": STRING, "id": STRING, "data": {"type": "string", "anyOf": [{"const": "[DONE]"}, data]}},
        ("data",),
    )
