"""Daily partitions of the audit log: created ahead, dropped after the retention, one maintainer at a time.

On PostgreSQL `requests` is range-partitioned by UTC day on `received_at`. `maintain()` keeps a daily
partition `requests_YYYYMMDD` for every day from yesterday through `ahead` days after `today`, so the rows of
the coming days always have a table of their own. The DEFAULT partition `requests_default` is the safety
net: a row no daily partition covers (a clock far off, a replay older than the retention, maintenance that
has not run for days) is still stored instead of failing the writer's whole batch. When a daily partition
is created for a day the default holds rows of, they are moved into it in the same transaction: create the
table LIKE `requests`, move the rows (`WITH moved AS (DELETE ... RETURNING *) INSERT ...`), then ATTACH
it, which builds the parent's indexes on it. ATTACH takes SHARE UPDATE EXCLUSIVE on `requests`, so other
gateways keep inserting; it takes ACCESS EXCLUSIVE on the default partition, taken first here so no row
for that day can slip into the default between the move and the ATTACH. (A transaction that used `requests`
before an ATTACH keeps its old list of partitions; a row of the new day would then fail the default's new
constraint rather than be misfiled. The writer inserts a batch in one statement, and partitions are made
days ahead, so this needs a clock days off and ends in the batch being retried.)

Retention (`retention_days` > 0) drops every daily partition of a day before `today - retention_days`
and deletes the default partition's rows older than that. Dropping a partition is instant and leaves no
dead rows behind, where a DELETE of a day's rows would take long, write as much WAL as the rows and leave
bloat for vacuum. A DROP briefly takes ACCESS EXCLUSIVE on `requests` (DETACH ... CONCURRENTLY would not,
but PostgreSQL refuses it when the table has a default partition). `retention_days` == 0 keeps everything.
The `usage_daily` roll-up is small and kept forever; retention never touches it.

Each step (one partition created, one dropped, the default's old rows deleted) is a short transaction of
its own that first takes a transaction-level advisory lock with `pg_try_advisory_xact_lock` and waits at
most `LOCK_TIMEOUT` for table locks, so a long report holding `requests` makes a step fail (and the next
run retry) instead of queueing every insert behind it, and a failed drop never undoes tomorrow's
partition. When another process holds the advisory lock this call stops and reports `skipped=True`: that
process is doing the same work. Partitions are found in the catalog (children of `requests` named
`requests_YYYYMMDD` in its schema); the default partition and other tables are never touched.

SQLite has no partitions: retention deletes the old rows of `requests`.

The gateway runs `maintain()` at start-up and every hour (the audit writer schedules it).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

from sluice.store.database import Database, DatabaseError, Session

LOCK_ID = int.from_bytes(b"sluice:p", "big", signed=True)  # the bigint key of the maintenance advisory lock
LOCK_TIMEOUT = "2s"  # the longest a step waits for a table lock (inserts queue behind a waiting DROP)
PARENT = "requests"
DAILY_NAME = re.compile(r"^requests_(\d{8})$")

# Every partition of `requests` with its schema, and whether it is the default one.
_PARTITIONS = """
SELECT parent_ns.nspname AS parent_schema, child.relname AS name, child_ns.nspname AS schema,
       child.oid = p.partdefid AS is_default
