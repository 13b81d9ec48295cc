"""Database fixtures of the component tests: one PostgreSQL database per test module, and both dialects."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.postgres_server import throwaway_postgres


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A database of the module's own on the machine's PostgreSQL (tests empty what they use)."""
    with throwaway_postgres() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test runs twice: on a new SQLite file and on the module's PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/sluice.db"
    return str(request.getfixturevalue("postgres_url"))
