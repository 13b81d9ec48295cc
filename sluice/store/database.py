"""The database seen by keys, migrations and audit: one interface over PostgreSQL and SQLite.

`await Database.connect(config.database)` opens an asyncpg pool for `postgresql://` / `postgres://` URLs
(sluice/store/postgres.py) or one aiosqlite connection in WAL mode for `sqlite:///path`
(sluice/store/sqlite.py; `sqlite:///data/x.db` is relative to the working directory, `sqlite:////abs/x.db`
absolute). Queries are written once, with PostgreSQL's `$1` placeholders, and rows come back as dicts;
timestamps are aware datetimes on both (SQLite columns declared `TIMESTAMPTZ` hold ISO-8601 UTC text).

`transaction()` yields a `Session` bound to one connection: run the transaction's statements on it, not on
the `Database` (which would use another connection on PostgreSQL, and refuses on SQLite).

Driver errors surface as `DatabaseError`: `DatabaseUnavailable` when the database cannot be reached or
opened (the message names the URL, password masked, and what to check), `UniqueViolation` for a unique
constraint, so callers and the command line never show a driver's stack trace.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

from sluice.config import DatabaseConfig

Dialect = Literal["postgres", "sqlite"]
Row = dict[str, Any]


class DatabaseError(Exception):
    """A database operation failed; the message is written for users."""


class DatabaseUnavailable(DatabaseError):
    """The database cannot be reached or opened."""


class UniqueViolation(DatabaseError):
    """The statement would break a unique constraint."""


class Session(Protocol):
    """Statements on a database, or on the one connection of an open transaction."""

    @property
    def dialect(self) -> Dialect: ...

    async def execute(self, query: str, *args: Any) -> int:
        """Run one statement; returns how many rows it changed."""
        ...

    async def execute_script(self, script: str) -> None:
        """Run `;`-separated statements without parameters (a migration file)."""
        ...

    async def execute_many(self, query: str, rows: Iterable[Sequence[Any]]) -> None:
        """Run one statement once per row of parameters (prepared once)."""
        ...

    async def fetch(self, query: str, *args: Any) -> list[Row]: ...

    async def fetchrow(self, query: str, *args: Any) -> Row | None: ...

    async def fetchval(self, query: str, *args: Any) -> Any:
        """The first column of the first row, or None when there is no row."""
        ...


class Database(ABC):
    """A connected database; a `Session` itself (each statement on a connection of its own)."""

    dialect: Dialect
    url: str  # with any password masked, for messages

    @staticmethod
    async def connect(config: DatabaseConfig) -> Database:
        """Connect to `database.url`; raises DatabaseUnavailable with a message saying what to check."""
        if config.url.startswith("sqlite:///"):
            from sluice.store.sqlite import SqliteDatabase

            return await SqliteDatabase.open(config.url.removeprefix("sqlite:///"), config.connect_timeout)
        from sluice.store.postgres import PostgresDatabase

        return await PostgresDatabase.open(config.url, config.pool_size, config.connect_timeout)

    @abstractmethod
    def transaction(self) -> AbstractAsyncContextManager[Session]: ...

    @abstractmethod
    def _session(self) -> AbstractAsyncContextManager[Session]:
        """A session for one statement outside a transaction (a pooled connection, or the one connection)."""

    async def execute(self, query: str, *args: Any) -> int:
        async with self._session() as session:
            return await session.execute(query, *args)

    async def execute_script(self, script: str) -> None:
        async with self._session() as session:
            await session.execute_script(script)

    async def execute_many(self, query: str, rows: Iterable[Sequence[Any]]) -> None:
        async with self._session() as session:
            await session.execute_many(query, rows)

    async def fetch(self, query: str, *args: Any) -> list[Row]:
        async with self._session() as session:
            return await session.fetch(query, *args)

    async def fetchrow(self, query: str, *args: Any) -> Row | None:
        async with self._session() as session:
            return await session.fetchrow(query, *args)

    async def fetchval(self, query: str, *args: Any) -> Any:
        async with self._session() as session:
            return await session.fetchval(query, *args)

    @abstractmethod
    async def close(self) -> None: ...


def masked_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user, _, host = parts.netloc.rpartition("@")
    return parts._replace(netloc=f"{user.partition(':')[0]}:***@{host}").geturl()
