"""Usage reports from the audit log on real SQLite and real PostgreSQL: grouping, filters, the time window,
percentiles that agree across dialects, the daily roll-up, `sluice usage` and `GET /admin/usage`."""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from sluice.app import Gateway
from sluice.audit.usage import (
    DailyRow,
    InvalidWindow,
    UsageRow,
    daily_usage,
    days_overlapping,
    parse_since,
    percentile_cont,
    report_window,
    usage_report,
)
from sluice.cli import main
from sluice.config import DatabaseConfig
from sluice.identity.keys import KeyStore
from sluice.store.database import Database
from sluice.store.migrations import upgrade
from tests.conftest import API_KEY, StartFake, StartGateway

NOW = datetime(2026, 11, 10, 12, 0, tzinfo=UTC)
SINCE, UNTIL = NOW - timedelta(hours=24), NOW + timedelta(hours=1)
ADMIN = "admin-usage-0123456789"
SECRET = "usage-secret-0123456789abcdef-0123456789"
HEALTH = {"interval": 60, "timeout": 1, "discovery_interval": 60}
ALICE, BOB = ("key:k_alice", "alice"), ("static:bob", "bob")
INSERT = """
INSERT INTO requests (request_id, received_at, first_token_at, finished_at, key_id, key_name, method, path, route,
                      model_requested, stream, status, prompt_tokens, completion_tokens, ttft_ms, latency_ms, attempts)
VALUES ($1, $2, $3, $4, $5, $6, 'POST', '/v1/chat/completions', 'chat', $7, $8, $9, $10, $11, $12, $13, 1)
"""


@pytest.fixture
async def db(url: str) -> AsyncIterator[Database]:
    database = await empty_database(url)
    yield database
    await database.close()


async def empty_database(url: str) -> Database:
    database = await Database.connect(DatabaseConfig(url=url, pool_size=4, connect_timeout=2))
    await upgrade(database)
    for table in ("requests", "usage_daily", "api_keys"):
        await database.execute(f"DELETE FROM {table}")
    return database


async def insert(
    db: Database,
    caller: tuple[str | None, str | None] = ALICE,
    model: str | None = "base",
    *,
    at: datetime = NOW - timedelta(hours=1),
    status: int = 200,
    tokens: tuple[int | None, int | None] = (10, 5),
    latency: float = 100.0,
    ttft: float | None = None,
) -> None:
    first_token = None if ttft is None else at + timedelta(milliseconds=ttft)
    finished = at + timedelta(milliseconds=latency)
    request_id = f"req-{random.getrandbits(64):016x}"
    await db.execute(
        INSERT, request_id, at, first_token, finished, *caller, model, ttft is not None, status, *tokens, ttft, latency
    )


def row(
    caller: tuple[str | None, str | None], model: str | None, requests: int, errors: int, tokens: tuple[int, int]
) -> tuple[Any, ...]:
    return (*caller, model, requests, errors, *tokens)


def counts(rows: list[UsageRow]) -> list[tuple[Any, ...]]:
    return [(r.key_id, r.key_name, r.model, r.requests, r.errors, r.prompt_tokens, r.completion_tokens) for r in rows]


async def seed(db: Database) -> None:
    """alice: 3 on base (one 500, one 429, one without usage) and 1 on lora; bob: 2 on base; 1 refused anonymous."""
    await insert(db, ALICE, "base", latency=100, ttft=20)
    await insert(db, ALICE, "base", status=500, latency=300, tokens=(7, None))
    await insert(db, ALICE, "base", status=429, latency=200, tokens=(None, None))
    await insert(db, ALICE, "lora", latency=50, tokens=(1, 1), ttft=10)
    await insert(db, BOB, "base", latency=10)
    await insert(db, BOB, "base", latency=30, tokens=(20, 40))
    await insert(db, (None, None), None, status=401, latency=1, tokens=(None, None))


# ---- the report ----


async def test_requests_are_grouped_by_caller_and_model(db: Database) -> None:
    await seed(db)
    rows = await usage_report(db, since=SINCE, until=UNTIL)
    assert counts(rows) == [
        row((None, None), None, 1, 1, (0, 0)),
        row(ALICE, "base", 3, 2, (17, 5)),
        row(ALICE, "lora", 1, 0, (1, 1)),
        row(BOB, "base", 2, 0, (30, 45)),
    ]
    alice_base = rows[1]
    assert (alice_base.latency_p50_ms, alice_base.latency_p95_ms) == (200.0, 290.0)
    assert alice_base.latency_p99_ms == pytest.approx(298.0)
    assert alice_base.ttft_p50_ms == 20.0  # over the one request that had a first token
    assert rows[3].ttft_p50_ms is None


