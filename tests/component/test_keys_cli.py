"""`sluice keys` and `sluice db` as real processes, on SQLite and on PostgreSQL.

The key appears in the output of `create` and `rotate` only, and nowhere else.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from subprocess import PIPE

import pytest

from sluice.cli import main
from sluice.config import DatabaseConfig
from sluice.identity.keys import KeyStore
from sluice.store.database import Database
from sluice.store.migrations import available

SECRET = "cli-secret-0123456789abcdef-0123456789"
KEY = re.compile(r"sk-sluice-[0-9A-Za-z]{43}")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["sqlite", "postgres"])
def config(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A configuration file for a fresh database of each kind (the PostgreSQL one emptied first)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/data/sluice.db"
    else:
        url = request.getfixturevalue("postgres_url")
        asyncio.run(_execute(url, "DROP TABLE IF EXISTS api_keys, sluice_migrations, requests, usage_daily"))
    return write_config(tmp_path, url)


def write_config(folder: Path, url: str) -> Path:
    path = folder / "sluice.yaml"
    path.write_text(
        "backends: [{name: b, url: 'http://127.0.0.1:9'}]\n"
        f"database: {{url: '{url}', connect_timeout: 2}}\n"
        "auth: {key_secret: '${SLUICE_KEY_SECRET:-}'}\n"
    )
    return path


async def _execute(url: str, statement: str) -> None:
    db = await Database.connect(DatabaseConfig(url=url))
    try:
        await db.execute(statement)
    finally:
        await db.close()


def sluice(*args: str | Path, secret: str = SECRET) -> subprocess.CompletedProcess[str]:
    [result] = sluice_at_once([*args], secret=secret)
    return result


def sluice_at_once(*commands: list[str | Path], secret: str = SECRET) -> list[subprocess.CompletedProcess[str]]:
    """Run independent `sluice` commands side by side (each process spends half a second starting up)."""
    env = {**os.environ, "SLUICE_KEY_SECRET": secret}
    started = [
        (argv, subprocess.Popen(argv, stdout=PIPE, stderr=PIPE, text=True, env=env, cwd=ROOT))
        for argv in ([sys.executable, "-m", "sluice", *map(str, command)] for command in commands)
    ]
    results = []
    for argv, process in started:
        stdout, stderr = process.communicate(timeout=30)
        results.append(subprocess.CompletedProcess(argv, process.returncode, stdout, stderr))
    return results


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout


async def _lookup(config: Path, key: str) -> str | None:
    from sluice.config_loader import load_config

    settings = load_config(config, env={"SLUICE_KEY_SECRET": SECRET})
    db = await Database.connect(settings.database)
    try:
        record = await KeyStore(db, SECRET.encode()).lookup(key)
        return None if record is None else record.state()
    finally:
        await db.close()


def test_key_lifecycle(config: Path) -> None:
    created = ok(
        sluice(
            "keys",
            "create",
            "--name",
            "alice",
            "--models",
            "base,sql-lora",
            "--rpm",
            "60",
            "--tpm",
            "5000",
            "--max-concurrency",
            "3",
            "--expires",
            "2099-01-31",
            "--config",
            config,
        )
    )
    keys = KEY.findall(created)
    assert len(keys) == 1 and "cannot be shown again" in created
    first = keys[0]
    assert "alice" in created and "base,sql-lora" in created and "2099-01-31 00:00:00 UTC" in created

    listing = sluice("keys", "list", "--json", "--config", config)
    [record] = json.loads(ok(listing))
    assert record["name"] == "alice" and record["models"] == ["base", "sql-lora"] and record["state"] == "active"
    assert (record["requests_per_minute"], record["tokens_per_minute"], record["max_concurrency"]) == (60, 5000, 3)
    assert record["expires_at"] == "2099-01-31T00:00:00+00:00" and record["prefix"] == first[:14]

    rotated = ok(sluice("keys", "rotate", "alice", "--config", config))
    [second] = KEY.findall(rotated)
    assert second != first and "no longer works" in rotated
    assert asyncio.run(_lookup(config, first)) is None
    assert asyncio.run(_lookup(config, second)) == "active"

    revoked = sluice("keys", "revoke", record["id"], "--config", config)
    assert "Revoked key 'alice'" in ok(revoked)
    assert asyncio.run(_lookup(config, second)) == "revoked"
    live, everything = sluice_at_once(
        ["keys", "list", "--config", config], ["keys", "list", "--all", "--config", config]
    )
    assert "No keys." in ok(live)
    assert re.search(rf"{record['id']}\s+alice\s+{second[:14]}…\s+revoked\s+base,sql-lora\s", ok(everything))

    for quiet in (listing, revoked, live, everything):  # commands that must never show a key
        for output in (quiet.stdout, quiet.stderr):
            assert not KEY.search(output)
            assert first[14:] not in output and second[14:] not in output


def test_create_as_json(config: Path) -> None:
    result = sluice("keys", "create", "--name", "bot", "--json", "--config", config)
    created = json.loads(ok(result))
    assert KEY.fullmatch(created["key"]) and created["name"] == "bot" and created["models"] is None
    assert "cannot be shown again" in result.stderr and not KEY.search(result.stderr)


def in_process(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    """`sluice ARGS` in this process (quicker than a new one): exit code, stdout, stderr."""
    try:
        code = main([str(arg) for arg in args])
    except SystemExit as exit:  # argparse's way of refusing arguments
        code = int(exit.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_db_upgrade_and_status(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = in_process(capsys, "db", "status", "--json", "--config", config)
    every = [(m.version, None) for m in available("sqlite")]
    assert code == 0 and [(m["version"], m["applied_at"]) for m in json.loads(out)["migrations"]] == every
    code, out, _ = in_process(capsys, "db", "upgrade", "--config", config)
    assert code == 0 and re.search(r"applied (postgres|sqlite)/0001_api_keys.sql", out)
    assert "up to date" in in_process(capsys, "db", "upgrade", "--config", config)[1]
    code, out, _ = in_process(capsys, "db", "status", "--config", config)
    assert code == 0 and re.search(r"0001\s+api_keys\s+applied\s+\d{4}-", out)


def test_mistakes_get_one_line_and_the_right_exit_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_config(tmp_path, f"sqlite:///{tmp_path}/sluice.db")
    monkeypatch.setenv("SLUICE_KEY_SECRET", SECRET)
    assert in_process(capsys, "keys", "create", "--name", "taken", "--config", config)[0] == 0
    cases: list[tuple[list[str | Path], int, str]] = [
        (["keys", "revoke", "nobody", "--config", config], 1, "no key with id or name 'nobody'"),
        (["keys", "create", "--name", "taken", "--config", config], 1, "already exists"),
        (["keys", "create", "--name", "x", "--expires", "2001-01-01", "--config", config], 2, "not in the future"),
        (["keys", "create", "--name", "x y", "--config", config], 2, "letters, digits"),
        (["keys", "create", "--name", "x", "--rpm", "0", "--config", config], 2, "at least 1"),
        (["keys", "create", "--name", "x", "--models", ",", "--config", config], 2, "at least one model"),
        (["keys", "create", "--name", "x", "--expires", "soon", "--config", config], 2, "not a date"),
        (["keys", "create", "--name", "x"], 2, "--config"),
        (["keys", "list", "--config", tmp_path / "missing.yaml"], 2, "cannot read"),
        (["db", "frobnicate", "--config", config], 2, "invalid choice"),
    ]
    for args, expected, message in cases:
        code, out, err = in_process(capsys, *args)
        assert (code, out) == (expected, ""), err
        assert message in err
    monkeypatch.setenv("SLUICE_KEY_SECRET", "")
    code, _, err = in_process(capsys, "keys", "list", "--config", config)
    assert code == 2 and "export SLUICE_KEY_SECRET" in err


def test_an_unreachable_database_is_one_line(tmp_path: Path) -> None:
    config = write_config(tmp_path, "postgresql://sluice:hunter2@127.0.0.1:1/sluice")
    for result in sluice_at_once(["keys", "list", "--config", config], ["db", "upgrade", "--config", config]):
        assert result.returncode == 1 and result.stdout == ""
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert "postgresql://sluice:***@127.0.0.1:1/sluice" in result.stderr and "hunter2" not in result.stderr
