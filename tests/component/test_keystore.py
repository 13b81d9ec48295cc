"""Managed keys in real PostgreSQL and real SQLite: lifecycle, expiry, and the key never stored in clear."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import string
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from sluice.config import DatabaseConfig
from sluice.context import Limits
from sluice.identity.keys import (
    KEY_PREFIX,
    DuplicateName,
    InvalidKeyRequest,
    KeyNotFound,
    KeyRevoked,
    KeyStore,
)
from sluice.store.database import Database
from sluice.store.migrations import upgrade

SECRET = b"test-secret-0123456789abcdef-0123456789"
START = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
async def db(url: str) -> AsyncIterator[Database]:
    database = await Database.connect(DatabaseConfig(url=url, pool_size=4))
    await upgrade(database)
    await database.execute("DELETE FROM api_keys")
    yield database
    await database.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(db: Database, clock: Clock) -> KeyStore:
    return KeyStore(db, SECRET, clock)


async def test_a_new_key_is_returned_once_and_found_by_lookup(store: KeyStore) -> None:
    key, record = await store.create(
        "team-search", models=["base", "sql-lora", "base"], tenant="acme", requests_per_minute=60, max_concurrency=4
    )
    assert key.startswith(KEY_PREFIX) and len(key) == len(KEY_PREFIX) + 43
    assert set(key[len(KEY_PREFIX) :]) <= set(string.ascii_letters + string.digits)
    assert record.id.startswith("k_") and record.prefix == key[:14] and record.created_at == START
    assert record.models == ("base", "sql-lora") and record.state(START) == "active"
    assert await store.lookup(key) == record == await store.get(record.id) == await store.get("team-search")

    principal = record.principal()
    assert principal.kind == "managed" and principal.subject == f"key:{record.id}" and principal.name == "team-search"
    assert principal.models == frozenset({"base", "sql-lora"}) and principal.tenant == "acme"
    assert principal.limits == Limits(requests_per_minute=60, tokens_per_minute=None, max_concurrency=4)
    assert "key" not in record.as_dict() and key not in str(record.as_dict()) and key not in repr(record)

    other, _ = await store.create("everything")
    assert other != key and (await store.get("everything")).principal().models is None


async def test_list_get_and_unknown_keys(store: KeyStore, clock: Clock) -> None:
    _, first = await store.create("first")
    clock.now += timedelta(seconds=1)
    _, second = await store.create("second")
    assert [r.id for r in await store.list()] == [first.id, second.id]
    for missing in ("nope", "k_0000000000", ""):
        with pytest.raises(KeyNotFound, match="no key"):
            await store.get(missing)


async def test_names_are_unique_among_live_keys(store: KeyStore) -> None:
    _, old = await store.create("alice")
    with pytest.raises(DuplicateName, match="alice"):
        await store.create("alice")
    await store.revoke("alice")
    _, new = await store.create("alice")
    assert (await store.get("alice")).id == new.id  # the live key wins over the revoked one
    assert (await store.get(old.id)).state() == "revoked"
    assert [r.id for r in await store.list()] == [new.id]
    assert {r.id for r in await store.list(include_revoked=True)} == {old.id, new.id}


async def test_racing_creates_of_one_name_leave_one_key(store: KeyStore) -> None:
    results = await asyncio.gather(*(store.create("racer") for _ in range(5)), return_exceptions=True)
    assert sum(isinstance(r, tuple) for r in results) == 1
    assert all(isinstance(r, (tuple, DuplicateName)) for r in results)


async def test_revoke(store: KeyStore, clock: Clock) -> None:
    key, record = await store.create("bob")
    clock.now += timedelta(minutes=5)
    revoked = await store.revoke(record.id)
    assert revoked.revoked_at == clock.now and revoked.state() == "revoked"
    found = await store.lookup(key)
    assert found == revoked, "revoked keys are still found, so the caller can say why they are refused"
    clock.now += timedelta(minutes=5)
    assert await store.revoke("bob") == revoked  # again: unchanged
    assert await store.list() == []


async def test_rotate_keeps_the_record_and_retires_the_old_key(store: KeyStore, clock: Clock) -> None:
    old_key, record = await store.create("carol", models=["base"], tokens_per_minute=1000)
    clock.now += timedelta(hours=1)
    new_key, rotated = await store.rotate("carol")
    assert new_key != old_key and rotated.prefix == new_key[:14] and rotated.rotated_at == clock.now
    assert (rotated.id, rotated.name, rotated.models, rotated.tokens_per_minute, rotated.created_at) == (
        record.id,
        "carol",
        ("base",),
        1000,
        record.created_at,
    )
    assert await store.lookup(old_key) is None
    assert await store.lookup(new_key) == rotated == await store.get(record.id)

    await store.revoke(record.id)
    with pytest.raises(KeyRevoked, match="revoked"):
        await store.rotate(record.id)


async def test_expiry(store: KeyStore, clock: Clock) -> None:
    key, record = await store.create("dave", expires_at=START + timedelta(hours=1))
    assert record.expires_at == START + timedelta(hours=1)
    found = await store.lookup(key)
    assert found is not None and found.state(clock.now) == "active"
    assert found.state(START + timedelta(hours=1)) == "expired"
    assert [r.id for r in await store.list()] == [record.id], "expired keys are listed until revoked"

    _, naive = await store.create("erin", expires_at=datetime(2027, 1, 31))
    assert naive.expires_at == datetime(2027, 1, 31, tzinfo=UTC)
    with pytest.raises(InvalidKeyRequest, match="not in the future"):
        await store.create("frank", expires_at=START - timedelta(seconds=1))


@pytest.mark.parametrize(
    ("name", "settings", "message"),
    [
        ("has space", {}, "invalid name"),
        ("", {}, "invalid name"),
        ("ok", {"models": []}, "at least one model"),
        ("ok", {"models": "base"}, "at least one model"),
        ("ok", {"requests_per_minute": 0}, "at least 1"),
    ],
)
async def test_invalid_settings_are_refused(
    store: KeyStore, name: str, settings: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidKeyRequest, match=message):
        await store.create(name, **settings)  # type: ignore[arg-type]


async def test_the_key_is_stored_only_as_a_keyed_digest(store: KeyStore, db: Database, tmp_path: Path) -> None:
    keys = [(await store.create(f"user-{i}", tenant="t"))[0] for i in range(3)]
    keys.append((await store.rotate("user-0"))[0])
    await store.revoke("user-1")

    row = await db.fetchrow("SELECT digest FROM api_keys WHERE prefix = $1", keys[-1][:14])
    assert row is not None
    assert bytes(row["digest"]) == hmac.new(SECRET, keys[-1].encode(), hashlib.sha256).digest()
    assert bytes(row["digest"]) != hashlib.sha256(keys[-1].encode()).digest()

    dump = await dump_tables(db)
    assert keys[-1][:14] in dump and "user-2" in dump  # the dump does see what is stored
    for key in keys:
        secret_part = key[len(KEY_PREFIX) :]
        for needle in (key, secret_part, secret_part[4:], secret_part[-16:]):
            assert needle not in dump
    if db.dialect == "sqlite":  # the file itself, write-ahead log included
        raw = b"".join(p.read_bytes() for p in tmp_path.glob("sluice.db*"))
        assert not any(key[len(KEY_PREFIX) + 4 :].encode() in raw for key in keys)


async def test_another_secret_finds_nothing(store: KeyStore, db: Database) -> None:
    key, _ = await store.create("grace")
    assert await KeyStore(db, b"another-secret-0123456789abcdef-xyz").lookup(key) is None
    for junk in (
        "",
        "sk-sluice-",
        key[:-1],
        key + "x",
        "Bearer " + key,
        key.replace("sk-sluice-", "sk-other-"),
        key[:-1] + "\udcff",
    ):
        assert await store.lookup(junk) is None
    with pytest.raises(ValueError, match="at least 32 bytes"):
        KeyStore(db, b"short")


async def dump_tables(db: Database) -> str:
    """Every value of every column of every table, as text (bytes also as hex)."""
    if db.dialect == "postgres":
        query = "SELECT table_name AS name FROM information_schema.tables WHERE table_schema = 'public'"
    else:
        query = "SELECT name FROM sqlite_master WHERE type = 'table'"
    parts = []
    for table in [r["name"] for r in await db.fetch(query)]:
        for row in await db.fetch(f'SELECT * FROM "{table}"'):
            for value in row.values():
                if isinstance(value, bytes | memoryview):
                    parts += [bytes(value).hex(), bytes(value).decode("latin-1")]
                else:
                    parts.append(str(value))
    assert parts, "nothing was dumped"
    return "\n".join(parts)
