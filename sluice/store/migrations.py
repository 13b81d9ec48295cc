"""Schema migrations: plain SQL files, applied in order, each in its own transaction, recorded once.

The files live in sluice/store/migrations/postgres/ and sluice/store/migrations/sqlite/, named
`NNNN_what.sql`; NNNN is the version. Adding tables is a matter of dropping the next file into both
folders (the audit tables of issue 6 arrive as `0002_requests.sql`, say): nothing else changes. Each
applied file is recorded in `sluice_migrations(version, name, applied_at)` and never runs again, so
never edit a file that has shipped; add another. A file runs in one transaction together with its record,
so it applies completely or not at all; statements that refuse to run in a transaction (CREATE INDEX
CONCURRENTLY, ALTER TYPE ... ADD VALUE on old PostgreSQL) cannot be used.

Gateways starting at once are safe: on PostgreSQL every migration transaction first takes an advisory
lock, on SQLite BEGIN IMMEDIATE takes the write lock, and what is pending is re-read under the lock.
`upgrade(db)` runs at start-up and from `sluice db upgrade`; `status(db)` backs `sluice db status`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from importlib.resources.abc import Traversable

from sluice.store.database import Database, DatabaseError, DatabaseUnavailable, Dialect, Session

MIGRATIONS = resources.files("sluice.store") / "migrations"
FILE_NAME = re.compile(r"^(\d{4})_([A-Za-z0-9_]+)\.sql$")
LOCK_ID = int.from_bytes(b"sluice:m", "big", signed=True)  # the bigint key of the advisory lock
LOCK = {"postgres": f"SELECT pg_advisory_xact_lock({LOCK_ID})", "sqlite": ""}
TABLE_EXISTS = {
    "postgres": "SELECT to_regclass('sluice_migrations') IS NOT NULL",
    "sqlite": "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'sluice_migrations'",
}
CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS sluice_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL
)"""


class MigrationError(DatabaseError):
    """A migration file is misnamed, duplicated or failed to apply; the message names the file."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def file(self) -> str:
        return f"{self.version:04d}_{self.name}.sql"


@dataclass(frozen=True, slots=True)
class MigrationState:
    version: int
    name: str
    applied_at: datetime | None  # None: pending
    known: bool = True  # False: applied by a newer Sluice than this one (no such file here)


def available(dialect: Dialect, folder: Traversable = MIGRATIONS) -> list[Migration]:
    """The migration files for `dialect` under `folder`, in version order."""
    root = folder / dialect
    if not root.is_dir():
        raise MigrationError(f"no migrations folder for {dialect} at {root}")
    found: dict[int, Migration] = {}
    for entry in root.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = FILE_NAME.match(entry.name)
        if match is None:
            raise MigrationError(f"{root}/{entry.name}: migration files are named NNNN_what.sql")
        version = int(match[1])
        if version in found:
            raise MigrationError(f"{root}: {found[version].file} and {entry.name} have the same version")
        found[version] = Migration(version, match[2], entry.read_text(encoding="utf-8"))
    return [found[version] for version in sorted(found)]


async def upgrade(db: Database, folder: Traversable = MIGRATIONS) -> list[Migration]:
    """Apply every pending migration, one transaction each; returns those this call applied."""
    migrations = available(db.dialect, folder)
    applied: list[Migration] = []
    while True:
        async with db.transaction() as tx:
            pending = await _pending(tx, migrations)
            if not pending:
                return applied
            migration = pending[0]
            try:
                await tx.execute_script(migration.sql)
            except DatabaseUnavailable:
                raise
            except DatabaseError as exc:
                raise MigrationError(f"migration {db.dialect}/{migration.file} failed: {exc}") from exc
            await tx.execute(
                "INSERT INTO sluice_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
                migration.version,
                migration.name,
                datetime.now(UTC),
            )
        applied.append(migration)


async def status(db: Database, folder: Traversable = MIGRATIONS) -> list[MigrationState]:
    """Every migration known here or recorded in the database, in version order (read-only)."""
    migrations = available(db.dialect, folder)
    recorded: dict[int, tuple[str, datetime]] = {}
    if await db.fetchval(TABLE_EXISTS[db.dialect]):
        rows = await db.fetch("SELECT version, name, applied_at FROM sluice_migrations")
        recorded = {row["version"]: (row["name"], row["applied_at"]) for row in rows}
    states = {
        m.version: MigrationState(m.version, m.name, recorded[m.version][1] if m.version in recorded else None)
        for m in migrations
    }
    for version, (name, applied_at) in recorded.items():
        if version not in states:
            states[version] = MigrationState(version, name, applied_at, known=False)
    return [states[version] for version in sorted(states)]


async def _pending(tx: Session, migrations: list[Migration]) -> list[Migration]:
    if LOCK[tx.dialect]:
        await tx.execute(LOCK[tx.dialect])
    await tx.execute(CREATE_TABLE)
    done = {row["version"] for row in await tx.fetch("SELECT version FROM sluice_migrations")}
    return [m for m in migrations if m.version not in done]
