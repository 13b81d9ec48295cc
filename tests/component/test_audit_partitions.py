"""Daily partitions of the audit log against real PostgreSQL, and retention against real SQLite."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path

import asyncpg
import pytest

from sluice.audit.partitions import LOCK_ID, Maintenance, maintain, partition_name
from sluice.config import DatabaseConfig
from sluice.store.database import Database, Session
from sluice.store.migrations import upgrade
from tests.postgres_server import throwaway_postgres

TODAY = date(2026, 11, 25)


def day(offset: int) -> date:
    return TODAY + timedelta(days=offset)


def at(offset: int, hour: int = 12) -> datetime:
    return datetime.combine(day(offset), time(hour), tzinfo=UTC)


def names(*offsets: int) -> tuple[str, ...]:
    return tuple(partition_name(day(offset)) for offset in offsets)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    with throwaway_postgres() as url:
        yield url


async def connect(url: str) -> Database:
    database = await Database.connect(DatabaseConfig(url=url, pool_size=4))
    await upgrade(database)
    return database


@pytest.fixture
async def pg(postgres_url: str) -> AsyncIterator[Database]:
    database = await connect(postgres_url)
    yield database
    await database.close()


@pytest.fixture
async def lite(tmp_path: Path) -> AsyncIterator[Database]:
    database = await connect(f"sqlite:///{tmp_path}/sluice.db")
    yield database
    await database.close()


async def insert(db: Database, request_id: str, received_at: datetime) -> None:
    await insert_in(db, request_id, received_at)


async def insert_in(session: Session, request_id: str, received_at: datetime) -> None:
    await session.execute(
        "INSERT INTO requests"
        " (request_id, received_at, finished_at, method, path, stream, status, latency_ms, attempts)"
        " VALUES ($1, $2, $3, 'POST', '/v1/chat/completions', $4, 200, 12.5, 1)",
        request_id,
        received_at,
        received_at + timedelta(seconds=2),
        True,
    )


async def placement(db: Database) -> dict[str, str]:
    """request_id -> the partition its row is stored in."""
    rows = await db.fetch("SELECT request_id, tableoid::regclass::text AS part FROM requests")
    return {row["request_id"]: row["part"] for row in rows}


async def daily_partitions(db: Database) -> list[str]:
    rows = await db.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'requests'::regclass AND c.relname <> 'requests_default' ORDER BY c.relname"
    )
    return [row["relname"] for row in rows]


async def test_the_window_is_created_once_and_rows_land_in_their_day(postgres_url: str) -> None:
    # Partition bounds must be UTC days whatever the session's time zone.
    database_name = postgres_url.rpartition("/")[2]
    await _on_database(postgres_url, f"ALTER DATABASE \"{database_name}\" SET timezone = 'Pacific/Kiritimati'")
    db = await connect(postgres_url)
    try:
        assert await db.fetchval("SHOW timezone") == "Pacific/Kiritimati"
        first = await maintain(db, today=TODAY, ahead=3, retention_days=0)
        assert first == Maintenance(created=names(-1, 0, 1, 2, 3), dropped=(), moved_rows=0, deleted_rows=0)
        assert await maintain(db, today=TODAY, ahead=3, retention_days=0) == Maintenance((), (), 0, 0)
        assert await daily_partitions(db) == list(names(-1, 0, 1, 2, 3))

        await insert(db, "midnight", at(0, hour=0))
        await insert(db, "noon", at(0))
        await insert(db, "last", at(1, hour=0) - timedelta(microseconds=1))
        await insert(db, "next", at(1, hour=0))
        assert await placement(db) == {
            "midnight": partition_name(day(0)),
            "noon": partition_name(day(0)),
            "last": partition_name(day(0)),
            "next": partition_name(day(1)),
        }

        parent_indexes = await db.fetch(
            "SELECT indexrelid::regclass::text AS name FROM pg_index WHERE indrelid = 'requests'::regclass"
        )
        attached = await db.fetch(
            "SELECT i.inhparent::regclass::text AS name FROM pg_index x JOIN pg_inherits i ON i.inhrelid = x.indexrelid"
            " WHERE x.indrelid = $1::regclass",
            partition_name(day(0)),
        )
        assert {r["name"] for r in attached} == {r["name"] for r in parent_indexes}
        assert {r["name"] for r in parent_indexes} == {
            "requests_pkey",
            "requests_key_time",
            "requests_model_time",
            "requests_status_time",
        }
    finally:
        await db.close()


async def test_rows_in_the_default_move_into_the_partition_made_for_their_day(pg: Database) -> None:
    await maintain(pg, today=TODAY, ahead=1, retention_days=0)
    for n in range(3):
        await insert(pg, f"later-{n}", at(5, hour=n))
    await insert(pg, "stray", at(-30))
    assert set((await placement(pg)).values()) == {"requests_default"}
    before = await pg.fetch("SELECT * FROM requests WHERE request_id LIKE 'later-%' ORDER BY request_id")

    result = await maintain(pg, today=day(4), ahead=1, retention_days=0)

    assert result == Maintenance(created=names(3, 4, 5), dropped=(), moved_rows=3, deleted_rows=0)
    where = await placement(pg)
    assert where == {
        "later-0": names(5)[0],
        "later-1": names(5)[0],
        "later-2": names(5)[0],
        "stray": "requests_default",
    }
    assert await pg.fetch("SELECT * FROM requests WHERE request_id LIKE 'later-%' ORDER BY request_id") == before
    assert await pg.fetchval("SELECT count(*) FROM requests_default") == 1


async def test_partitions_are_added_while_another_gateway_is_inserting(pg: Database) -> None:
    await maintain(pg, today=TODAY, ahead=0, retention_days=0)
    async with pg.transaction() as writer:  # an audit batch still open: RowExclusive on requests and today's partition
        await insert_in(writer, "during", at(0))
        result = await asyncio.wait_for(maintain(pg, today=TODAY, ahead=2, retention_days=0), timeout=5)
        assert result.created == names(1, 2)
    await insert(pg, "after", at(2))
    assert await placement(pg) == {"during": names(0)[0], "after": names(2)[0]}


async def test_retention_drops_old_partitions_and_old_default_rows(pg: Database) -> None:
    await maintain(pg, today=day(-10), ahead=12, retention_days=0)  # partitions for days -11 .. +2
    await pg.execute(f'CREATE TABLE "{partition_name(date(2000, 1, 1))}" (id integer)')  # not a partition: left alone
    await insert(pg, "ancient", at(-40))
    await insert(pg, "future", at(30))
    await insert(pg, "dropped", at(-8, hour=23))
    await insert(pg, "kept", at(-7, hour=0))
    assert await maintain(pg, today=TODAY, ahead=2, retention_days=0) == Maintenance((), (), 0, 0)

    result = await maintain(pg, today=TODAY, ahead=2, retention_days=7)

    assert result == Maintenance(created=(), dropped=names(-11, -10, -9, -8), moved_rows=0, deleted_rows=1)
    assert await daily_partitions(pg) == list(names(*range(-7, 3)))
    assert await placement(pg) == {"kept": names(-7)[0], "future": "requests_default"}
    assert await pg.fetchval("SELECT to_regclass('requests_20000101') IS NOT NULL")
    assert await pg.fetchval("SELECT to_regclass('usage_daily') IS NOT NULL")
    assert await maintain(pg, today=TODAY, ahead=2, retention_days=7) == Maintenance((), (), 0, 0)


async def test_a_held_lock_makes_maintenance_skip(pg: Database) -> None:
    async with pg.transaction() as tx:
        await tx.execute("SELECT pg_advisory_xact_lock($1)", LOCK_ID)
        result = await maintain(pg, today=TODAY, ahead=3, retention_days=7)
    assert result == Maintenance(created=(), dropped=(), moved_rows=0, deleted_rows=0, skipped=True)
    assert await daily_partitions(pg) == []


async def test_maintainers_at_once_share_the_work(postgres_url: str) -> None:
    gateways = [await connect(postgres_url) for _ in range(3)]
    try:
        results = await asyncio.gather(*(maintain(db, today=TODAY, ahead=3, retention_days=7) for db in gateways))
        created = [name for result in results for name in result.created]
        assert sorted(created) == list(names(-1, 0, 1, 2, 3))  # each partition created by exactly one of them
        assert await daily_partitions(gateways[0]) == list(names(-1, 0, 1, 2, 3))
    finally:
        await asyncio.gather(*(db.close() for db in gateways))


async def test_sqlite_retention_deletes_old_rows_only(lite: Database) -> None:
    cutoff = at(-7, hour=0)
    await insert(lite, "old", at(-30))
    await insert(lite, "just-before", cutoff - timedelta(microseconds=1))
    await insert(lite, "at-cutoff", cutoff)
    await insert(lite, "today", at(0))
    assert await maintain(lite, today=TODAY, ahead=3, retention_days=0) == Maintenance((), (), 0, 0)

    assert await maintain(lite, today=TODAY, ahead=3, retention_days=7) == Maintenance((), (), 0, 2)
    rows = await lite.fetch("SELECT request_id, received_at FROM requests ORDER BY received_at")
    assert rows == [{"request_id": "at-cutoff", "received_at": cutoff}, {"request_id": "today", "received_at": at(0)}]


async def test_negative_windows_are_refused(lite: Database) -> None:
    with pytest.raises(ValueError, match="ahead"):
        await maintain(lite, today=TODAY, ahead=-1, retention_days=0)
    with pytest.raises(ValueError, match="retention_days"):
        await maintain(lite, today=TODAY, ahead=0, retention_days=-1)


def test_partition_names_are_the_utc_day() -> None:
    assert partition_name(date(2026, 1, 5)) == "requests_20260105"


async def _on_database(url: str, statement: str) -> None:
    connection = await asyncpg.connect(url, timeout=5)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()
