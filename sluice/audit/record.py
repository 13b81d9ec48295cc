"""One audit record: the columns of the `requests` table as a plain tuple, cheap to build on the request path.

A record is a tuple in `COLUMNS` order holding only JSON-native values (str, int, float, bool, None), so
the journal can write it as one JSON array and read it back unchanged. Timestamps are seconds since the
epoch (floats); the database sinks turn them into `timestamptz` values (sluice/audit/sink.py).
"""

from __future__ import annotations

from typing import Any

COLUMNS: tuple[str, ...] = (
    "request_id",
    "received_at",
    "first_token_at",
    "finished_at",
    "tenant",
    "key_id",
    "key_name",
    "user_id",
    "client_ip",
    "method",
    "path",
    "route",
    "model_requested",
    "model_served",
    "adapter",
    "backend",
    "stream",
    "status",
    "error_type",
    "prompt_tokens",
    "completion_tokens",
    "ttft_ms",
    "latency_ms",
    "attempts",
    "cache_result",
    "rate_limit",
    "prompt_body",
    "response_body",
)
TIMESTAMPS = frozenset({"received_at", "first_token_at", "finished_at"})
INDEX = {name: i for i, name in enumerate(COLUMNS)}

Record = tuple[Any, ...]


def as_dict(record: Record) -> dict[str, Any]:
    """The record with its column names (for tests, logs and messages)."""
    return dict(zip(COLUMNS, record, strict=True))
