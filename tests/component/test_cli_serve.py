"""`sluice serve` and `sluice fake-vllm` as real processes, including several workers on one port."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from email.message import Message
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port

KEY = "sk-cli-test-0123456789"


def http(
    url: str, body: dict[str, object] | None = None, key: str | None = None, timeout: float = 5
) -> tuple[int, Any]:
    """One request on a fresh connection (so SO_REUSEPORT can hand it to either worker)."""
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def wait_http(url: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if http(url)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} did not answer 200 within {timeout} s")


def sibling_bytes(path: Path, topic: str) -> bytes:
    """What a worker answers a sibling on its socket (sluice/siblings.py)."""
    with socket.socket(socket.AF_UNIX) as connection:
        connection.settimeout(5)
        connection.connect(str(path))
        connection.sendall(topic.encode() + b"\n")
        return b"".join(iter(lambda: connection.recv(65536), b""))


def sibling_answer(path: Path, topic: str) -> Any:
    """A worker's JSON answer to a sibling."""
    return json.loads(sibling_bytes(path, topic))


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def console_post(port: int, path: str, cookie: str = "", form: bytes = b"") -> tuple[int, Message]:
    """Status and headers of a console form post, its redirect not followed."""
    opener = urllib.request.build_opener(_NoRedirect)
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=form, headers={"Cookie": cookie})
    try:
        with opener.open(request, timeout=5) as response:
            return int(response.status), response.headers
    except urllib.error.HTTPError as error:  # a redirect not followed lands here
        return error.code, error.headers


def console_login(port: int) -> str:
    """A new console session's cookie (`name=value`)."""
    status, headers = console_post(port, "/console/login", form=b"admin_key=admin-cli-0123456789")
    assert status == 303
    return str(headers["Set-Cookie"]).split(";")[0]


def console_poll(port: int, cookie: str) -> int:
    """`/console/api/state` with a session cookie, on a fresh connection (either worker may answer)."""
    headers = {"Cookie": cookie, "X-Sluice-Console": "1"}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/console/api/state", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.terminate()
    for process in started:
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


