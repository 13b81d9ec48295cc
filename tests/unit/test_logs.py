"""The batched access log writes one well-formed line per request, in order, with no secrets."""

from __future__ import annotations

import asyncio
import io
import json

from sluice.config import LoggingConfig
from sluice.logs import AccessLog


async def test_lines_are_batched_and_flushed_soon() -> None:
    stream = io.StringIO()
    log = AccessLog(LoggingConfig(), stream=stream, interval=0.05)
    for i in range(3):
        log.write({"request_id": f"r{i}", "status": 200, "model": None})
    assert stream.getvalue() == ""  # nothing written on the request path
    await asyncio.sleep(0.1)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["request_id"] for line in lines] == ["r0", "r1", "r2"]
    assert lines[0]["logger"] == "sluice.access" and lines[0]["ts"].endswith("Z") and lines[0]["model"] is None


async def test_large_batches_flush_at_once_and_text_format() -> None:
    stream = io.StringIO()
    log = AccessLog(LoggingConfig(), stream=stream, interval=60)
    for i in range(2000):
        log.write({"request_id": f"r{i}", "path": "/v1/chat/completions" * 3})
    assert stream.getvalue().count("\n") >= 1000  # flushed by size, not by the (long) interval
    log.flush()
    assert stream.getvalue().count("\n") == 2000
    text = io.StringIO()
    log = AccessLog(LoggingConfig(format="text"), stream=text)
    log.write({"request_id": "abc", "status": 404, "model": None})
    log.flush()
    assert text.getvalue().endswith("request request_id=abc status=404\n")