@pytest.mark.parametrize(
    ("key", "callers"),
    [
        ("alice", [ALICE]),  # the key's name
        ("k_alice", [ALICE]),  # a managed key's id
        ("key:k_alice", [ALICE]),  # its caller id
        ("static:bob", [BOB]),
        ("bob", [BOB]),
        ("nobody", []),
    ],
)
async def test_key_filter_takes_a_name_an_id_or_a_caller_id(db: Database, key: str, callers: list[Any]) -> None:
    await seed(db)
    rows = await usage_report(db, since=SINCE, until=UNTIL, key=key)
    assert sorted({(r.key_id, r.key_name) for r in rows}) == callers


async def test_model_filter_and_both_filters(db: Database) -> None:
    await seed(db)
    assert counts(await usage_report(db, since=SINCE, model="lora")) == [row(ALICE, "lora", 1, 0, (1, 1))]
    assert counts(await usage_report(db, since=SINCE, key="bob", model="base")) == [row(BOB, "base", 2, 0, (30, 45))]
    assert await usage_report(db, since=SINCE, key="bob", model="lora") == []


async def test_the_window_includes_since_and_excludes_until(db: Database) -> None:
    since, until = NOW - timedelta(hours=1), NOW
    for at, latency in (
        (since - timedelta(microseconds=1), 1),
        (since, 2),
        (until - timedelta(seconds=1), 3),
        (until, 4),
    ):
        await insert(db, at=at, latency=latency)
    [counted] = await usage_report(db, since=since, until=until)
    assert counted.requests == 2 and counted.latency_p50_ms == 2.5 and counted.latency_p99_ms == pytest.approx(2.99)
    assert [r.requests for r in await usage_report(db, since=since)] == [3]  # open-ended


async def test_percentiles_are_identical_on_both_dialects(tmp_path: Path, postgres_url: str) -> None:
    rng = random.Random(6)
    latencies = {size: [rng.randrange(1, 40_000) / 4 for _ in range(size)] for size in (1, 2, 7, 100, 101)}
    reports = []
    for url in (f"sqlite:///{tmp_path}/both.db", postgres_url):
        db = await empty_database(url)
        try:
            for size, values in latencies.items():
                for i, latency in enumerate(values):  # exact in PostgreSQL's `real`: multiples of 1/4
                    await insert(db, (f"key:k_{size}", str(size)), latency=latency, ttft=i % 3 * 1.5 or None)
            reports.append(await usage_report(db, since=SINCE))
        finally:
            await db.close()
    sqlite, postgres = reports
    assert sqlite == postgres  # the same floats, not just close ones
    by_size = {int(r.key_name or 0): r for r in sqlite}
    for size, values in latencies.items():
        ordered = sorted(values)
        assert by_size[size].latency_p50_ms == percentile_cont(ordered, 0.5)
        assert by_size[size].latency_p99_ms == percentile_cont(ordered, 0.99)
    assert by_size[1].latency_p95_ms == latencies[1][0] and by_size[1].ttft_p50_ms is None


def test_percentile_cont_interpolates_between_the_nearest_ranks() -> None:
    values = [10.0, 20.0, 30.0, 40.0]
    assert percentile_cont(values, 0.5) == 25.0
    assert percentile_cont(values, 0.95) == pytest.approx(38.5)
    assert percentile_cont(values, 0.0) == 10.0 and percentile_cont(values, 1.0) == 40.0
    assert percentile_cont([], 0.5) is None


# ---- the daily roll-up ----


