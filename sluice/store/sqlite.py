"""SQLite behind `Database`: one aiosqlite connection in WAL mode, `$1` placeholders read as SQLite's `?1`.

Datetime parameters are written as fixed-width ISO-8601 UTC text (so they sort as they compare) and columns
declared `TIMESTAMPTZ` are read back as aware datetimes. Statements are serialised on the one connection; a
transaction begins IMMEDIATE, taking the write lock up front, so processes writing at once wait for each
other (up to `database.connect_timeout`) instead of failing half-way.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

import aiosqlite

from sluice.store.database import (
    Database,
    DatabaseError,
    DatabaseUnavailable,
    Dialect,
    Row,
    Session,
    UniqueViolation,
)

_PLACEHOLDER = re.compile(r"'(?:[^']|'')*'|\$(\d+)")  # string literals are matched only to be skipped
_COMMENTS = re.compile(r"--[^\n]*|/\*.*?\*/", re.DOTALL)


@lru_cache(maxsize=1024)
def sqlite_query(query: str) -> str:
    """`$1`-style placeholders as SQLite's `?1`."""
    return _PLACEHOLDER.sub(lambda m: f"?{m.group(1)}" if m.group(1) else m.group(0), query)


def split_statements(script: str) -> list[str]:
    """`script` cut into whole statements (sqlite3 knows where quotes, comments and triggers end)."""
    statements, current = [], ""
    for piece in script.split(";"):
        current += piece + ";"
        if sqlite3.complete_statement(current):
            if _COMMENTS.sub("", current).strip(" \t\r\n;"):
                statements.append(current.strip())
            current = ""
    if _COMMENTS.sub("", current).strip(" \t\r\n;"):
        raise DatabaseError(f"SQL script ends inside a statement: {current.strip()[:80]!r}")
    return statements


def _sqlite_value(value: Any) -> Any:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database; use an aware one (e.g. datetime.now(UTC))")
        return value.astimezone(UTC).isoformat(timespec="microseconds")  # fixed width: sorts as it compares
    return value


def _timestamp(raw: bytes) -> datetime:
    value = datetime.fromisoformat(raw.decode())
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _dict_row(cursor: sqlite3.Cursor, row: tuple[Any, ...]) -> Row:
    return {column[0]: value for column, value in zip(cursor.description, row, strict=True)}


def _sqlite_error(exc: sqlite3.Error, url: str, timeout: float) -> DatabaseError:
    code = getattr(exc, "sqlite_errorname", "")
    if code == "SQLITE_CONSTRAINT_UNIQUE" or code == "SQLITE_CONSTRAINT_PRIMARYKEY":
        return UniqueViolation(str(exc))
    if code.startswith("SQLITE_CANTOPEN") or code.startswith("SQLITE_READONLY"):
        return DatabaseUnavailable(f"cannot open the SQLite database {url}: {exc}. Check that its folder is writable.")
    if code.startswith("SQLITE_BUSY"):
        return DatabaseUnavailable(f"the SQLite database {url} stayed locked by another process for {timeout:g} s.")
    if code == "SQLITE_NOTADB":
        return DatabaseUnavailable(f"{url} is not an SQLite database; point database.url at another file.")
    return DatabaseError(f"SQLite: {exc}")


class _SqliteSession:
    dialect: Dialect = "sqlite"

    def __init__(self, connection: aiosqlite.Connection, url: str, timeout: float) -> None:
        self.connection = connection
        self._url = url
        self._timeout = timeout

    async def execute(self, query: str, *args: Any) -> int:
        try:
            async with self.connection.execute(sqlite_query(query), [_sqlite_value(a) for a in args]) as cursor:
                return max(cursor.rowcount, 0)
        except sqlite3.Error as exc:
            raise _sqlite_error(exc, self._url, self._timeout) from exc

    async def execute_many(self, query: str, rows: Iterable[Sequence[Any]]) -> None:
        try:
            await self.connection.executemany(sqlite_query(query), [[_sqlite_value(a) for a in row] for row in rows])
        except sqlite3.Error as exc:
            raise _sqlite_error(exc, self._url, self._timeout) from exc

    async def execute_script(self, script: str) -> None:
        # Not sqlite3's executescript: it commits first, which would break the caller's transaction.
        for statement in split_statements(script):
            await self.execute(statement)

    async def fetch(self, query: str, *args: Any) -> list[Row]:
        return cast(list[Row], await self._read(query, args, many=True))

    async def fetchrow(self, query: str, *args: Any) -> Row | None:
        return cast(Row | None, await self._read(query, args, many=False))

    async def fetchval(self, query: str, *args: Any) -> Any:
        row = await self.fetchrow(query, *args)
        return None if row is None else next(iter(row.values()))

    async def rollback(self) -> None:
        with suppress(sqlite3.Error):  # the error that got us here matters more than a failed rollback
            await self.connection.rollback()

    async def _read(self, query: str, args: Sequence[Any], *, many: bool) -> Any:
        try:
            async with self.connection.execute(sqlite_query(query), [_sqlite_value(a) for a in args]) as cursor:
                return list(await cursor.fetchall()) if many else await cursor.fetchone()
        except sqlite3.Error as exc:
            raise _sqlite_error(exc, self._url, self._timeout) from exc


class SqliteDatabase(Database):
    dialect: Dialect = "sqlite"

    def __init__(self, connection: aiosqlite.Connection, url: str, timeout: float) -> None:
        self.url = url
        self._connection = connection
        self._only = _SqliteSession(connection, url, timeout)
        self._lock = asyncio.Lock()  # one connection: a transaction must not interleave with other statements
        self._holder: asyncio.Task[Any] | None = None

    @classmethod
    async def open(cls, path: str, timeout: float) -> SqliteDatabase:
        url = f"sqlite:///{path}"
        if path != ":memory:":
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise DatabaseUnavailable(f"cannot create the folder of the SQLite database {url}: {exc}") from exc
        sqlite3.register_converter("TIMESTAMPTZ", _timestamp)  # idempotent; applies to TIMESTAMPTZ columns only
        try:
            connection = await aiosqlite.connect(
                path, timeout=timeout, isolation_level=None, detect_types=sqlite3.PARSE_DECLTYPES
            )
        except sqlite3.Error as exc:
            raise _sqlite_error(exc, url, timeout) from exc
        connection.row_factory = _dict_row  # type: ignore[assignment]
        database = cls(connection, url, timeout)
        try:
            await database.execute("PRAGMA journal_mode=WAL")
            await database.execute("PRAGMA foreign_keys=ON")
        except DatabaseError:
            await connection.close()
            raise
        return database

    @asynccontextmanager
    async def _session(self) -> AsyncIterator[_SqliteSession]:
        if self._holder is not None and self._holder is asyncio.current_task():
            raise RuntimeError("inside `async with db.transaction() as tx`, run statements on tx, not on db")
        async with self._lock:
            self._holder = asyncio.current_task()
            try:
                yield self._only
            finally:
                self._holder = None

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Session]:
        async with self._session() as session:
            await session.execute("BEGIN IMMEDIATE")
            try:
                yield session
                await session.execute("COMMIT")
            except BaseException:
                await session.rollback()
                raise

    async def close(self) -> None:
        await self._connection.close()
