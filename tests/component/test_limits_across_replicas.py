"""Three gateway processes sharing one Redis enforce one limit together (requests and streamed tokens)."""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.component.test_chaos import wait_ok
from tests.conftest import free_port

KEY = "sk-replicas-0123456789"
SECONDS = 10.0
CLIENTS = 30


@pytest.fixture
async def replicas(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[list[str]]:
    """Three `sluice serve` processes over one fake vLLM, sharing the machine's Redis (own key prefix)."""
    limits: str = request.param
    fake_port = free_port()
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "sluice", "fake-vllm", "--port", str(fake_port), "--model", "base",
             "--tokens", "100", "--itl-ms", "0"],
            stdout=subprocess.DEVNULL,
        )
    ]  # fmt: skip
    urls = []
    prefix = f"sluice-replicas-{secrets.token_hex(4)}:"
    try:
        for i in range(3):
            port = free_port()
            config = tmp_path / f"replica{i}.yaml"
            config.write_text(
                f"server: {{host: 127.0.0.1, port: {port}}}\n"
                f"backends:\n  - {{name: a, url: 'http://127.0.0.1:{fake_port}'}}\n"
                f"auth:\n  api_keys:\n    - {{name: shared, key: '{KEY}', {limits}}}\n"
                f"redis: {{url: 'redis://127.0.0.1:6379/0', key_prefix: '{prefix}'}}\n"
                "logging: {level: warning, access_log: false}\n"
            )
            processes.append(
                subprocess.Popen([sys.executable, "-m", "sluice", "serve", "--config", str(config)])
            )
            urls.append(f"http://127.0.0.1:{port}")
        async with aiohttp.ClientSession() as session:
            for url in (f"http://127.0.0.1:{fake_port}/health", *(u + "/ready" for u in urls)):
                await wait_ok(session, url)
        yield urls
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(10)


async def hammer(urls: list[str], body: dict[str, object]) -> tuple[int, int, float]:
    """CLIENTS clients round-robin over the replicas for SECONDS: (admitted, total tokens used, elapsed)."""
    targets = itertools.cycle(urls)
    admitted = used = 0
    started = time.monotonic()
    deadline = started + SECONDS

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal admitted, used
        while time.monotonic() < deadline:
            async with session.post(
                next(targets) + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
            ) as response:
                raw = await response.read()
                if response.status == 429:
                    continue
                assert response.status == 200, raw
                admitted += 1
                for line in raw.split(b"\n"):  # the usage chunk of the stream
                    if line.startswith(b"data: {") and b'"usage":{' in line:
                        used += json.loads(line[6:])["usage"]["total_tokens"]

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CLIENTS)) as session:
        await asyncio.gather(*(client(session) for _ in range(CLIENTS)))
    return admitted, used, time.monotonic() - started


CHAT = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100,
        "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip


@pytest.mark.parametrize("replicas", ["requests_per_minute: 600"], indirect=True)
async def test_requests_per_second_hold_across_three_replicas(replicas: list[str]) -> None:
    admitted, _, elapsed = await hammer(replicas, CHAT)
    allowed = 10 + 10 * elapsed  # burst (one second's worth) + 10 per second
    assert abs(admitted - allowed) <= 0.05 * allowed, (admitted, allowed)


@pytest.mark.parametrize("replicas", ["tokens_per_minute: 60000"], indirect=True)
async def test_tokens_per_minute_hold_across_three_replicas_with_streams(replicas: list[str]) -> None:
    admitted, used, elapsed = await hammer(replicas, CHAT)
    allowed = 60000 + 1000 * elapsed  # a minute's worth at once, then 1,000 tokens a second
    assert admitted > 0 and abs(used - allowed) <= 0.05 * allowed, (admitted, used, allowed)
