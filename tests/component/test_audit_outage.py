"""The audit log when PostgreSQL goes away: requests keep succeeding, and every record lands exactly once.

A throwaway PostgreSQL server (tests/postgres_server.py) is stopped and restarted under a real
`sluice serve` process; the gateway is also SIGKILLed while records wait in its journal, and restarted.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from sluice.testing.fake_vllm import FakeVLLM
from tests.conftest import API_KEY, StartFake, free_port
from tests.postgres_server import PostgresServer

CHAT = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture
def postgres() -> Iterator[PostgresServer]:
    with PostgresServer() as server:
        yield server


class ServedGateway:
    """A `sluice serve` process over a config file; restartable with the same config (and journal folder)."""

    def __init__(self, tmp_path: Path, backend: FakeVLLM, database_url: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = tmp_path / "sluice.yaml"
        self.journal = tmp_path / "journal"
        self.config.write_text(
            f"server: {{host: 127.0.0.1, port: {self.port}}}\n"
            f"backends:\n  - {{name: b0, url: '{backend.url}'}}\n"
            f"auth: {{api_keys: [{{name: test, key: {API_KEY}}}]}}\n"
            f"database: {{url: '{database_url}', connect_timeout: 1}}\n"
            f"audit: {{journal_dir: '{self.journal}', flush_interval: 0.05, write_timeout: 1, retry_interval: 0.3}}\n"
            "logging: {level: warning}\n"
        )
        self.process: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "sluice", "serve", "--config", str(self.config)])
        async with aiohttp.ClientSession() as session:
            for _ in range(200):
                try:
                    async with session.get(self.url + "/ready") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise AssertionError("the gateway did not become ready")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)
        self.process = None

    def terminate(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(30)
            self.process = None

    def rss_kib(self) -> int:
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    async def counter(self, outcome: str) -> float:
        async with aiohttp.ClientSession() as session, session.get(self.url + "/metrics") as response:
            text = await response.text()
        prefix = f'sluice_audit_records_total{{outcome="{outcome}"}} '
        return next(float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix))


@pytest.fixture
async def served(tmp_path: Path, fake: StartFake, postgres: PostgresServer) -> AsyncIterator[ServedGateway]:
    gateway = ServedGateway(tmp_path, await fake("base", tokens=4), postgres.url)
    yield gateway
    gateway.terminate()


async def send(gateway: ServedGateway, count: int, concurrency: int = 20) -> list[str]:
    """`count` chat completions; returns their request ids (all must succeed)."""
    ids: list[str] = []
    headers = {"Authorization": f"Bearer {API_KEY}"}
    todo = iter(range(count))
    async with aiohttp.ClientSession() as session:

        async def client() -> None:
            for _ in todo:
                async with session.post(gateway.url + "/v1/chat/completions", json=CHAT, headers=headers) as response:
                    assert response.status == 200, await response.text()
                    ids.append(response.headers["x-request-id"])
                    await response.read()

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return ids


async def rows_eventually(url: str, ids: list[str], timeout: float = 30.0) -> None:
    """Every id in `ids` is in `requests` exactly once, and nothing else is, within `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            connection = await asyncpg.connect(url, timeout=2)
            try:
                rows = await connection.fetch("SELECT request_id FROM requests")
                total = await connection.fetchval("SELECT coalesce(sum(requests), 0) FROM usage_daily")
            finally:
                await connection.close()
        except (OSError, asyncpg.PostgresError):
            rows, total = [], 0
        found = [r["request_id"] for r in rows]
        if len(found) >= len(ids) or time.monotonic() > deadline:
            assert len(found) == len(set(found)), "a request was recorded twice"
            assert sorted(found) == sorted(ids), f"{len(found)} rows for {len(ids)} requests"
            assert total == len(ids), "the daily roll-up counts every request once"
            return
        await asyncio.sleep(0.2)


async def in_thread(step: object) -> None:
    await asyncio.to_thread(step)  # type: ignore[arg-type]


async def test_postgres_stopped_mid_run_loses_nothing(postgres: PostgresServer, served: ServedGateway) -> None:
    await served.start()
    first = await send(served, 300)
    await in_thread(postgres.stop)
    during = await send(served, 700)  # every request still succeeds
    assert await served.counter("journaled") > 0
    await in_thread(postgres.start)
    await rows_eventually(postgres.url, first + during)
    assert await served.counter("replayed") >= await served.counter("journaled")  # all journaled came back


async def test_gateway_killed_with_records_in_its_journal_replays_them_after_restart(
    postgres: PostgresServer, served: ServedGateway
) -> None:
    await served.start()
    first = await send(served, 200)
    await in_thread(postgres.stop)
    waiting = await send(served, 800)
    for _ in range(100):  # every record is in the database or on disk, none left in memory
        if await served.counter("written") + await served.counter("journaled") >= 1000:
            break
        await asyncio.sleep(0.05)
    assert await served.counter("journaled") >= 800
    served.kill()
    assert any(served.journal.rglob("seg-*.jsonl")), "the records wait in the journal"
    await in_thread(postgres.start)
    await served.start()  # a new process: adopts the dead one's journal and replays it
    await rows_eventually(postgres.url, first + waiting)
    later = await send(served, 50)
    await rows_eventually(postgres.url, first + waiting + later)
    assert not any(served.journal.rglob("seg-*.jsonl"))


async def test_memory_stays_flat_while_the_database_is_down(postgres: PostgresServer, served: ServedGateway) -> None:
    await served.start()
    await in_thread(postgres.stop)
    await send(served, 1000)  # warm up: connections, buffers, the journal's first segment
    before = served.rss_kib()
    ids = await send(served, 10_000, concurrency=50)
    after = served.rss_kib()
    growth_mib = (after - before) / 1024
    assert growth_mib < 8, f"RSS grew by {growth_mib:.1f} MiB over 10,000 requests with the database down"
    journal_bytes = sum(f.stat().st_size for f in served.journal.rglob("seg-*.jsonl"))
    assert journal_bytes > 10_000 * 200, "the records went to disk, not to memory"
    await in_thread(postgres.start)
    assert len(ids) == 10_000
    assert os.path.isdir(served.journal)
