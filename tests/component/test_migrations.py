"""The database facade and the schema migrations, against real PostgreSQL and real SQLite.

Each test gets a fresh database of each kind (`throwaway_postgres()`, tests/postgres_server.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from sluice.config import DatabaseConfig
from sluice.store.database import Database, DatabaseError, DatabaseUnavailable, UniqueViolation
from sluice.store.migrations import TABLE_EXISTS, MigrationError, available, status, upgrade
from sluice.store.sqlite import split_statements, sqlite_query
from tests.postgres_server import POSTGRES, throwaway_postgres


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database of each kind for every test."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/data/sluice.db"
        return
    with throwaway_postgres() as fresh:
        yield fresh


@pytest.fixture
async def db(url: str) -> AsyncIterator[Database]:
    database = await Database.connect(DatabaseConfig(url=url, pool_size=4))
    yield database
    await database.close()


def write_migrations(root: Path, files: dict[str, str]) -> Path:
    for dialect in ("postgres", "sqlite"):
        (root / dialect).mkdir(parents=True, exist_ok=True)
        for name, sql in files.items():
            (root / dialect / name).write_text(sql)
    return root


# ---- migrations ----


def test_both_dialects_have_the_same_migrations() -> None:
    postgres, sqlite = available("postgres"), available("sqlite")
    assert [(m.version, m.name) for m in postgres] == [(m.version, m.name) for m in sqlite]
    assert postgres[0].file == "0001_api_keys.sql"


async def test_upgrade_applies_each_file_once_and_is_idempotent(db: Database) -> None:
    assert all(s.applied_at is None for s in await status(db))
    assert not await db.fetchval(TABLE_EXISTS[db.dialect]), "status must not create anything"

    applied = await upgrade(db)
    assert [m.file for m in applied] == [m.file for m in available(db.dialect)]
    assert await upgrade(db) == []
    rows = await db.fetch("SELECT version, name, applied_at FROM sluice_migrations ORDER BY version")
    assert [(r["version"], r["name"]) for r in rows] == [(m.version, m.name) for m in applied]
    assert all(isinstance(r["applied_at"], datetime) and r["applied_at"].tzinfo for r in rows)
    assert await db.fetchval("SELECT count(*) FROM api_keys") == 0
    states = await status(db)
    assert [s.applied_at for s in states] == [r["applied_at"] for r in rows]


async def test_concurrent_starters_apply_each_file_once(url: str, tmp_path: Path) -> None:
    sleep = "SELECT pg_sleep(0.1);" if url.startswith("postgres") else ""
    folder = write_migrations(
        tmp_path / "migrations",
        {
            "0001_first.sql": f"CREATE TABLE first (id integer PRIMARY KEY); {sleep}",
            "0002_second.sql": "CREATE TABLE second (id integer PRIMARY KEY); INSERT INTO second VALUES (1);",
            "0003_third.sql": f"{sleep} CREATE TABLE third (id integer PRIMARY KEY);",
        },
    )
    starters = [await Database.connect(DatabaseConfig(url=url, pool_size=2)) for _ in range(4)]
    try:
        results = await asyncio.gather(*(upgrade(db, folder) for db in starters))
        applied = sorted(m.version for result in results for m in result)
        assert applied == [1, 2, 3]
        assert await starters[0].fetchval("SELECT count(*) FROM sluice_migrations") == 3
        assert await starters[0].fetchval("SELECT count(*) FROM second") == 1
    finally:
        await asyncio.gather(*(db.close() for db in starters))


async def test_a_failed_migration_rolls_back_and_names_its_file(db: Database, tmp_path: Path) -> None:
    folder = write_migrations(
        tmp_path / "migrations",
        {
            "0001_good.sql": "CREATE TABLE good (id integer);",
            "0002_broken.sql": "CREATE TABLE half (id integer);\nCREATE TABLE oops (id integer) nonsense;",
        },
    )
    with pytest.raises(MigrationError, match=r"0002_broken\.sql"):
        await upgrade(db, folder)
    assert [(s.version, s.applied_at is not None) for s in await status(db, folder)] == [(1, True), (2, False)]
    with pytest.raises(DatabaseError):
        await db.fetch("SELECT * FROM half")  # rolled back with the rest of its file

    (folder / db.dialect / "0002_broken.sql").write_text("CREATE TABLE half (id integer);")
    assert [m.version for m in await upgrade(db, folder)] == [2]


async def test_status_shows_migrations_applied_by_a_newer_version(db: Database, tmp_path: Path) -> None:
    folder = write_migrations(tmp_path / "m", {"0001_one.sql": "CREATE TABLE one (id integer);"})
    await upgrade(db, folder)
    await db.execute(
        "INSERT INTO sluice_migrations (version, name, applied_at) VALUES ($1, $2, $3)", 7, "future", datetime.now(UTC)
    )
    states = await status(db, folder)
    assert [(s.version, s.known) for s in states] == [(1, True), (7, False)]


def test_misnamed_and_duplicate_files_are_refused(tmp_path: Path) -> None:
    write_migrations(tmp_path / "a", {"0001_ok.sql": "", "1_bad.sql": ""})
    with pytest.raises(MigrationError, match=r"NNNN_what\.sql"):
        available("sqlite", tmp_path / "a")
    write_migrations(tmp_path / "b", {"0001_ok.sql": "", "0001_again.sql": "", "README.md": ""})
    with pytest.raises(MigrationError, match="same version"):
        available("postgres", tmp_path / "b")
    with pytest.raises(MigrationError, match="no migrations folder"):
        available("sqlite", tmp_path / "nothing")


# ---- the facade ----


async def test_same_values_from_both_databases(db: Database) -> None:
    await db.execute_script(
        "CREATE TABLE t (id integer PRIMARY KEY, note text, at TIMESTAMPTZ, raw bytea);"
        if db.dialect == "postgres"
        else "CREATE TABLE t (id integer PRIMARY KEY, note text, at TIMESTAMPTZ, raw BLOB);"
    )
    moment = datetime(2027, 1, 31, 12, 30, 5, 123456, tzinfo=UTC)
    await db.execute("INSERT INTO t VALUES ($1, $2, $3, $4)", 1, "it's $1 ; here", moment, b"\x00\xff")
    await db.execute("INSERT INTO t VALUES ($1, $2, $3, $4)", 2, None, moment + timedelta(hours=1), None)
    assert await db.fetchrow("SELECT * FROM t WHERE id = $1", 1) == {
        "id": 1,
        "note": "it's $1 ; here",
        "at": moment,
        "raw": b"\x00\xff",
    }
    assert await db.fetchval("SELECT count(*) FROM t WHERE at > $1", moment) == 1
    assert await db.fetchval("SELECT note FROM t WHERE id = $1", 3) is None
    assert await db.fetchrow("SELECT * FROM t WHERE id = $1", 3) is None
    assert await db.execute("UPDATE t SET note = $2 WHERE id <= $1", 2, "x") == 2
    assert [r["note"] for r in await db.fetch("SELECT note FROM t ORDER BY id")] == ["x", "x"]
    with pytest.raises(UniqueViolation):
        await db.execute("INSERT INTO t (id) VALUES ($1)", 1)


async def test_transactions_commit_or_roll_back(db: Database) -> None:
    await db.execute("CREATE TABLE t (id integer PRIMARY KEY)")
    async with db.transaction() as tx:
        await tx.execute("INSERT INTO t VALUES ($1)", 1)
    with pytest.raises(UniqueViolation):
        async with db.transaction() as tx:
            await tx.execute("INSERT INTO t VALUES ($1)", 2)
            await tx.execute("INSERT INTO t VALUES ($1)", 1)
    with pytest.raises(ZeroDivisionError):
        async with db.transaction() as tx:
            await tx.execute("INSERT INTO t VALUES ($1)", 3)
            _ = 1 / 0
    assert [r["id"] for r in await db.fetch("SELECT id FROM t")] == [1]


async def test_unreachable_databases_get_a_message_not_a_trace(tmp_path: Path) -> None:
    with pytest.raises(DatabaseUnavailable) as refused:
        await Database.connect(DatabaseConfig(url="postgresql://me:hunter2@127.0.0.1:1/db", connect_timeout=2))
    assert "postgresql://me:***@127.0.0.1:1/db" in str(refused.value)
    assert "connection refused" in str(refused.value) and "hunter2" not in str(refused.value)

    with pytest.raises(DatabaseUnavailable, match="does not exist"):
        await Database.connect(DatabaseConfig(url=f"{POSTGRES}/sluice_no_such_database_here"))

    (tmp_path / "file").write_text("")
    with pytest.raises(DatabaseUnavailable, match="cannot create the folder"):
        await Database.connect(DatabaseConfig(url=f"sqlite:///{tmp_path}/file/sluice.db"))
    (tmp_path / "junk.db").write_bytes(b"not a database" * 100)
    with pytest.raises(DatabaseUnavailable, match="not an SQLite database"):
        await Database.connect(DatabaseConfig(url=f"sqlite:///{tmp_path}/junk.db"))


def test_sqlite_spelling_of_queries_and_scripts() -> None:
    assert sqlite_query("SELECT $1, '$2', 'it''s $3', $10") == "SELECT ?1, '$2', 'it''s $3', ?10"
    script = """
        -- a comment; with a semicolon
        CREATE TABLE a (note text DEFAULT 'x;y');
        CREATE TRIGGER t AFTER INSERT ON a BEGIN UPDATE a SET note = 'z'; END;
        /* trailing; comment */
    """
    statements = split_statements(script)
    assert len(statements) == 2 and statements[1].endswith("END;")
    with pytest.raises(DatabaseError, match="ends inside a statement"):
        split_statements("CREATE TABLE a (note text DEFAULT 'unterminated);")