def test_serve_with_two_workers(tmp_path: Path, processes: list[subprocess.Popen[bytes]]) -> None:
    fake_port, port = free_port(), free_port()
    processes.append(subprocess.Popen(
        [sys.executable, "-m", "sluice", "fake-vllm", "--port", str(fake_port), "--model", "base", "--lora", "sql"]
    ))
    config = tmp_path / "sluice.yaml"
    config.write_text(
        f"server: {{host: 127.0.0.1, port: {port}}}\n"
        f"backends:\n  - {{name: a, url: 'http://127.0.0.1:{fake_port}'}}\n"
        "auth:\n  admin_key: admin-cli-0123456789\n  api_keys:\n    - {name: ci, key: '${SLUICE_TEST_KEY}'}\n"
    )
    wait_http(f"http://127.0.0.1:{fake_port}/health")
    log = (tmp_path / "gateway.log").open("wb")
    gateway = subprocess.Popen(
        [sys.executable, "-m", "sluice", "serve", "--config", str(config), "--workers", "2"],
        env={**os.environ, "SLUICE_TEST_KEY": KEY, "TMPDIR": str(tmp_path)}, stderr=log, start_new_session=True,
    )
    processes.append(gateway)
    wait_http(f"http://127.0.0.1:{port}/ready")
    body = {"model": "sql", "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(40):
        status, answer = http(f"http://127.0.0.1:{port}/v1/chat/completions", body, KEY)
        assert status == 200 and answer["model"] == "sql"
    status, models = http(f"http://127.0.0.1:{port}/v1/models", key=KEY)
    assert status == 200 and {m["id"] for m in models["data"]} == {"base", "sql"}
    # Whichever worker answers a scrape, it counts every worker's requests, and each backend once.
    for _ in range(6):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            page = response.read().decode()
        assert 'sluice_requests_total{backend="a",model="sql",route="chat",status="200"} 40.0' in page, page
        assert 'sluice_backend_up{backend="a"} 1.0' in page
        assert page.count("# TYPE sluice_requests_total counter") == 1
    # The console's traffic too: once a sampling tick has passed, every poll counts both workers' requests,
    # though each worker served only its share (asked on its own socket, as a sibling would).
    time.sleep(2.0 - time.time() % 2.0 + 0.5)
    for _ in range(20):  # a busy machine may wake a sampler late: wait for the tick after the last request
        sockets = tmp_path.glob("*/*.sock")
        shares = [sum(p["requests"] for p in sibling_answer(path, "console-traffic")) for path in sockets]
        if sum(shares) == 40:
            break
        time.sleep(0.5)
    assert len(shares) == 2 and min(shares) > 0 and sum(shares) == 40, shares
    for _ in range(6):
        status, state = http(f"http://127.0.0.1:{port}/console/api/state", key="admin-cli-0123456789")
        assert status == 200 and sum(point["requests"] for point in state["traffic"]["points"]) == 40, state
    # A console logout answered by one worker ends the session in the other too.
    gone, kept = console_login(port), console_login(port)
    assert console_post(port, "/console/logout", gone)[0] == 303
    assert [console_poll(port, gone) for _ in range(10)] == [401] * 10
    assert [console_poll(port, kept) for _ in range(10)] == [200] * 10
    os.killpg(gateway.pid, signal.SIGTERM)
    assert gateway.wait(10) == 0
    log.close()
    lines = [json.loads(line) for line in (tmp_path / "gateway.log").read_text().splitlines()]
    pids = {line["pid"] for line in lines if line["msg"] == "sluice listening"}
    assert len(pids) == 2, lines
    assert sum(line["msg"].startswith("several workers and no redis.url") for line in lines) == 1  # said once
    access = [line for line in lines if line["logger"] == "sluice.access" and line["path"].startswith("/v1/")]
    assert len(access) == 41  # 40 completions and one model list, each logged once, none lost at exit
    assert {line["status"] for line in access} == {200}
    assert {line["key"] for line in access} == {"ci"}
    assert all(line["backend"] == "a" and line["duration_ms"] > 0 for line in access if line["path"] != "/v1/models")
    assert KEY not in (tmp_path / "gateway.log").read_text()


def test_invalid_config_exits_2_with_a_message(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("backends:\n  - {name: a, url: 'ftp://x'}\n")
    result = subprocess.run(
        [sys.executable, "-m", "sluice", "serve", "--config", str(config)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "backends[0].url" in result.stderr and "Traceback" not in result.stderr


async def test_port_in_use_is_reported(tmp_path: Path) -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = tmp_path / "sluice.yaml"
    config.write_text(f"server: {{port: {port}}}\nbackends:\n  - {{name: a, url: 'http://127.0.0.1:1'}}\n")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sluice", "serve", "--config", str(config), stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    server.close()
    assert process.returncode == 1
    assert b"cannot listen" in stderr and b"Traceback" not in stderr


async def test_sigterm_drains_streams_in_flight_then_exits(tmp_path: Path) -> None:
    import aiohttp

    from sluice.testing.fake_vllm import FakeVLLMSettings, start_fake_vllm

    fake = await start_fake_vllm(FakeVLLMSettings(model="base", tokens=40, itl_ms=25))
    port = free_port()
    config = tmp_path / "sluice.yaml"
    config.write_text(
        f"server: {{host: 127.0.0.1, port: {port}, drain_timeout: 10}}\n"
        f"backends:\n  - {{name: a, url: '{fake.url}'}}\nauth:\n  api_keys:\n    - {{name: ci, key: '{KEY}'}}\n"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sluice", "serve", "--config", str(config), stderr=asyncio.subprocess.DEVNULL
    )
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                try:
                    async with session.get(f"http://127.0.0.1:{port}/ready") as ready:
                        if ready.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.1)
            body = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "stream": True}
            async with session.post(
                f"http://127.0.0.1:{port}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
            ) as response:
                await response.content.readany()
                process.send_signal(signal.SIGTERM)  # mid-stream
                rest = await response.read()
        assert rest.rstrip().endswith(b"data: [DONE]")
        assert await asyncio.wait_for(process.wait(), 15) == 0
        assert fake.stats.completed == 1 and fake.stats.aborted == 0
    finally:
        if process.returncode is None:
            process.kill()
        await fake.close()


def test_sighup_and_sluice_reload_reach_every_worker(tmp_path: Path, processes: list[subprocess.Popen[bytes]]) -> None:
    fake_port, port = free_port(), free_port()
    processes.append(
        subprocess.Popen([sys.executable, "-m", "sluice", "fake-vllm", "--port", str(fake_port), "--model", "base"])
    )
    config = tmp_path / "sluice.yaml"
    admin = "admin-cli-0123456789"

    def write(*keys: str) -> None:
        config.write_text(
            f"server: {{host: 127.0.0.1, port: {port}}}\n"
            f"backends:\n  - {{name: a, url: 'http://127.0.0.1:{fake_port}'}}\n"
            f"auth:\n  admin_key: {admin}\n  api_keys:\n"
            + "".join(f"    - {{name: k{i}, key: '{key}'}}\n" for i, key in enumerate(keys))
        )

    def everyone_accepts(key: str, timeout: float = 10) -> bool:
        """20 requests on fresh connections in a row succeed (both workers answer some of them)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(http(f"http://127.0.0.1:{port}/v1/models", key=key)[0] == 200 for _ in range(20)):
                return True
            time.sleep(0.1)
        return False

    write(KEY)
    wait_http(f"http://127.0.0.1:{fake_port}/health")
    gateway = subprocess.Popen(
        [sys.executable, "-m", "sluice", "serve", "--config", str(config), "--workers", "2"],
        stderr=(tmp_path / 'gateway.log').open('wb'), start_new_session=True,
    )
    processes.append(gateway)
    wait_http(f"http://127.0.0.1:{port}/ready")
    second, third = "sk-cli-second-0123456789", "sk-cli-third-0123456789"
    write(KEY, second)
    os.kill(gateway.pid, signal.SIGHUP)  # the supervisor passes it on to both workers
    assert everyone_accepts(second)
    write(third)
    result = subprocess.run(
        [sys.executable, "-m", "sluice", "reload", "--config", str(config)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["api_keys"] == 1
    assert everyone_accepts(third)
    assert all(http(f"http://127.0.0.1:{port}/v1/models", key=KEY)[0] == 401 for _ in range(20))
    config.write_text("backends: [}\n")
    result = subprocess.run(
        [sys.executable, "-m", "sluice", "reload", "--config", str(config), "--url", f"http://127.0.0.1:{port}"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2 and "invalid configuration" in result.stderr  # checked before sending
    os.kill(gateway.pid, signal.SIGHUP)  # a broken file on SIGHUP: refused, the running config stays
    time.sleep(0.5)
    assert gateway.poll() is None and everyone_accepts(third)


ADMIN = "admin-cli-0123456789"
AUTH = f"auth:\n  admin_key: {ADMIN}\n  api_keys:\n    - {{name: ci, key: '{KEY}'}}\n"


def fake_vllm(processes: list[subprocess.Popen[bytes]], *flags: str) -> int:
    """A fake vLLM process serving `base`; its port, once it answers."""
    port = free_port()
    command = [sys.executable, "-m", "sluice", "fake-vllm", "--port", str(port), "--model", "base", *flags]
    processes.append(subprocess.Popen(command))
    wait_http(f"http://127.0.0.1:{port}/health")
    return port


def two_workers(tmp_path: Path, processes: list[subprocess.Popen[bytes]], fakes: list[int], sections: str) -> int:
    """`sluice serve --workers 2` in front of `fakes` (backends a, b, …) with `sections`; its port, once ready."""
    port = free_port()
    backends = "".join(f"  - {{name: {chr(97 + i)}, url: 'http://127.0.0.1:{fake}'}}\n" for i, fake in enumerate(fakes))
    config = tmp_path / "sluice.yaml"
    config.write_text(f"server: {{host: 127.0.0.1, port: {port}}}\nbackends:\n{backends}{sections}")
    gateway = subprocess.Popen(
        [sys.executable, "-m", "sluice", "serve", "--config", str(config), "--workers", "2"],
        env={**os.environ, "TMPDIR": str(tmp_path)},  # the workers' sockets in tmp_path/sluice-workers-*
        stderr=(tmp_path / "gateway.log").open("wb"), start_new_session=True,
    )  # fmt: skip
    processes.append(gateway)
    wait_http(f"http://127.0.0.1:{port}/ready")
    return port


def test_a_console_drain_reaches_every_worker(tmp_path: Path, processes: list[subprocess.Popen[bytes]]) -> None:
    """No Redis: the drain button's worker tells its sibling, so every poll and every request agrees."""
    ports = [fake_vllm(processes), fake_vllm(processes)]
    port = two_workers(tmp_path, processes, ports, AUTH)

    def drained_b() -> list[bool]:
        """What 10 state polls on fresh connections (either worker) say of b."""
        answers = [http(f"http://127.0.0.1:{port}/console/api/state", key=ADMIN)[1] for _ in range(10)]
        return [next(b["drained"] for b in state["backends"] if b["name"] == "b") for state in answers]

    def served_by_b(count: int) -> int:
        before = http(f"http://127.0.0.1:{ports[1]}/fake/stats")[1]["requests_total"]
        body = {"model": "base", "messages": [{"role": "user", "content": "hi"}]}
        assert all(http(f"http://127.0.0.1:{port}/v1/chat/completions", body, KEY)[0] == 200 for _ in range(count))
        return int(http(f"http://127.0.0.1:{ports[1]}/fake/stats")[1]["requests_total"]) - before

    assert drained_b() == [False] * 10 and served_by_b(20) > 0
    assert http(f"http://127.0.0.1:{port}/admin/backends/b/drain", {}, ADMIN)[0] == 200
    assert drained_b() == [True] * 10
    assert served_by_b(20) == 0  # neither worker sends b anything
    assert http(f"http://127.0.0.1:{port}/admin/backends/b/undrain", {}, ADMIN)[0] == 200
    assert drained_b() == [False] * 10 and served_by_b(20) > 0


def test_a_restarted_worker_keeps_the_drains_and_logouts_of_its_siblings(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    """No Redis: a worker that dies and is restarted learns from its sibling what only the workers held."""
    port = two_workers(tmp_path, processes, [fake_vllm(processes), fake_vllm(processes)], AUTH)
    assert http(f"http://127.0.0.1:{port}/admin/backends/b/drain", {}, ADMIN)[0] == 200
    gone, kept = console_login(port), console_login(port)
    assert console_post(port, "/console/logout", gone)[0] == 303
    sockets = list(tmp_path.glob("*/*.sock"))
    assert len(sockets) == 2
    os.kill(int(sockets[0].stem), signal.SIGKILL)  # a socket is named after its worker's pid
    deadline = time.monotonic() + 20  # until the supervisor has started a new worker and it listens
    while time.monotonic() < deadline:
        restarted = [path for path in tmp_path.glob("*/*.sock") if path not in sockets]
        if restarted:
            break
        time.sleep(0.1)
    assert restarted, "the supervisor did not restart the killed worker"
    # What the new worker holds, asked as a sibling would: the drain, and the one logout (`<id>:<expiry>`).
    assert sibling_bytes(restarted[0], "drains-held") == b"b|console"
    assert re.fullmatch(rb"[0-9a-f]{32}:\d{10}", sibling_bytes(restarted[0], "console-logouts-held"))
    wait_http(f"http://127.0.0.1:{port}/ready")
    states = [http(f"http://127.0.0.1:{port}/console/api/state", key=ADMIN)[1] for _ in range(10)]
    assert [next(b["drained"] for b in state["backends"] if b["name"] == "b") for state in states] == [True] * 10
    assert [console_poll(port, gone) for _ in range(10)] == [401] * 10
    assert [console_poll(port, kept) for _ in range(10)] == [200] * 10


def test_requests_in_flight_count_every_worker(tmp_path: Path, processes: list[subprocess.Popen[bytes]]) -> None:
    """Requests held by both workers: /metrics and the console show them all, whichever worker answers."""
    port = two_workers(tmp_path, processes, [fake_vllm(processes, "--ttft-ms", "8000")], AUTH)
    body = {"model": "base", "messages": [{"role": "user", "content": "hold on"}], "max_tokens": 2}
    with concurrent.futures.ThreadPoolExecutor(12) as pool:  # 12 connections: both workers hold some
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        held = [pool.submit(http, url, body, KEY, timeout=30) for _ in range(12)]

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                return str(response.read().decode())

        deadline = time.monotonic() + 4  # until all 12 are admitted (each waits 8 s for its first token)
        while 'sluice_backend_in_flight{backend="a"} 12.0' not in scrape() and time.monotonic() < deadline:
            time.sleep(0.1)
        for _ in range(6):
            assert 'sluice_backend_in_flight{backend="a"} 12.0' in scrape()
            state = http(f"http://127.0.0.1:{port}/console/api/state", key=ADMIN)[1]
            assert state["backends"][0]["in_flight"] == 12
        assert [future.result()[0] for future in held] == [200] * 12


def test_the_in_process_cache_is_counted_and_purged_in_every_worker(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    """`store: memory` with two workers: each has its own entries; the admin API sees and purges them all."""
    cache = "cache: {enabled: true, store: memory, semantic: {enabled: false}}\n"
    port = two_workers(tmp_path, processes, [fake_vllm(processes)], AUTH + cache)
    for n in range(30):  # 30 different questions on fresh connections: each worker stores its share
        body = {"model": "base", "messages": [{"role": "user", "content": f"question {n}"}], "temperature": 0}
        assert http(f"http://127.0.0.1:{port}/v1/chat/completions", body, KEY)[0] == 200

    def entries() -> list[int]:
        return [http(f"http://127.0.0.1:{port}/admin/cache", key=ADMIN)[1]["entries"] for _ in range(10)]

    deadline = time.monotonic() + 5  # answers are stored in the background
    while entries() != [30] * 10 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert entries() == [30] * 10
    assert http(f"http://127.0.0.1:{port}/admin/cache/purge", {"all": True}, ADMIN) == (200, {"purged": 30})
    assert entries() == [0] * 10


def test_a_key_revoked_through_one_worker_stops_in_both_at_once(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    """Managed keys are cached per worker for key_cache_ttl (60 s here): a revocation must not wait for it."""
    sections = (
        f"auth: {{admin_key: {ADMIN}, key_secret: '{'s' * 40}', key_cache_ttl: 60}}\n"
        f"database: {{url: 'sqlite:///{tmp_path}/sluice.db'}}\n"
        "audit: {enabled: false}\n"
    )
    port = two_workers(tmp_path, processes, [fake_vllm(processes)], sections)
    status, created = http(f"http://127.0.0.1:{port}/admin/keys", {"name": "team"}, ADMIN)
    assert status == 201
    models = f"http://127.0.0.1:{port}/v1/models"
    assert [http(models, key=created["key"])[0] for _ in range(20)] == [200] * 20  # cached by both workers
    assert http(f"http://127.0.0.1:{port}/admin/keys/{created['id']}/revoke", {}, ADMIN)[0] == 200
    assert [http(models, key=created["key"])[0] for _ in range(20)] == [401] * 20
