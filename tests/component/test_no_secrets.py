"""No secret leaves the gateway: after a run with known credentials, none of them appears in its logs, its
metrics, its error answers, the database (audit rows, usage, key store), the audit journal or Redis.

`sluice serve` runs as a real process at log level debug with the access log on, the audit log in a fresh
PostgreSQL database (its URL carries a password, which trust authentication ignores), rate limits and the
response cache in Redis. The traffic covers success, streams, wrong and near-miss keys, refused admin
calls, a managed key created, rotated and revoked, a configuration reload, rate-limit refusals, a failing
backend and malformed requests. Each secret is searched for whole and by its distinctive middle part.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis

from tests.component.test_cli_serve import wait_http
from tests.conftest import free_port
from tests.postgres_server import throwaway_postgres

REDIS = "redis://127.0.0.1:6379/0"


def secret(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(16)}"


@pytest.fixture
def database() -> Iterator[str]:
    with throwaway_postgres() as url:
        yield url


class Secrets(dict[str, str]):
    def leaks(self, where: str, text: str) -> list[str]:
        """Every secret found in `text`, whole or by the 16 characters after its prefix."""
        found = []
        for name, value in self.items():
            middle = value[-32:-16]
            if value in text or middle in text:
                found.append(f"{name} in {where}")
        return found


async def test_no_secret_in_logs_metrics_errors_database_journal_or_redis(tmp_path: Path, database: str) -> None:
    known = Secrets(
        api_key=secret("sk-static-"),
        admin_key=secret("admin-"),
        key_secret=secret("hmac-"),
        upstream_key=secret("vllm-"),
        db_password=secret("pw"),
        wrong_key=secret("sk-wrong-"),  # a caller's mistyped (or another service's) key is a secret too
    )
    prefix = f"sluice-test-secrets-{secrets.token_hex(4)}:"
    database_url = database.replace("postgresql://postgres@", f"postgresql://postgres:{known['db_password']}@")
    fake_port, failing_port, port = free_port(), free_port(), free_port()
    config = tmp_path / "sluice.yaml"
    config.write_text(
        json.dumps(
            {
                "server": {"host": "127.0.0.1", "port": port},
                "backends": [
                    {"name": "good", "url": f"http://127.0.0.1:{fake_port}", "api_key": "${UPSTREAM_KEY}"},
                    {"name": "bad", "url": f"http://127.0.0.1:{failing_port}", "api_key": "${UPSTREAM_KEY}"},
                ],
                "auth": {
                    "api_keys": [
                        {"name": "static", "key": "${API_KEY}", "requests_per_minute": 1200, "log_bodies": True}
                    ],
                    "admin_key": "${ADMIN_KEY}",
                    "key_secret": "${KEY_SECRET}",
                },
                "database": {"url": "${DATABASE_URL}"},
                "redis": {"url": REDIS, "key_prefix": prefix},
                "audit": {"journal_dir": str(tmp_path / "journal"), "flush_interval": 0.05},
                "cache": {"enabled": True, "store": "redis", "semantic": {"enabled": False}},
                "logging": {"level": "debug", "format": "json", "access_log": True},
            }
        )
    )
    env = {
        **os.environ,
        "API_KEY": known["api_key"],
        "ADMIN_KEY": known["admin_key"],
        "KEY_SECRET": known["key_secret"],
        "UPSTREAM_KEY": known["upstream_key"],
        "DATABASE_URL": database_url,
    }
    fakes = [
        subprocess.Popen([sys.executable, "-m", "sluice", "fake-vllm", "--port", str(fake_port), "--model", "base"]),
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sluice",
                "fake-vllm",
                "--port",
                str(failing_port),
                "--model",
                "broken",
                "--fail",
                "500",
            ]
        ),
    ]
    log_path = tmp_path / "gateway.log"
    log = log_path.open("wb")
    gateway = subprocess.Popen(
        [sys.executable, "-m", "sluice", "serve", "--config", str(config)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    answers: list[str] = []
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"http://127.0.0.1:{fake_port}/health")
        wait_http(f"{base}/ready", timeout=30)

        async with aiohttp.ClientSession() as client:

            async def call(method: str, path: str, key: str | None, body: Any = None, raw: bytes | None = None) -> Any:
                headers = {"Authorization": f"Bearer {key}"} if key else {}
                data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
                async with client.request(method, base + path, data=data, headers=headers) as response:
                    text = await response.text()
                    if response.status >= 400:
                        answers.append(text)
                        answers.append(json.dumps(dict(response.headers)))
                    return response.status, text

            chat = {"model": "base", "messages": [{"role": "user", "content": "hello"}], "temperature": 0}
            key = known["api_key"]
            assert (await call("POST", "/v1/chat/completions", key, chat))[0] == 200
            assert (await call("POST", "/v1/chat/completions", key, chat))[0] == 200  # a cache hit
            status, stream = await call("POST", "/v1/chat/completions", key, {**chat, "stream": True})
            assert status == 200 and "[DONE]" in stream
            assert (await call("POST", "/v1/chat/completions", known["wrong_key"], chat))[0] == 401
            assert (await call("POST", "/v1/chat/completions", key[:-1] + "x", chat))[0] == 401  # near miss
            assert (await call("POST", "/v1/chat/completions", key, {**chat, "model": "broken"}))[0] >= 500
            assert (await call("POST", "/v1/chat/completions", key, {**chat, "model": "nope"}))[0] == 404
            assert (await call("POST", "/v1/chat/completions", key, raw=b'{"model": '))[0] == 400
            assert (await call("GET", "/admin/keys", key))[0] in (401, 403)  # an API key is not an admin key
            assert (await call("GET", "/admin/keys", known["wrong_key"]))[0] in (401, 403)

            admin = known["admin_key"]
            status, created = await call("POST", "/admin/keys", admin, {"name": "team-a"})
            assert status == 201
            known["managed_key"] = json.loads(created)["key"]
            assert known.leaks("control", created) == ["managed_key in control"]  # the search does find a key
            assert (await call("POST", "/v1/chat/completions", known["managed_key"], chat))[0] == 200
            status, rotated = await call("POST", "/admin/keys/team-a/rotate", admin)
            assert status == 200
            known["rotated_key"] = json.loads(rotated)["key"]
            assert (await call("POST", "/v1/chat/completions", known["managed_key"], chat))[0] == 401  # old one
            assert (await call("POST", "/v1/chat/completions", known["rotated_key"], chat))[0] == 200
            assert (await call("POST", "/admin/keys/team-a/revoke", admin))[0] == 200
            assert (await call("POST", "/v1/chat/completions", known["rotated_key"], chat))[0] == 401
            assert (await call("POST", "/admin/reload", admin))[0] == 200
            statuses = [(await call("POST", "/v1/chat/completions", key, chat))[0] for _ in range(80)]
            assert 429 in statuses  # 20 a second, with a burst of 20
            status, metrics = await call("GET", "/metrics", None)
            assert status == 200
            answers.append(metrics)
            await asyncio.sleep(0.5)  # the audit writer's last batch
    finally:
        os.killpg(gateway.pid, signal.SIGTERM)
        gateway.wait(20)
        log.close()
        for fake in fakes:
            fake.terminate()
            fake.wait(10)

    leaks = known.leaks("the logs", log_path.read_text())
    assert "configuration reloaded" in log_path.read_text()  # the log was really written at debug level
    leaks += known.leaks("error answers or metrics", "\n".join(answers))
    connection = await asyncpg.connect(database)
    try:
        tables = await connection.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        dump = []
        for table in tables:
            rows = await connection.fetch(f'SELECT row_to_json(t)::text AS row FROM "{table["tablename"]}" t')
            dump += [row["row"] for row in rows]
        audit_rows = await connection.fetchval("SELECT count(*) FROM requests")
    finally:
        await connection.close()
    assert audit_rows >= 50  # the audit log did record the run (bodies included for this key)
    leaks += known.leaks("the database", "\n".join(dump))
    journal = b"".join(path.read_bytes() for path in (tmp_path / "journal").rglob("*") if path.is_file())
    leaks += known.leaks("the audit journal", journal.decode("utf-8", "replace"))
    client = redis.Redis.from_url(REDIS)
    try:
        stored = []
        for name in client.scan_iter(match=f"{prefix}*"):
            stored.append(name.decode("utf-8", "replace"))
            kind = client.type(name)
            if kind == b"string":
                stored.append((client.get(name) or b"").decode("utf-8", "replace"))
            elif kind == b"hash":
                stored += [f"{k!r}{v!r}" for k, v in client.hgetall(name).items()]
            elif kind == b"zset":
                stored += [repr(member) for member in client.zrange(name, 0, -1)]
            elif kind == b"stream":
                stored += [repr(entry) for entry in client.xrange(name)]
        assert stored, "the run left nothing in Redis: the test would not see a leak there"
        leaks += known.leaks("Redis", "\n".join(stored))
        for name in client.scan_iter(match=f"{prefix}*"):
            client.delete(name)
    finally:
        client.close()
    assert not leaks, leaks
