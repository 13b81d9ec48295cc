"""PostgreSQL behind `Database`: an asyncpg pool (`database.pool_size`), driver errors turned into DatabaseError.

Connecting and acquiring a pooled connection are bounded by `database.connect_timeout`.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any, TypeVar

import asyncpg

from sluice.store.database import (
    Database,
    DatabaseError,
    DatabaseUnavailable,
    Dialect,
    Row,
    Session,
    UniqueViolation,
    masked_url,
)

T = TypeVar("T")

# "The server is not there for us", as opposed to a problem with one statement.
_PG_UNREACHABLE = (
    OSError,  # refused, unknown host, timed out (TimeoutError is an OSError)
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,  # connection closed, pool closing, bad DSN
    asyncpg.InvalidAuthorizationSpecificationError,  # unknown user, wrong password
    asyncpg.InvalidCatalogNameError,  # no such database
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
)
_PG_ERRORS = (*_PG_UNREACHABLE, asyncpg.PostgresError)


class _PgSession:
    dialect: Dialect = "postgres"

    def __init__(self, connection: Any, database: PostgresDatabase) -> None:
        self.connection = connection
        self._database = database

    async def run(self, pending: Awaitable[T]) -> T:
        try:
            return await pending
        except _PG_ERRORS as exc:
            raise self._database.error(exc) from exc

    async def execute(self, query: str, *args: Any) -> int:
        status: str = await self.run(self.connection.execute(query, *args))
        count = status.rpartition(" ")[2]  # "UPDATE 3", "INSERT 0 1", "CREATE TABLE"
        return int(count) if count.isdigit() else 0

    async def execute_script(self, script: str) -> None:
        await self.run(self.connection.execute(script))  # no arguments: several statements are allowed

    async def execute_many(self, query: str, rows: Iterable[Sequence[Any]]) -> None:
        await self.run(self.connection.executemany(query, rows))

    async def fetch(self, query: str, *args: Any) -> list[Row]:
        return [dict(row) for row in await self.run(self.connection.fetch(query, *args))]

    async def fetchrow(self, query: str, *args: Any) -> Row | None:
        row = await self.run(self.connection.fetchrow(query, *args))
        return None if row is None else dict(row)

    async def fetchval(self, query: str, *args: Any) -> Any:
        return await self.run(self.connection.fetchval(query, *args))


class PostgresDatabase(Database):
    dialect: Dialect = "postgres"

    def __init__(self, pool: Any, url: str, timeout: float) -> None:
        self._pool = pool
        self.url = url
        self._timeout = timeout

    @classmethod
    async def open(cls, url: str, pool_size: int, timeout: float) -> PostgresDatabase:
        # min_size=0: connections open on demand, so while the server is away the pool does not keep
        # reconnecting in the background (and logging a traceback each time); one query proves it is there.
        pool = None
        try:
            pool = await asyncpg.create_pool(url, min_size=0, max_size=pool_size, timeout=timeout)
            await pool.fetchval("SELECT 1", timeout=timeout)
        except _PG_ERRORS as exc:
            if pool is not None:
                pool.terminate()
            raise _pg_error(exc, masked_url(url), timeout) from exc
        return cls(pool, masked_url(url), timeout)

    def error(self, exc: BaseException) -> DatabaseError:
        return _pg_error(exc, self.url, self._timeout)

    @asynccontextmanager
    async def _session(self) -> AsyncIterator[_PgSession]:
        try:
            connection = await self._pool.acquire(timeout=self._timeout)
        except _PG_ERRORS as exc:
            raise self.error(exc) from exc
        try:
            yield _PgSession(connection, self)
        finally:
            # A statement cut short (its task cancelled, a timeout) can leave the connection mid-operation:
            # asyncpg then terminates it and raises; the pool opens a new one when next needed.
            with suppress(Exception):
                await self._pool.release(connection)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Session]:
        async with self._session() as session:
            transaction = session.connection.transaction()
            await session.run(transaction.start())
            try:
                yield session
            except BaseException:
                with suppress(*_PG_ERRORS):  # the error that got us here matters more than a failed rollback
                    await transaction.rollback()
                raise
            await session.run(transaction.commit())

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self._pool.close(), self._timeout)
        except TimeoutError:
            self._pool.terminate()


def _pg_error(exc: BaseException, url: str, timeout: float) -> DatabaseError:
    if isinstance(exc, asyncpg.UniqueViolationError):
        return UniqueViolation(f"{exc} ({exc.detail})" if exc.detail else str(exc))
    if isinstance(exc, _PG_UNREACHABLE):
        reason = _reason(exc, timeout)
        return DatabaseUnavailable(
            f"cannot use the database at {url}: {reason}. Check that PostgreSQL is running and reachable "
            "and that database.url (host, port, user, password, database name) is right."
        )
    return DatabaseError(f"PostgreSQL: {exc}")


def _reason(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return f"unknown host ({exc.strerror})"
    return str(exc) or type(exc).__name__
