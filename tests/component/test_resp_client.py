"""The lean Redis client of the rate limiter: pipelining, errors, database selection, a hanging server."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import time

import pytest
import redis.asyncio as redis

from sluice.resp import RespClient, RespError
from tests.redis_server import RedisServer


async def test_concurrent_calls_pipeline_on_one_connection_and_keep_their_order() -> None:
    client = RespClient("redis://127.0.0.1:6379/0", timeout=1.0)
    key = f"sluice-test-resp-{secrets.token_hex(4)}"
    try:
        replies = await asyncio.gather(*(client.call("INCR", key) for _ in range(200)))
        assert sorted(replies) == list(range(1, 201))
        assert await client.call("GET", key) == b"200"
        with pytest.raises(RespError, match=r"WRONGTYPE"):
            await client.call("LPUSH", key, "x")  # an error reply fails only its own call
        assert await client.call("DEL", key) == 1
    finally:
        await client.close()


async def test_the_database_in_the_url_is_selected() -> None:
    key = f"sluice-test-resp-{secrets.token_hex(4)}"
    client = RespClient("redis://127.0.0.1:6379/3", timeout=1.0)
    check = redis.Redis.from_url("redis://127.0.0.1:6379/3")
    try:
        await client.call("SET", key, "in-db-3")
        assert await check.get(key) == b"in-db-3"
    finally:
        await check.delete(key)
        await check.aclose()
        await client.close()


async def test_a_hanging_server_fails_the_waiting_calls_after_the_timeout_then_recovers() -> None:
    async with RedisServer() as server:
        client = RespClient(server.url, timeout=0.3)
        assert await client.call("PING") == b"PONG"
        info = await client.call("INFO", "server")
        pid = int(next(line for line in info.split(b"\r\n") if line.startswith(b"process_id:")).split(b":")[1])
        os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            results = await asyncio.gather(*(client.call("PING") for _ in range(5)), return_exceptions=True)
            assert all(isinstance(r, TimeoutError) for r in results), results
            assert time.monotonic() - started < 1.0
        finally:
            os.kill(pid, signal.SIGCONT)
        assert await client.call("PING") == b"PONG"  # a new connection
        await server.stop()
        with pytest.raises(OSError):
            await client.call("PING")
        await client.close()
