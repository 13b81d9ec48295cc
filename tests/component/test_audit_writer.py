"""The audit writer's degraded modes through a real gateway: a slow database, a database never seen, and
no room left anywhere (`audit.on_full`)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from sluice.app import Gateway
from tests.conftest import API_KEY, StartFake, StartGateway, eventually, free_port
from tests.postgres_server import throwaway_postgres

CHAT = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture(autouse=True)
def _info_logs(caplog: pytest.LogCaptureFixture) -> None:
    """Log records at INFO are built (a bad `extra` field only fails when a record is made)."""
    caplog.set_level(logging.INFO, logger="sluice")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    with throwaway_postgres() as url:
        yield url


async def chat(gw: Gateway, session: aiohttp.ClientSession) -> int:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with session.post(gw.url + "/v1/chat/completions", json=CHAT, headers=headers) as response:
        await response.read()
        return response.status



async def test_a_slow_database_sends_records_to_the_journal_then_gets_them_once(
    postgres_url: str, tmp_path: Path, fake: StartFake, gateway: StartGateway
) -> None:
    audit = {"journal_dir": str(tmp_path / "journal"), "flush_interval": 0.05, "write_timeout": 0.5,
             "retry_interval": 0.2}  # fmt: skip
    gw = await gateway([await fake("base")], database={"url": postgres_url}, audit=audit)
    assert gw.audit is not None
    blocker = await asyncpg.connect(postgres_url)
    async with aiohttp.ClientSession() as session:
        assert await chat(gw, session) == 200
        await eventually(lambda: gw.audit.counts["written"] == 1)  # type: ignore[union-attr]
        transaction = blocker.transaction()
        await transaction.start()
        await blocker.execute("LOCK TABLE requests IN ACCESS EXCLUSIVE MODE")  # inserts now hang
        started = time.monotonic()
        statuses = [await chat(gw, session) for _ in range(20)]
        assert statuses == [200] * 20 and time.monotonic() - started < 5  # requests never wait for the log
        await eventually(lambda: gw.audit.counts["journaled"] >= 20)  # type: ignore[union-attr]
        await transaction.rollback()  # the database is fast again
        await eventually(lambda: gw.audit.database_up and not gw.audit.journal.pending)  # type: ignore[union-attr]
        assert await chat(gw, session) == 200
    await eventually(lambda: gw.audit.counts["written"] >= 2)  # type: ignore[union-attr]
    ids = [r["request_id"] for r in await blocker.fetch("SELECT request_id FROM requests")]
    await blocker.close()
    assert len(ids) == len(set(ids)) == 22


async def test_a_database_down_at_start_up_is_connected_later(
    postgres_url: str, tmp_path: Path, fake: StartFake, gateway: StartGateway
) -> None:
    """The gateway starts and serves with no database; the records wait on disk until it can connect."""
    closed = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    audit = {"journal_dir": str(tmp_path / "journal"), "flush_interval": 0.05, "retry_interval": 0.2}
    gw = await gateway([await fake("base")], database={"url": closed, "connect_timeout": 0.5}, audit=audit)
    assert gw.audit is not None and gw.audit.database is None
    async with aiohttp.ClientSession() as session:
        assert [await chat(gw, session) for _ in range(10)] == [200] * 10
    await eventually(lambda: gw.audit.counts["journaled"] == 10)  # type: ignore[union-attr]
    await gw.close()
    # The next gateway (another replica, or this one restarted) has a database: it takes over the journal.
    gw = await gateway([await fake("base")], database={"url": postgres_url}, audit=audit)
    await eventually(lambda: gw.audit.counts["replayed"] == 10)  # type: ignore[union-attr]
    connection = await asyncpg.connect(postgres_url)
    assert await connection.fetchval("SELECT count(DISTINCT request_id) FROM requests") == 10
    await connection.close()


@pytest.mark.parametrize("policy", ["reject", "drop"])
async def test_no_room_for_records_follows_on_full(
    policy: str, tmp_path: Path, fake: StartFake, gateway: StartGateway
) -> None:
    """Database down and the journal at its size limit: `reject` answers 503, `drop` serves and counts."""
    closed = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    audit = {"journal_dir": str(tmp_path / "journal"), "journal_max_bytes": 1024 * 1024, "queue_size": 100,
             "batch_size": 50, "flush_interval": 0.01, "retry_interval": 0.05, "on_full": policy}  # fmt: skip
    gw = await gateway([await fake("base")], database={"url": closed, "connect_timeout": 0.5}, audit=audit)
    writer = gw.audit
    assert writer is not None
    statuses: list[int] = []
    async with aiohttp.ClientSession() as session:

        def journal_full_long_enough() -> bool:
            # Not a fixed count: on a slow disk the queue also fills for a moment while the journal syncs
            # (a 503 under `reject` too), so run until the journal is full, the queue behind it too (which
            # lasts: nothing drains it), and the policy has acted 20 times.
            if not writer.journal_failing:
                return False
            if policy == "reject":
                return writer.saturated and writer.counts["rejected"] >= 20
            return writer.counts["dropped"] >= 20

        async def client() -> None:
            while len(statuses) < 30_000 and not journal_full_long_enough():
                statuses.append(await chat(gw, session))

        await asyncio.gather(*(client() for _ in range(8)))
        assert writer.journal_failing and writer.journal.pending_bytes <= 1024 * 1024
        assert len(writer.queue) <= 100 + 8  # bounded: the queue plus the requests that were in flight
        if policy == "reject":
            assert statuses.count(503) >= 20 and writer.counts["rejected"] >= 20 and writer.counts["dropped"] == 0
            async with session.get(gw.url + "/health") as response:
                assert response.status == 200  # health and metrics stay available
            headers = {"Authorization": f"Bearer {API_KEY}"}
            async with session.post(gw.url + "/v1/chat/completions", json=CHAT, headers=headers) as response:
                body = await response.json()
                assert response.status == 503 and response.headers["retry-after"]
                assert body["error"]["code"] == "audit_log_full"
        else:
            assert 503 not in statuses and writer.counts["dropped"] > 0
        async with session.get(gw.url + "/metrics") as response:
            text = await response.text()
    counted = "rejected" if policy == "reject" else "dropped"
    assert f'sluice_audit_records_total{{outcome="{counted}"}} {float(writer.counts[counted])}' in text
    assert "sluice_audit_database_up 0.0" in text


async def test_a_record_the_database_refuses_goes_to_the_dead_letter_file_and_blocks_nothing(
    postgres_url: str, tmp_path: Path, fake: StartFake, gateway: StartGateway
) -> None:
    audit = {"journal_dir": str(tmp_path / "journal"), "flush_interval": 0.2}
    gw = await gateway([await fake("base")], database={"url": postgres_url}, audit=audit)
    connection = await asyncpg.connect(postgres_url)
    await connection.execute("ALTER TABLE requests ADD CONSTRAINT no_mallory CHECK (user_id <> 'mallory')")
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with aiohttp.ClientSession() as session:
        for user in ["alice", "mallory", "nul\x00byte", "bob"]:
            body = {**CHAT, "user": user}
            async with session.post(gw.url + "/v1/chat/completions", json=body, headers=headers) as response:
                assert response.status == 200
    assert gw.audit is not None
    await eventually(lambda: gw.audit.counts["invalid"] == 1)  # type: ignore[union-attr]
    deadline = time.monotonic() + 10
    while await connection.fetchval("SELECT count(*) FROM requests") < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # the last records may be in a later batch
    users = sorted(r["user_id"] for r in await connection.fetch("SELECT user_id FROM requests"))
    await connection.close()
    assert users == ["alice", "bob", "nul\ufffdbyte"]  # PostgreSQL text cannot hold NUL: replaced, not refused
    (line,) = (tmp_path / "journal" / "invalid.jsonl").read_bytes().splitlines()
    assert b'"mallory"' in line and gw.audit.database_up


async def test_a_database_refusing_every_record_is_treated_as_unavailable(
    postgres_url: str, tmp_path: Path, fake: StartFake, gateway: StartGateway
) -> None:
    """Read-only after a failover, say: the records wait in the journal and arrive once it takes them."""
    audit = {"journal_dir": str(tmp_path / "journal"), "flush_interval": 0.2, "retry_interval": 0.2}
    gw = await gateway([await fake("base")], database={"url": postgres_url}, audit=audit)
    assert gw.audit is not None
    connection = await asyncpg.connect(postgres_url)
    await connection.execute(
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "RAISE EXCEPTION 'cannot execute INSERT in a read-only transaction'; END $$"
    )
    await connection.execute("CREATE TRIGGER refuse BEFORE INSERT ON requests FOR EACH ROW EXECUTE FUNCTION refuse()")
    async with aiohttp.ClientSession() as session:
        for _ in range(5):  # one record per batch: each refused alone, none for its data
            assert await chat(gw, session) == 200
            await asyncio.sleep(0.3)
        await eventually(lambda: gw.audit.counts["journaled"] == 5)  # type: ignore[union-attr]
        assert gw.audit.counts["invalid"] == 0 and not (tmp_path / "journal" / "invalid.jsonl").exists()
        await connection.execute("DROP TRIGGER refuse ON requests")  # writable again
        await eventually(lambda: gw.audit.counts["replayed"] == 5)  # type: ignore[union-attr]
    assert await connection.fetchval("SELECT count(DISTINCT request_id) FROM requests") == 5
    await connection.close()


async def test_shutdown_writes_what_is_still_queued(
    postgres_url: str, tmp_path: Path, fake: StartFake, gateway: StartGateway
) -> None:
    audit = {"journal_dir": str(tmp_path / "journal"), "flush_interval": 60}  # nothing written before close
    gw = await gateway([await fake("base")], database={"url": postgres_url}, audit=audit)
    async with aiohttp.ClientSession() as session:
        assert [await chat(gw, session) for _ in range(10)] == [200] * 10
    assert gw.audit is not None and len(gw.audit.queue) == 10
    await gw.close()
    connection = await asyncpg.connect(postgres_url)
    assert await connection.fetchval("SELECT count(DISTINCT request_id) FROM requests") == 10
    await connection.close()