async def test_daily_usage_by_day_key_and_model(db: Database) -> None:
    _, alice = await KeyStore(db, SECRET.encode()).create("alice")
    alice_id = f"key:{alice.id}"
    day = NOW.date()

    async def daily(on: date, key_id: str, model: str, requests: int) -> None:
        await db.execute(
            "INSERT INTO usage_daily VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            on if db.dialect == "postgres" else on.isoformat(),
            key_id,
            model,
            requests,
            1,
            requests * 10,
            requests * 2,
            requests * 50.0,
        )

    await daily(day - timedelta(days=2), alice_id, "base", 4)
    await daily(day - timedelta(days=1), alice_id, "base", 2)
    await daily(day - timedelta(days=1), "static:bob", "lora", 1)
    await daily(day, "", "", 3)
    days = await daily_usage(db, since=day - timedelta(days=1), until=day + timedelta(days=1))
    assert days == [
        DailyRow(day - timedelta(days=1), alice_id, "base", 2, 1, 20, 4, 50.0),
        DailyRow(day - timedelta(days=1), "static:bob", "lora", 1, 1, 10, 2, 50.0),
        DailyRow(day, None, None, 3, 1, 30, 6, 50.0),
    ]
    for key in ("alice", alice.id, alice_id):
        assert [d.requests for d in await daily_usage(db, since=day - timedelta(days=7), key=key)] == [4, 2]
    assert [d.key_id for d in await daily_usage(db, since=day - timedelta(days=7), key="bob")] == ["static:bob"]
    assert [d.day for d in await daily_usage(db, since=day - timedelta(days=7), until=day, model="base")] == [
        day - timedelta(days=2),
        day - timedelta(days=1),
    ]


# ---- reading windows ----


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30m", NOW - timedelta(minutes=30)),
        ("24h", NOW - timedelta(hours=24)),
        ("7d", NOW - timedelta(days=7)),
        ("2w", NOW - timedelta(weeks=2)),
        ("2026-11-01", datetime(2026, 11, 1, tzinfo=UTC)),
        ("2026-11-01T12:30:00", datetime(2026, 11, 1, 12, 30, tzinfo=UTC)),
        ("2026-11-01T12:30:00+02:00", datetime(2026, 11, 1, 10, 30, tzinfo=UTC)),
        ("2026-11-01T12:30:00Z", datetime(2026, 11, 1, 12, 30, tzinfo=UTC)),
    ],
)
def test_parse_since(text: str, expected: datetime) -> None:
    assert parse_since(text, NOW) == expected


@pytest.mark.parametrize("text", ["", "yesterday", "24", "h", "-1d", "3y", "2026-13-01", "99999999999w"])
def test_parse_since_refuses_with_the_accepted_forms(text: str) -> None:
    with pytest.raises(ValueError, match=r"30m, 24h, 7d or 2w .* 2026-11-01 .* 2026-11-01T12:00:00Z"):
        parse_since(text, NOW)


def test_report_window() -> None:
    assert report_window("24h", None, NOW) == (NOW - timedelta(hours=24), NOW)
    with pytest.raises(InvalidWindow) as bad_until:
        report_window("24h", "soon", NOW)
    assert bad_until.value.param == "until"
    with pytest.raises(InvalidWindow, match="empty") as empty:
        report_window("1h", "2h", NOW)
    assert empty.value.param == "since"
    assert days_overlapping(NOW - timedelta(days=2), NOW) == (date(2026, 11, 8), date(2026, 11, 11))
    assert days_overlapping(datetime(2026, 11, 8, tzinfo=UTC), datetime(2026, 11, 10, tzinfo=UTC)) == (
        date(2026, 11, 8),
        date(2026, 11, 10),
    )


# ---- sluice usage ----


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    """A configuration whose SQLite database holds the seeded rows and one daily row."""

    async def prepare() -> None:
        db = await empty_database(f"sqlite:///{tmp_path}/cli.db")
        try:
            await seed(db)
            await db.execute("INSERT INTO usage_daily VALUES ('2026-11-10', 'key:k_alice', 'base', 3, 2, 17, 5, 600.0)")
        finally:
            await db.close()

    asyncio.run(prepare())
    return write_config(tmp_path, f"sqlite:///{tmp_path}/cli.db")


def write_config(folder: Path, url: str) -> Path:
    path = folder / "sluice.yaml"
    path.write_text(
        f"backends: [{{name: b, url: 'http://127.0.0.1:9'}}]\ndatabase: {{url: '{url}', connect_timeout: 1}}\n"
    )
    return path


WINDOW = ["--since", SINCE.isoformat(), "--until", UNTIL.isoformat()]


