"""Batches of audit records into the database: one idempotent statement per batch, roll-up included.

`insert(db, records)` writes a batch into `requests` and adds the rows it actually inserted to the daily
roll-up `usage_daily`, atomically. A record already there (same request id and `received_at`: a replay
after an outage, or a batch whose insert timed out but committed) is skipped and not counted again, so
every request is recorded, and counted, exactly once however often its batch is written.

PostgreSQL: one statement per batch. The columns travel as one array each and are expanded with `unnest`
on the server (a single round trip, no per-row statement, timestamps converted by `to_timestamp` there);
`INSERT … ON CONFLICT DO NOTHING RETURNING` feeds the roll-up's `INSERT … ON CONFLICT DO UPDATE` in the
same statement, grouped and ordered so that replicas upserting the same days, keys and models take the
row locks in one order. COPY would be faster still on the client, but cannot skip duplicates.

SQLite: one `INSERT … SELECT … FROM json_each($1) ON CONFLICT DO NOTHING RETURNING` with the batch as a
JSON array, the roll-up summed in Python from the rows returned and upserted in the same transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from sluice.audit.record import COLUMNS, INDEX, TIMESTAMPS, Record
from sluice.store.database import Database, Session

# The SQL type of each column's parameter array (PostgreSQL); timestamps travel as epoch seconds.
PG_TYPES = {
    "stream": "bool",
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
    arrays = ", ".join(f"${i}::{PG_TYPES.get(name, 'text')}[]" for i, name in enumerate(COLUMNS, start=1))
    values = ", ".join(f"to_timestamp({name})" if name in TIMESTAMPS else name for name in COLUMNS)
    return f"""
WITH batch AS (
    SELECT * FROM unnest({arrays}) AS b({COLUMN_LIST})
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
SQLITE_INSERT = f"""
INSERT INTO requests ({COLUMN_LIST})
SELECT {", ".join(f"value ->> {i}" for i in range(len(COLUMNS)))} FROM json_each($1) WHERE true
ON CONFLICT DO NOTHING
RETURNING received_at, key_id, model_requested, status, prompt_tokens, completion_tokens, latency_ms"""
SQLITE_ROLLUP = f"""
INSERT INTO usage_daily (day, key_id, model, requests, errors, prompt_tokens, completion_tokens, latency_ms_sum)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
{ROLLUP_UPSERT}"""
STAMPS = tuple(INDEX[name] for name in TIMESTAMPS)


async def insert(db: Database, records: Sequence[Record]) -> int:
    """Write `records`; returns how many were new (the others were already there)."""
    if not records:
        return 0
    if db.dialect == "postgres":
        columns = [_pg_safe(list(column)) for column in zip(*records, strict=True)]
        return int(await db.fetchval(PG_INSERT, *columns))  # one statement: atomic on its own
    async with db.transaction() as tx:
        return await _sqlite_insert(tx, records)


INT4 = 2**31 - 1


def _pg_safe(column: list[Any]) -> list[Any]:
    """PostgreSQL refuses NUL characters in text and integers past int4: a record must never be refused
    for what a client or a backend sent (a JWT claim, a `user` field, a token count)."""
    for i, value in enumerate(column):
        if isinstance(value, str):
            if "\x00" in value:
                column[i] = value.replace("\x00", "\ufffd")
        elif isinstance(value, int) and not isinstance(value, bool) and not -INT4 <= value <= INT4:
            column[i] = None
    return column


async def _sqlite_insert(tx: Session, records: Sequence[Record]) -> int:
    """The batch travels as one JSON array (one parameter, one statement text whatever the batch size, so
    neither SQLite's statement cache nor its parameter limit sees the batch size); timestamps as the ISO
    text the database layer writes."""
    rows = []
    for record in records:
        row = list(record)
        for i in STAMPS:
            if row[i] is not None:
                row[i] = datetime.fromtimestamp(row[i], UTC).isoformat(timespec="microseconds")
        rows.append(row)
    totals: dict[tuple[str, str, str], list[float]] = {}
    inserted = await tx.fetch(SQLITE_INSERT, orjson.dumps(rows).decode())
    for new in inserted:
        key = (new["received_at"].date().isoformat(), new["key_id"] or "", new["model_requested"] or "")
        sums = totals.setdefault(key, [0, 0, 0, 0, 0.0])
        sums[0] += 1
        sums[1] += new["status"] >= 400
        sums[2] += new["prompt_tokens"] or 0
        sums[3] += new["completion_tokens"] or 0
        sums[4] += new["latency_ms"]
    for (day, key_id, model), (requests, errors, prompt, completion, latency) in sorted(totals.items()):
        await tx.execute(
            SQLITE_ROLLUP, day, key_id, model, int(requests), int(errors), int(prompt), int(completion), latency
        )
    return len(inserted)
