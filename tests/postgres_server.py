"""Throwaway PostgreSQL for tests: a database of its own on the machine's server (`throwaway_postgres()`),
or a server of its own on a free port for tests that stop and restart it (`PostgresServer`, never the
machine's).

`initdb` into a temporary folder, `pg_ctl start` / `stop -m fast` on it. PostgreSQL refuses to run as root,
so when the tests run as root the server runs as the `postgres` user (through `runuser`).
"""

from __future__ import annotations

import asyncio
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

import asyncpg

from tests.conftest import free_port

POSTGRES = os.environ.get("SLUICE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")


async def _on_server(statement: str) -> None:
    connection = await asyncpg.connect(f"{POSTGRES}/test", timeout=5)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


@contextmanager
def throwaway_postgres() -> Iterator[str]:
    """The URL of a new, empty PostgreSQL database, dropped on exit."""
    name = f"sluice_test_{secrets.token_hex(6)}"
    asyncio.run(_on_server(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{POSTGRES}/{name}"
    finally:
        asyncio.run(_on_server(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

SEARCH = ("/usr/lib/postgresql/{}/bin", "/usr/local/bin", "/usr/bin")


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for version in range(20, 11, -1):
        candidate = Path(SEARCH[0].format(version)) / name
        if candidate.exists():
            return str(candidate)
    raise AssertionError(f"{name} is not installed (apt-get install postgresql)")


class PostgresServer:
    """`with PostgresServer() as pg:` … `pg.stop()` … `pg.start()` (same port and data)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._dir = Path(tempfile.mkdtemp(prefix="sluice-pg-"))
        self._data = self._dir / "data"
        self._user: list[str] = []
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(self._dir, owner.pw_uid, owner.pw_gid)
            self._user = ["runuser", "-u", "postgres", "--"]

    def _run(self, *argv: str) -> None:
        done = subprocess.run([*self._user, *argv], capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, f"{argv[0]} failed: {done.stdout}{done.stderr}"

    def init(self) -> None:
        self._run(_tool("initdb"), "-D", str(self._data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")

    def start(self) -> None:
        options = f"-p {self.port} -k {self._dir} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
        self._run(_tool("pg_ctl"), "-D", str(self._data), "-o", options, "-l", str(self._dir / "log"), "-w", "start")

    def stop(self) -> None:
        """A fast shutdown: sessions are cut, as in a failover or a restart."""
        self._run(_tool("pg_ctl"), "-D", str(self._data), "-m", "fast", "-w", "stop")

    def __enter__(self) -> PostgresServer:
        self.init()
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        subprocess.run(
            [*self._user, _tool("pg_ctl"), "-D", str(self._data), "-m", "immediate", "stop"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        shutil.rmtree(self._dir, ignore_errors=True)