def test_cli_prints_an_aligned_table(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["usage", "--config", str(config_file), *WINDOW]) == 0
    title, blank, header, *lines = capsys.readouterr().out.splitlines()
    assert title == "Requests from 2026-11-09 12:00:00 UTC to 2026-11-10 13:00:00 UTC" and blank == ""
    assert re.split(r"\s{2,}", header) == [
        *("KEY", "ID", "MODEL", "REQUESTS", "ERRORS", "PROMPT", "COMPLETION"),
        *("P50 MS", "P95 MS", "P99 MS", "TTFT P50"),
    ]
    assert len(lines) == 4
    column = header.index("REQUESTS")
    by_key = {line.split()[0] + "/" + line.split()[2]: line for line in lines}
    assert by_key["alice/base"][column:].split()[:4] == ["3", "2", "17", "5"]
    assert by_key["bob/base"][column:].split()[:4] == ["2", "0", "30", "45"]
    assert by_key["-/-"][column:].split()[:2] == ["1", "1"]
    assert by_key["alice/base"][header.index("P50 MS") :].split()[0] == "200.0"


def test_cli_json_and_filters(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["usage", "--config", str(config_file), *WINDOW, "--key", "k_alice", "--model", "base", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["object"] == "list"
    assert (document["since"], document["until"]) == (SINCE.isoformat(), UNTIL.isoformat())
    [alice] = document["data"]
    assert alice["key_name"] == "alice" and alice["requests"] == 3 and alice["latency_p95_ms"] == 290.0

    assert main(["usage", "--config", str(config_file), *WINDOW, "--daily", "--json"]) == 0
    daily = json.loads(capsys.readouterr().out)
    assert (daily["since"], daily["until"]) == ("2026-11-09", "2026-11-11")
    assert daily["data"] == [
        {
            "day": "2026-11-10",
            "key_id": "key:k_alice",
            "model": "base",
            "requests": 3,
            "errors": 2,
            "prompt_tokens": 17,
            "completion_tokens": 5,
            "latency_mean_ms": 200.0,
        }
    ]
    assert main(["usage", "--config", str(config_file), *WINDOW, "--daily"]) == 0
    assert capsys.readouterr().out.splitlines()[3].split() == [
        "2026-11-10",
        "key:k_alice",
        "base",
        "3",
        "2",
        "17",
        "5",
        "200.0",
    ]
    assert main(["usage", "--config", str(config_file), "--since", "2020-01-01", "--until", "2020-01-02"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "No requests in this window."


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--since", "yesterday"], "sluice usage: --since: 'yesterday' is not a time; use 30m, 24h, 7d or 2w"),
        (["--until", "soon"], "sluice usage: --until: 'soon' is not a time"),
        (["--since", "1h", "--until", "2h"], "sluice usage: --since: "),
    ],
)
def test_cli_refuses_a_bad_window_in_one_line(
    tmp_path: Path, arguments: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, f"sqlite:///{tmp_path}/never-opened.db")
    assert main(["usage", "--config", str(config), *arguments]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(message) and captured.err.count("\n") == 1
    assert not (tmp_path / "never-opened.db").exists()


def test_cli_reports_an_unreachable_database_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, "postgresql://sluice:hunter2@127.0.0.1:9/audit")
    assert main(["usage", "--config", str(config)]) == 1  # keys_cli's convention: 1 when the database fails
    captured = capsys.readouterr()
    assert captured.err.startswith("sluice usage: cannot use the database at postgresql://sluice:***@127.0.0.1:9/audit")
    assert captured.err.count("\n") == 1 and "hunter2" not in captured.err and "Traceback" not in captured.err


# ---- GET /admin/usage ----


async def get(gw: Gateway, path: str, key: str = ADMIN, method: str = "GET") -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, gw.url + path, headers={"Authorization": f"Bearer {key}"}) as response,
    ):
        return response.status, orjson.loads(await response.read() or b"null")


