"""Streaming client: N concurrent chat streams, time to first token and inter-chunk gaps.

``python -m bench.streams --url http://127.0.0.1:P --streams 100 --rounds 3`` prints one JSON summary.
The bearer key comes from ``SLUICE_BENCH_KEY``. A first, unmeasured round opens the connections.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import aiohttp
import orjson
import uvloop

CHAT_PATH = "/v1/chat/completions"
STREAM_TIMEOUT_S = 60.0
MAX_ERRORS_KEPT = 5
_DATA = b"data:"
_DONE = b"[DONE]"


@dataclass(slots=True)
class Samples:
    """Everything measured over the rounds."""

    ok: int = 0
    failed: int = 0
    tokens: int = 0
    ttft_ms: list[float] = field(default_factory=list)
    gaps_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class StreamTrace:
    """One stream: when it was sent and when each content chunk arrived (monotonic seconds)."""

    sent: float
    arrivals: list[float]


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def _has_content(payload: bytes) -> bool:
    event = orjson.loads(payload)
    choices = event.get("choices") or []
    return bool(choices and (choices[0].get("delta") or {}).get("content"))


async def one_stream(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]) -> StreamTrace:
    """Send one streaming request and record the arrival time of each content chunk."""
    sent = time.monotonic()
    arrivals: list[float] = []
    async with session.post(url, data=body, headers=headers) as response:
        if response.status != 200:
            text = (await response.read())[:200].decode(errors="replace")
            raise RuntimeError(f"status {response.status}: {text}")
        async for line in response.content:
            if not line.startswith(_DATA):
                continue
            payload = line[len(_DATA) :].strip()
            if payload == _DONE:
                break
            if _has_content(payload):
                arrivals.append(time.monotonic())
    return StreamTrace(sent=sent, arrivals=arrivals)


async def _round(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str], streams: int
) -> list[StreamTrace | BaseException]:
    return await asyncio.gather(
        *(one_stream(session, url, body, headers) for _ in range(streams)), return_exceptions=True
    )


def _record(samples: Samples, results: list[StreamTrace | BaseException]) -> None:
    for result in results:
        if isinstance(result, BaseException):
            samples.failed += 1
            if len(samples.errors) < MAX_ERRORS_KEPT:
                samples.errors.append(f"{type(result).__name__}: {result}")
            continue
        if not result.arrivals:
            samples.failed += 1
            continue
        samples.ok += 1
        samples.tokens += len(result.arrivals)
        samples.ttft_ms.append((result.arrivals[0] - result.sent) * 1000)
        samples.gaps_ms.extend((b - a) * 1000 for a, b in zip(result.arrivals, result.arrivals[1:], strict=False))


async def measure(base_url: str, key: str, *, streams: int, rounds: int, model: str) -> Samples:
    """Warm up once, then run ``rounds`` rounds of ``streams`` concurrent streams."""
    url = base_url.rstrip("/") + CHAT_PATH
    body = orjson.dumps(
        {
            "model": model,
            "messages": [
                {
                    "role": "system",
                    "content": "You are a concise assistant for a river conservation charity.",
                },
                {"role": "user", "content": "Tell me, step by step, how a river builds its delta."},
            ],
            "stream": True,
            "max_tokens": 64,
        }
    )
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=streams, keepalive_timeout=60.0)
    timeout = aiohttp.ClientTimeout(total=STREAM_TIMEOUT_S)
    samples = Samples()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await _round(session, url, body, headers, streams)
        for _ in range(rounds):
            _record(samples, await _round(session, url, body, headers, streams))
    return samples


def summary(samples: Samples, streams: int, rounds: int) -> dict[str, object]:
    """The JSON-friendly summary the harness reads."""
    return {
        "streams": streams * rounds,
        "ok": samples.ok,
        "failed": samples.failed,
        "tokens": samples.tokens,
        "ttft_p50_ms": percentile(samples.ttft_ms, 50),
        "ttft_p99_ms": percentile(samples.ttft_ms, 99),
        "gap_p50_ms": percentile(samples.gaps_ms, 50),
        "gap_p99_ms": percentile(samples.gaps_ms, 99),
        "gap_max_ms": max(samples.gaps_ms, default=math.nan),
        "errors": samples.errors,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.streams", description=__doc__)
    parser.add_argument("--url", required=True, help="base URL of the target, e.g. http://127.0.0.1:8000")
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="bench-model")
    args = parser.parse_args(argv)
    key = os.environ.get("SLUICE_BENCH_KEY", "sk-bench")
    samples = uvloop.run(measure(args.url, key, streams=args.streams, rounds=args.rounds, model=args.model))
    json.dump(summary(samples, args.streams, args.rounds), sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
