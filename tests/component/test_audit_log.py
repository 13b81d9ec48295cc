"""The audit log through a real gateway, into real PostgreSQL and real SQLite: every request exactly once.

Each request kind the gateway answers (success, stream, each refusal and failure class, a client leaving)
is sent once, and its row is read back from the database with the fields it must hold.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from sluice.app import Gateway
from sluice.audit.record import COLUMNS
from sluice.audit.sink import insert
from sluice.config import DatabaseConfig
from sluice.store.database import Database
from sluice.store.migrations import upgrade
from tests.conftest import API_KEY, StartFake, StartGateway

BODIES_KEY = "sk-bodies-0123456789"
LIMITED_KEY = "sk-limited-0123456789"


@pytest.fixture(autouse=True)
def _info_logs(caplog: pytest.LogCaptureFixture) -> None:
    """Log records at INFO are built (a bad `extra` field only fails when a record is made)."""
    caplog.set_level(logging.INFO, logger="sluice")


@pytest.fixture
async def db(url: str) -> AsyncIterator[Database]:
    database = await Database.connect(DatabaseConfig(url=url))
    await upgrade(database)
    await database.execute("DELETE FROM requests")  # the PostgreSQL database is shared by the module's tests
    await database.execute("DELETE FROM usage_daily")
    yield database
    await database.close()


def audit_sections(url: str, tmp_path: Path, **audit: Any) -> dict[str, Any]:
    return {
        "database": {"url": url},
        "audit": {"journal_dir": str(tmp_path / "journal"), "flush_interval": 0.05, **audit},
        "auth": {
            "api_keys": [
                {"name": "test", "key": API_KEY, "tenant": "acme", "models": ["base", "sql-lora"]},
                {"name": "bodies", "key": BODIES_KEY, "log_bodies": True},
                {"name": "limited", "key": LIMITED_KEY, "requests_per_minute": 1},
            ]
        },
    }


async def rows_eventually(db: Database, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The `requests` rows once there are `count` of them (fails if more arrive or too few in time)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = await db.fetch("SELECT * FROM requests ORDER BY received_at")
        if len(rows) >= count or time.monotonic() > deadline:
            await asyncio.sleep(0.2)  # anything extra (a duplicate) would arrive now
            rows = await db.fetch("SELECT * FROM requests ORDER BY received_at")
            assert len(rows) == count, [(r["path"], r["status"]) for r in rows]
            return rows
        await asyncio.sleep(0.05)


async def post(gw: Gateway, path: str, key: str | None, body: Any, raw: bytes | None = None) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    async with aiohttp.ClientSession() as session:
        data = raw if raw is not None else orjson.dumps(body)
        async with session.post(gw.url + path, data=data, headers=headers) as response:
            return response.status, await response.read()


def chat(model: str = "base", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8, **extra}


async def test_every_request_is_recorded_once_with_its_fields(
    url: str, db: Database, tmp_path: Path, fake: StartFake, gateway: StartGateway
) -> None:
    backend = await fake("base", loras=["sql-lora", "other-lora"], tokens=5)
    gw = await gateway([backend], **audit_sections(url, tmp_path))
    sent: list[tuple[str, int]] = []

    async def expect(tag: str, status: int, path: str, key: str | None, body: Any, raw: bytes | None = None) -> None:
        got, _ = await post(gw, path, key, body, raw)
        assert got == status, tag
        sent.append((tag, status))

    await expect("ok", 200, "/v1/chat/completions", API_KEY, chat(user="alice"))
    await expect("lora", 200, "/v1/chat/completions", API_KEY, chat("sql-lora"))
    await expect("stream", 200, "/v1/chat/completions", API_KEY, chat(stream=True))
    await expect("completions", 200, "/v1/completions", API_KEY, {"model": "base", "prompt": "hi", "max_tokens": 4})
    await expect("bad-json", 400, "/v1/chat/completions", API_KEY, None, raw=b"{not json")
    await expect("no-key", 401, "/v1/chat/completions", None, chat())
    await expect("wrong-key", 401, "/v1/chat/completions", "sk-wrong-0123456789", chat())
    await expect("not-allowed", 403, "/v1/chat/completions", API_KEY, chat("other-lora"))
    await expect("unknown-model", 404, "/v1/chat/completions", BODIES_KEY, chat("no-such-model"))
    await expect("unknown-path", 404, "/v1/nothing-here", API_KEY, {})
    await expect("limited-1", 200, "/v1/chat/completions", LIMITED_KEY, chat())
    await expect("limited-2", 429, "/v1/chat/completions", LIMITED_KEY, chat())
    backend.settings.fail = "500"
    await expect("backend-500", 502, "/v1/chat/completions", API_KEY, chat())
    backend.settings.fail = None

    rows = await rows_eventually(db, len(sent))
    by_status: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        by_status.setdefault(row["status"], []).append(row)
    assert len({r["request_id"] for r in rows}) == len(rows)
    assert sorted(r["status"] for r in rows) == sorted(status for _, status in sent)
    for row in rows:
        assert isinstance(row["received_at"], datetime) and row["received_at"] <= row["finished_at"]
        assert row["latency_ms"] > 0 and row["method"] == "POST"

    ok = next(r for r in rows if r["user_id"] == "alice")
    assert ok["key_name"] == "test" and ok["key_id"] == "static:test" and ok["tenant"] == "acme"
    assert ok["model_requested"] == ok["model_served"] == "base" and ok["adapter"] is None
    assert ok["backend"] == "b0" and ok["route"] == "chat" and ok["attempts"] == 1 and not ok["stream"]
    assert ok["prompt_tokens"] > 0 and ok["completion_tokens"] == 8 and ok["error_type"] is None
    assert ok["client_ip"] == "127.0.0.1" and ok["prompt_body"] is None and ok["response_body"] is None

    lora = next(r for r in rows if r["model_requested"] == "sql-lora")
    assert lora["adapter"] == "sql-lora" and lora["status"] == 200

    stream = next(r for r in rows if r["stream"])
    assert stream["status"] == 200 and stream["completion_tokens"] == 8 and stream["ttft_ms"] > 0
    assert stream["received_at"] <= stream["first_token_at"] <= stream["finished_at"]

    errors = {r["status"]: r["error_type"] for r in rows if r["status"] >= 400 and r["status"] != 404}
    assert errors == {
        400: "invalid_json", 401: "invalid_api_key", 403: "model_not_allowed", 429: "rate_limit_exceeded",
        502: "bad_gateway",
    }  # fmt: skip
    not_found = sorted(r["error_type"] for r in by_status[404])
    assert not_found == ["model_not_found", "not_found"]
    refused = [r for r in rows if r["status"] == 401]
    assert all(r["key_id"] is None and r["backend"] is None for r in refused)
    limited = sorted((r["status"], r["rate_limit"]) for r in rows if r["key_name"] == "limited")
    assert limited == [(200, "allowed"), (429, "limited")]
    assert ok["rate_limit"] is None  # the key has no limits

    daily = await db.fetch("SELECT * FROM usage_daily")
    assert sum(d["requests"] for d in daily) == len(rows)
    assert sum(d["errors"] for d in daily) == sum(1 for r in rows if r["status"] >= 400)
    mine = next(d for d in daily if d["key_id"] == "static:test" and d["model"] == "base")
    assert mine["completion_tokens"] == sum(
        r["completion_tokens"] or 0 for r in rows if r["key_id"] == "static:test" and r["model_requested"] == "base"
    )


async def test_a_client_leaving_mid_stream_is_recorded_as_499(
    url: str, db: Database, tmp_path: Path, fake: StartFake, gateway: StartGateway
) -> None:
    backend = await fake("base", tokens=200, itl_ms=20)
    gw = await gateway([backend], **audit_sections(url, tmp_path))
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            gw.url + "/v1/chat/completions", json=chat(stream=True), headers={"Authorization": f"Bearer {API_KEY}"}
        )
        await response.content.readline()
        response.close()
    (row,) = await rows_eventually(db, 1)
    assert row["status"] == 499 and row["error_type"] == "client_closed" and row["stream"]


async def test_bodies_are_stored_only_for_keys_that_ask_and_capped(
    url: str, db: Database, tmp_path: Path, fake: StartFake, gateway: StartGateway
) -> None:
    backend = await fake("base", tokens=50)
    gw = await gateway([backend], **audit_sections(url, tmp_path, body_max_bytes=200))
    long_prompt = chat()
    long_prompt["messages"][0]["content"] = "x" * 1000
    assert (await post(gw, "/v1/chat/completions", BODIES_KEY, long_prompt))[0] == 200
    assert (await post(gw, "/v1/chat/completions", BODIES_KEY, chat(stream=True)))[0] == 200
    assert (await post(gw, "/v1/chat/completions", API_KEY, chat()))[0] == 200
    rows = await rows_eventually(db, 3)
    logged = [r for r in rows if r["key_name"] == "bodies"]
    assert all(r["prompt_body"] and len(r["prompt_body"].encode()) <= 200 for r in logged)
    assert logged[0]["prompt_body"].startswith('{"model":"base"')
    assert logged[0]["response_body"].startswith("{") and len(logged[0]["response_body"]) == 200
    assert logged[1]["response_body"].startswith("data: ")
    plain = next(r for r in rows if r["key_name"] == "test")
    assert plain["prompt_body"] is None and plain["response_body"] is None


async def test_audit_off_writes_nothing(tmp_path: Path, fake: StartFake, gateway: StartGateway) -> None:
    backend = await fake("base")
    url = f"sqlite:///{tmp_path}/off.db"
    gw = await gateway([backend], **audit_sections(url, tmp_path, enabled=False))
    assert (await post(gw, "/v1/chat/completions", API_KEY, chat()))[0] == 200
    assert gw.audit is None and not (tmp_path / "off.db").exists() and not (tmp_path / "journal").exists()


async def test_a_batch_written_twice_is_recorded_and_counted_once(db: Database) -> None:
    """What a replay does after an insert that timed out but committed, on both databases."""
    now = time.time() + 0.123456789  # microseconds that round and truncate differently
    base = dict.fromkeys(COLUMNS)
    base.update(method="POST", path="/v1/chat/completions", stream=False, status=200, latency_ms=10.0, attempts=1,
                key_id="key:k_1", model_requested="base", prompt_tokens=3, completion_tokens=4)  # fmt: skip
    records = [tuple({**base, "request_id": f"r{i}", "received_at": now + i / 7, "finished_at": now + 1}[c]
                     for c in COLUMNS) for i in range(50)]  # fmt: skip
    assert await insert(db, records) == 50
    assert await insert(db, records[10:] + records[:10]) == 0
    assert await db.fetchval("SELECT count(*) FROM requests") == 50
    (daily,) = await db.fetch("SELECT requests, prompt_tokens, completion_tokens FROM usage_daily")
    assert (daily["requests"], daily["prompt_tokens"], daily["completion_tokens"]) == (50, 150, 200)