FROM pg_partitioned_table p
JOIN pg_class parent ON parent.oid = p.partrelid
JOIN pg_namespace parent_ns ON parent_ns.oid = parent.relnamespace
LEFT JOIN pg_inherits i ON i.inhparent = p.partrelid
LEFT JOIN pg_class child ON child.oid = i.inhrelid
LEFT JOIN pg_namespace child_ns ON child_ns.oid = child.relnamespace
WHERE p.partrelid = 'requests'::regclass
"""


@dataclass(frozen=True, slots=True)
class Maintenance:
    created: tuple[str, ...]  # partition tables created
    dropped: tuple[str, ...]  # partition tables dropped
    moved_rows: int  # rows moved out of the default partition into a new daily partition
    deleted_rows: int  # rows deleted for retention (SQLite; old rows of the default partition on PostgreSQL)
    skipped: bool = False  # another process held the maintenance lock; this call stopped there


def partition_name(day: date) -> str:
    """The daily partition of `day`: requests_YYYYMMDD."""
    return f"requests_{day:%Y%m%d}"


async def maintain(db: Database, *, today: date, ahead: int, retention_days: int) -> Maintenance:
    """Create the partitions of `today - 1` .. `today + ahead`, then apply the retention (0: keep all)."""
    if ahead < 0 or retention_days < 0:
        raise ValueError(f"ahead and retention_days must be >= 0, not {ahead} and {retention_days}")
    cutoff = today - timedelta(days=retention_days) if retention_days else None
    if db.dialect == "sqlite":
        deleted = (
            0 if cutoff is None else await db.execute("DELETE FROM requests WHERE received_at < $1", _start(cutoff))
        )
        return Maintenance(created=(), dropped=(), moved_rows=0, deleted_rows=deleted)
    return await _maintain_postgres(db, today, ahead, cutoff)


@dataclass(frozen=True, slots=True)
class _Layout:
    """Where `requests` lives and what partitions it has, read from the catalog."""

    schema: str
    default: str | None  # the default partition, qualified and quoted
    daily: dict[date, str]  # day -> daily partition name (unqualified)

    def table(self, name: str) -> str:
        return f"{_quoted(self.schema)}.{_quoted(name)}"


class _Busy(Exception):
    """Another process holds the maintenance lock."""


async def _maintain_postgres(db: Database, today: date, ahead: int, cutoff: date | None) -> Maintenance:
    created: list[str] = []
    dropped: list[str] = []
    moved = deleted = 0
    try:
        for offset in range(-1, ahead + 1):
            day = today + timedelta(days=offset)
            async with _step(db) as tx:
                moved_now = await _create(tx, day)
            if moved_now is not None:
                created.append(partition_name(day))
                moved += moved_now
        if cutoff is not None:
            old = sorted(day for day in (await _layout(db)).daily if day < cutoff)
            for day in old:
                async with _step(db) as tx:
                    name = await _drop(tx, day)
                if name is not None:
                    dropped.append(name)
            async with _step(db) as tx:
                deleted = await _delete_old_defaults(tx, cutoff)
    except _Busy:
        return Maintenance(tuple(created), tuple(dropped), moved, deleted, skipped=True)
    return Maintenance(tuple(created), tuple(dropped), moved, deleted)


@asynccontextmanager
async def _step(db: Database) -> AsyncIterator[Session]:
    """A transaction holding the maintenance lock; raises _Busy when another process holds it."""
    async with db.transaction() as tx:
        if not await tx.fetchval("SELECT pg_try_advisory_xact_lock($1)", LOCK_ID):
            raise _Busy
        await tx.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        yield tx


async def _create(tx: Session, day: date) -> int | None:
    """Create and attach the partition of `day` with the default's rows of that day; None if it exists."""
    layout = await _layout(tx)
    if day in layout.daily:
        return None
    parent, table = layout.table(PARENT), layout.table(partition_name(day))
    # The locks ATTACH takes, in its order, taken before the move so no row of `day` lands in the default after it.
    await tx.execute(f"LOCK TABLE {parent} IN SHARE UPDATE EXCLUSIVE MODE")
    if layout.default is not None:
        await tx.execute(f"LOCK TABLE {layout.default} IN ACCESS EXCLUSIVE MODE")
    await tx.execute(f"CREATE TABLE {table} (LIKE {parent} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)")
    moved = 0
    if layout.default is not None:
        moved = await tx.execute(
            f"WITH moved AS (DELETE FROM {layout.default} WHERE received_at >= $1 AND received_at < $2 RETURNING *) "
            f"INSERT INTO {table} SELECT * FROM moved",
            _start(day),
            _start(day + timedelta(days=1)),
        )
    await tx.execute(
        f"ALTER TABLE {parent} ATTACH PARTITION {table} "
        f"FOR VALUES FROM ({_bound(day)}) TO ({_bound(day + timedelta(days=1))})"
    )
    return moved


async def _drop(tx: Session, day: date) -> str | None:
    """Drop the daily partition of `day`; None if there is none (any more)."""
    layout = await _layout(tx)
    name = layout.daily.get(day)
    if name is None:
        return None
    await tx.execute(f"DROP TABLE {layout.table(name)}")
    return name


async def _delete_old_defaults(tx: Session, cutoff: date) -> int:
    default = (await _layout(tx)).default
    if default is None:
        return 0
    return await tx.execute(f"DELETE FROM {default} WHERE received_at < $1", _start(cutoff))


async def _layout(session: Session) -> _Layout:
    rows = await session.fetch(_PARTITIONS)
    if not rows:
        raise DatabaseError("the requests table is not partitioned; run the migrations (sluice db upgrade)")
    schema = rows[0]["parent_schema"]
    default: str | None = None
    daily: dict[date, str] = {}
    for row in rows:
        if row["name"] is None:  # a partitioned table without partitions yet
            continue
        if row["is_default"]:
            default = f"{_quoted(row['schema'])}.{_quoted(row['name'])}"
        elif row["schema"] == schema and (day := _day_of(row["name"])) is not None:
            daily[day] = row["name"]
    return _Layout(schema=schema, default=default, daily=daily)


def _day_of(name: str) -> date | None:
    """The day of a daily partition's name, None for any other name."""
    match = DAILY_NAME.match(name)
    if match is None:
        return None
    try:
        day = datetime.strptime(match.group(1), "%Y%m%d").date()
    except ValueError:
        return None
    return day if partition_name(day) == name else None


def _start(day: date) -> datetime:
    """00:00 UTC of `day`."""
    return datetime.combine(day, time(), tzinfo=UTC)


def _bound(day: date) -> str:
    """00:00 UTC of `day` as a timestamptz literal, whatever the session's TimeZone."""
    return f"'{day.isoformat()} 00:00:00+00'"


def _quoted(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'
