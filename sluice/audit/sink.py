"""Batches of audit records into the database: one idempotent statement per batch, roll-up included.

`insert(db, records)` writes a batch into `requests` and adds the rows it actually inserted to the daily
roll-up `usage_daily`, atomically. A record already there (same request id and `received_at`: a replay
after an outage, or a batch whose insert timed out but committed) is skipped and not counted again, so
every request is recorded, and counted, exactly once however often its batch is written.

PostgreSQL: one statement per batch. The batch travels as one JSON array (serialised by orjson in C; the
server parses it and casts each field, which costs the gateway far less than binding a typed array per
column: asyncpg checks every element of an array parameter), timestamps converted by `to_timestamp`;
`INSERT … ON CONFLICT DO NOTHING RETURNING` feeds the roll-up's `INSERT … ON CONFLICT DO UPDATE` in the
same statement, grouped and ordered so that replicas upserting the same days, keys and models take the
row locks in one order. COPY would be faster still on the client, but cannot skip duplicates.

SQLite, in one transaction: the roll-up first adds the batch's records whose request id `requests` does
not hold yet (the batch as one JSON parameter, expanded with `json_each`, summed in SQL), then one
prepared `INSERT … ON CONFLICT DO NOTHING` runs per record (`executemany`, timestamps as the layer's ISO
text): SQLite's JSON functions re-parse a row for every field, which made a single `INSERT … SELECT FROM
json_each` slower than binding the values.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import orjson

from sluice.audit.record import COLUMNS, INDEX, TIMESTAMPS, Record
from sluice.store.database import Database

# The SQL type of each column in the JSON batch (PostgreSQL); timestamps travel as epoch seconds.
PG_TYPES = {
    "stream": "boolean",
    "status": "int4",
    "prompt_tokens": "int4",
    "completion_tokens": "int4",
    "attempts": "int4",
    "ttft_ms": "float8",
    "latency_ms": "float8",
    **dict.fromkeys(TIMESTAMPS, "float8"),
}
COLUMN_LIST = ", ".join(COLUMNS)
ROLLUP_UPSERT = """
ON CONFLICT (day, key_id, model) DO UPDATE SET
    requests = usage_daily.requests + excluded.requests,
    errors = usage_daily.errors + excluded.errors,
    prompt_tokens = usage_daily.prompt_tokens + excluded.prompt_tokens,
    completion_tokens = usage_daily.completion_tokens + excluded.completion_tokens,
    latency_ms_sum = usage_daily.latency_ms_sum + excluded.latency_ms_sum"""


def _pg_statement() -> str:
    fields = ", ".join(f"(r ->> {i})::{PG_TYPES.get(name, 'text')} AS {name}" for i, name in enumerate(COLUMNS))
    values = ", ".join(f"to_timestamp({name})" if name in TIMESTAMPS else name for name in COLUMNS)
    return f"""
WITH batch AS (
    SELECT {fields} FROM jsonb_array_elements($1::jsonb) AS b(r)
), inserted AS (
    INSERT INTO requests ({COLUMN_LIST})
    SELECT {values} FROM batch
    ON CONFLICT DO NOTHING
    RETURNING received_at, key_id, model_requested, status, prompt_tokens, completion_tokens, latency_ms
), rollup AS (
    INSERT INTO usage_daily (day, key_id, model, requests, errors, prompt_tokens, completion_tokens, latency_ms_sum)
    SELECT (received_at AT TIME ZONE 'UTC')::date, coalesce(key_id, ''), coalesce(model_requested, ''),
           count(*), count(*) FILTER (WHERE status >= 400), coalesce(sum(prompt_tokens), 0),
           coalesce(sum(completion_tokens), 0), sum(latency_ms)
    FROM inserted
    GROUP BY 1, 2, 3
    ORDER BY 1, 2, 3
    {ROLLUP_UPSERT}
)
SELECT count(*) FROM inserted"""


PG_INSERT = _pg_statement()

# The roll-up first, from the batch's records not yet in `requests` (the same transaction then inserts them).
# Request ids are unique (a random per-process prefix and a counter), so the id alone identifies a record.
SQLITE_ROLLUP = f"""
INSERT INTO usage_daily (day, key_id, model, requests, errors, prompt_tokens, completion_tokens, latency_ms_sum)
SELECT date(value ->> {INDEX["received_at"]}, 'unixepoch'), coalesce(value ->> {INDEX["key_id"]}, ''),
       coalesce(value ->> {INDEX["model_requested"]}, ''), count(*),
       sum(value ->> {INDEX["status"]} >= 400), coalesce(sum(value ->> {INDEX["prompt_tokens"]}), 0),
       coalesce(sum(value ->> {INDEX["completion_tokens"]}), 0), sum(value ->> {INDEX["latency_ms"]})
FROM json_each($1)
WHERE NOT EXISTS (SELECT 1 FROM requests WHERE request_id = value ->> {INDEX["request_id"]})
GROUP BY 1, 2, 3
{ROLLUP_UPSERT}"""
SQLITE_INSERT = (
    f"INSERT INTO requests ({COLUMN_LIST}) VALUES ({', '.join('?' for _ in COLUMNS)}) ON CONFLICT DO NOTHING"
)
STAMPS = tuple(INDEX[name] for name in TIMESTAMPS)


async def insert(db: Database, records: Sequence[Record]) -> int:
    """Write `records`; returns how many were new (the others were already there)."""
    if not records:
        return 0
    batch = orjson.dumps(records)  # one parameter and one statement text, whatever the batch size
    if db.dialect == "postgres":
        if NUL in batch:
            batch = orjson.dumps([_without_nul(record) for record in records])
        return int(await db.fetchval(PG_INSERT, batch.decode()))  # one statement: atomic on its own
    async with db.transaction() as tx:
        await tx.execute(SQLITE_ROLLUP, batch.decode())
        before = await tx.fetchval("SELECT total_changes()")
        await tx.execute_many(SQLITE_INSERT, map(_sqlite_row, records))
        return int(await tx.fetchval("SELECT total_changes()")) - int(before)


def _sqlite_row(record: Record) -> list[object]:
    """Timestamps as the layer's ISO text (as aware datetimes: the layer writes them)."""
    row = list(record)
    for i in STAMPS:
        if row[i] is not None:
            row[i] = datetime.fromtimestamp(row[i], UTC)
    return row


NUL = b"\\u0000"  # how JSON writes the NUL character


def _without_nul(record: Record) -> Record:
    """PostgreSQL text cannot hold NUL: a record must never be refused for what a client sent (a JWT claim,
    a `user` field), so NUL becomes U+FFFD."""
    return tuple(v.replace("\x00", "\ufffd") if isinstance(v, str) else v for v in record)