async def test_admin_usage_endpoint(tmp_path: Path, fake: StartFake, gateway: StartGateway) -> None:
    url = f"sqlite:///{tmp_path}/gateway.db"
    db = await empty_database(url)
    try:
        await seed(db)
    finally:
        await db.close()
    gw = await gateway(
        [await fake("base")],
        health=HEALTH,
        auth={"api_keys": [{"name": "static", "key": API_KEY}], "admin_key": ADMIN, "key_secret": SECRET},
        database={"url": url},
        audit={"journal_dir": str(tmp_path / "journal")},
    )
    window = f"since={SINCE.isoformat()}&until={UNTIL.isoformat()}".replace("+", "%2B")

    status, document = await get(gw, f"/admin/usage?{window}")
    assert status == 200, document
    assert document["object"] == "list" and document["since"] == SINCE.isoformat()
    assert [(r["key_name"], r["model"], r["requests"]) for r in document["data"]] == [
        (None, None, 1),
        ("alice", "base", 3),
        ("alice", "lora", 1),
        ("bob", "base", 2),
    ]
    status, filtered = await get(gw, f"/admin/usage?{window}&key=alice&model=base")
    assert status == 200 and [(r["key_id"], r["latency_p50_ms"]) for r in filtered["data"]] == [("key:k_alice", 200.0)]
    status, daily = await get(gw, f"/admin/usage?{window}&daily=1")
    assert status == 200 and (daily["since"], daily["until"], daily["data"]) == ("2026-11-09", "2026-11-11", [])
    status, recent = await get(gw, "/admin/usage")  # the last 24 hours, up to now
    since, until = datetime.fromisoformat(recent["since"]), datetime.fromisoformat(recent["until"])
    assert status == 200 and until - since == timedelta(hours=24)

    status, error = await get(gw, "/admin/usage?since=yesterday")
    assert status == 400 and error["error"]["param"] == "since" and "30m, 24h, 7d or 2w" in error["error"]["message"]
    status, error = await get(gw, "/admin/usage?days=7")
    assert status == 400 and "key, model, since, until, daily" in error["error"]["message"]
    assert (await get(gw, "/admin/usage?daily=maybe"))[0] == 400
    assert (await get(gw, "/admin/usage?key=a&key=b"))[0] == 400
    status, error = await get(gw, "/admin/usage", method="POST")
    assert status == 405 and error["error"]["code"] == "method_not_allowed"
    assert (await get(gw, "/admin/usage", key=API_KEY))[0] == 401  # API keys are not admin


async def test_admin_usage_without_a_database(tmp_path: Path, fake: StartFake, gateway: StartGateway) -> None:
    gw = await gateway(
        [await fake("base")],
        health=HEALTH,
        auth={"api_keys": [{"name": "static", "key": API_KEY}], "admin_key": ADMIN},
        audit={"enabled": False, "journal_dir": str(tmp_path / "journal")},
    )
    status, error = await get(gw, "/admin/usage")
    assert status == 503 and "audit" in error["error"]["message"] and "database" in error["error"]["message"]


async def test_a_caller_sees_its_own_usage_and_nobody_elses(
    tmp_path: Path, fake: StartFake, gateway: StartGateway
) -> None:
    url = f"sqlite:///{tmp_path}/gateway.db"
    db = await empty_database(url)
    try:
        await seed(db)
        # A token whose subject imitates bob's caller id: a looser match on names would hand it bob's rows.
        await insert(db, ("jwt:https://idp.example:static:bob", "static:bob"), "base", latency=5)
    finally:
        await db.close()
    gw = await gateway(
        [await fake("base")],
        health=HEALTH,
        auth={"api_keys": [{"name": "bob", "key": API_KEY}], "admin_key": ADMIN, "key_secret": SECRET},
        database={"url": url},
        audit={"journal_dir": str(tmp_path / "journal")},
    )
    window = f"since={SINCE.isoformat()}&until={UNTIL.isoformat()}".replace("+", "%2B")

    status, own = await get(gw, f"/v1/usage?{window}", key=API_KEY)
    assert status == 200, own
    assert [(r["key_id"], r["model"], r["requests"]) for r in own["data"]] == [("static:bob", "base", 2)]
    status, everyone = await get(gw, f"/admin/usage?{window}")  # the operator sees the impostor's row too
    assert status == 200 and len(everyone["data"]) == 5
    status, error = await get(gw, f"/v1/usage?{window}&key=alice", key=API_KEY)
    assert status == 400 and error["error"]["param"] == "key"  # no parameter widens a caller's report
    status, daily = await get(gw, f"/v1/usage?{window}&daily=1&model=base", key=API_KEY)
    assert status == 200 and daily["data"] == []
    assert (await get(gw, "/v1/usage", key="sk-not-a-key-000000"))[0] == 401
    assert (await get(gw, "/v1/usage"))[0] == 401  # the admin key is not an API key
