"""Protocol abuse against a running gateway, on raw sockets: slow clients, oversized requests, bad framing.

Each attack is refused with an OpenAI-shaped error (or the connection is closed), the gateway keeps
serving everyone else meanwhile, and nothing of a refused request reaches the backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import orjson
import pytest

from sluice.testing.fake_vllm import FakeVLLM
from tests.component.test_http_protocol import BODY, Responses, chat_request, exchange
from tests.conftest import API_KEY, StartFake, StartGateway

AUTH = b"Authorization: Bearer " + API_KEY.encode() + b"\r\n"
SMUGGLED = chat_request()  # a complete, valid request hidden where a mis-framing server would read one


async def read_response(reader: asyncio.StreamReader, timeout: float) -> tuple[int, bytes, bool]:
    """The first response on a connection: (status, body, closed after it); (0, b"", True) if closed first."""
    responses = Responses()
    async with asyncio.timeout(timeout):
        while not responses.done:
            chunk = await reader.read(65536)
            if not chunk:
                return 0, b"", True
            responses.parser.feed_data(chunk)
        try:
            async with asyncio.timeout(0.5):
                closed = await reader.read(1) == b""
        except TimeoutError:
            closed = False
    status, _, body = responses.done[0]
    return status, body, closed


async def trickle(writer: asyncio.StreamWriter, data: bytes, pause: float) -> None:
    """Send `data` a byte at a time, then nothing; stops quietly once the server has hung up."""
    with contextlib.suppress(OSError):
        for byte in data:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(pause)
        await asyncio.sleep(3600)


async def timed_chat(port: int) -> float:
    """One normal request on a fresh connection; how long it took (it must succeed)."""
    started = time.perf_counter()
    responses, _ = await exchange(port, chat_request(), 1, timeout=5)
    assert responses.done[0][0] == 200
    return time.perf_counter() - started


def assert_openai_error(body: bytes, code: str) -> None:
    error = orjson.loads(body)["error"]
    assert error["code"] == code and error["type"] and error["message"], error


async def test_slowloris_headers_are_cut_off_after_client_header(fake: StartFake, gateway: StartGateway) -> None:
    gw = await gateway([await fake("base")], timeouts={"client_header": 0.6})
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    attack = asyncio.create_task(trickle(writer, chat_request(), pause=0.05))  # never finishes in time
    try:
        assert await timed_chat(gw.port) < 0.5  # served meanwhile, without waiting for the slow one
        started = time.perf_counter()
        status, body, closed = await read_response(reader, timeout=3)
        assert status == 408 and closed
        assert_openai_error(body, "request_timeout")
        assert time.perf_counter() - started < 1.5
    finally:
        attack.cancel()
        writer.close()


async def test_slow_body_is_cut_off_after_client_body(fake: StartFake, gateway: StartGateway) -> None:
    backend = await fake("base")
    gw = await gateway([backend], timeouts={"client_body": 0.6})
    head, body = chat_request().split(b"\r\n\r\n", 1)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(head + b"\r\n\r\n")  # the headers promptly, then the announced body a byte at a time
    attack = asyncio.create_task(trickle(writer, body, pause=0.05))
    try:
        assert await timed_chat(gw.port) < 0.5
        status, error, closed = await read_response(reader, timeout=3)
        assert status == 408 and closed
        assert_openai_error(error, "request_timeout")
    finally:
        attack.cancel()
        writer.close()
    assert backend.stats.requests_total == 1  # only the normal request


async def test_many_slowloris_connections_do_not_starve_others(fake: StartFake, gateway: StartGateway) -> None:
    gw = await gateway([await fake("base")], timeouts={"client_header": 1.5})
    connections = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", gw.port) for _ in range(200)))
    attacks = [asyncio.create_task(trickle(writer, chat_request(), pause=0.25)) for _, writer in connections]
    try:
        await asyncio.sleep(0.3)  # every attacker has started its request
        durations = [await timed_chat(gw.port) for _ in range(5)]
        assert max(durations) < 0.5, durations
        outcomes = await asyncio.gather(*(read_response(reader, timeout=5) for reader, _ in connections))
    finally:
        for attack in attacks:
            attack.cancel()
        for _, writer in connections:
            writer.close()
    assert all(status in (408, 0) and closed for status, _, closed in outcomes)
    assert sum(status == 408 for status, _, _ in outcomes) >= 190  # answered, not just dropped
    assert await timed_chat(gw.port) < 0.5


async def test_unfinished_header_line_is_bounded(fake: StartFake, gateway: StartGateway) -> None:
    # llhttp holds a header line back until it ends: one that never ends must still hit the limit.
    backend = await fake("base")
    gw = await gateway([backend], limits={"max_header_bytes": 4096}, timeouts={"client_header": 30})
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Junk: ")
    sent = 0

    async def flood() -> None:
        nonlocal sent
        with contextlib.suppress(OSError):
            while sent < 4 * 1024 * 1024:
                writer.write(b"a" * 16384)
                await writer.drain()
                sent += 16384
                await asyncio.sleep(0.005)  # separate reads on the server side

    attack = asyncio.create_task(flood())
    try:
        status, body, closed = await read_response(reader, timeout=5)  # long before client_header
    finally:
        attack.cancel()
        writer.close()
    assert status == 431 and closed
    assert_openai_error(body, "request_header_fields_too_large")
    assert sent < 2 * 1024 * 1024
    assert backend.stats.requests_total == 0


async def test_many_small_headers_over_the_limit_get_431(fake: StartFake, gateway: StartGateway) -> None:
    backend = await fake("base")
    gw = await gateway([backend], limits={"max_header_bytes": 4096})
    many = b"".join(b"X-Filler-%03d: %s\r\n" % (i, b"v" * 20) for i in range(300))
    responses, closed = await exchange(gw.port, chat_request(extra=many), 1)
    assert responses.done[0][0] == 431 and closed
    assert_openai_error(responses.done[0][2], "request_header_fields_too_large")
    long_url = b"GET /v1/models?" + b"q" * 8000 + b" HTTP/1.1\r\nHost: x\r\n" + AUTH + b"\r\n"
    responses, closed = await exchange(gw.port, long_url, 1)
    assert responses.done[0][0] == 431 and closed
    assert backend.stats.requests_total == 0


async def test_body_limit_holds_for_chunked_and_declared_bodies(fake: StartFake, gateway: StartGateway) -> None:
    backend = await fake("base")
    gw = await gateway([backend], limits={"max_body_bytes": 2048})
    at_limit = orjson.dumps({"model": "base", "messages": [{"role": "user", "content": "x" * (2048 - 60)}]})
    at_limit = at_limit[:-2] + b" " * (2048 - len(at_limit)) + at_limit[-2:]
    assert len(at_limit) == 2048
    responses, _ = await exchange(gw.port, chat_request(body=at_limit), 1)
    assert responses.done[0][0] == 200  # the limit itself is allowed
    responses, closed = await exchange(gw.port, chat_request(body=at_limit + b" "), 1)
    assert responses.done[0][0] == 413 and closed
    assert_openai_error(responses.done[0][2], "request_too_large")
    chunks = b"".join(b"400\r\n" + b" " * 1024 + b"\r\n" for _ in range(4)) + b"0\r\n\r\n"  # 4 KiB, unannounced
    chunked = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Transfer-Encoding: chunked\r\n\r\n" + chunks
    )
    responses, closed = await exchange(gw.port, chunked, 1)
    assert responses.done[0][0] == 413 and closed
    assert_openai_error(responses.done[0][2], "request_too_large")
    assert backend.stats.requests_total == 1  # only the request at the limit


def framed(headers: bytes, body: bytes, version: bytes = b"1.1") -> bytes:
    return b"POST /v1/chat/completions HTTP/" + version + b"\r\nHost: x\r\n" + AUTH + headers + b"\r\n" + body


CHUNKED_BODY = b"%x\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY)
# Each request hides a complete second request (SMUGGLED) that a server framing the body differently from the
# gateway's parser would forward: the classic CL.TE / TE.CL / TE.TE desynchronisations and their relatives.
FRAMING = {
    "content-length and transfer-encoding": framed(
        b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n" % (5 + len(SMUGGLED)), b"0\r\n\r\n" + SMUGGLED
    ),
    "transfer-encoding and content-length": framed(
        b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n", b"0\r\n\r\n" + SMUGGLED
    ),
    "two different content-lengths": framed(
        b"Content-Length: %d\r\nContent-Length: %d\r\n" % (len(BODY), len(BODY) + len(SMUGGLED)), BODY + SMUGGLED
    ),
    "two equal content-lengths": framed(b"Content-Length: %d\r\nContent-Length: %d\r\n" % (len(BODY), len(BODY)), BODY),
    "content-length list": framed(b"Content-Length: %d, %d\r\n" % (len(BODY), len(BODY)), BODY),
    "content-length not a number": framed(b"Content-Length: abc\r\n", BODY),
    "content-length negative": framed(b"Content-Length: -1\r\n", BODY + SMUGGLED),
    "content-length with a sign": framed(b"Content-Length: +%d\r\n" % len(BODY), BODY),
    "content-length in hex": framed(b"Content-Length: 0x%x\r\n" % len(BODY), BODY),
    "content-length overflowing": framed(b"Content-Length: 99999999999999999999999\r\n", BODY),
    "space before the colon": framed(b"Content-Length : %d\r\n" % len(BODY), BODY),
    "transfer-encoding gzip": framed(b"Transfer-Encoding: gzip\r\n", CHUNKED_BODY),
    "transfer-encoding gzip, chunked": framed(b"Transfer-Encoding: gzip, chunked\r\n", CHUNKED_BODY + SMUGGLED),
    "transfer-encoding chunked, identity": framed(b"Transfer-Encoding: chunked, identity\r\n", CHUNKED_BODY),
    "transfer-encoding twice": framed(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n", CHUNKED_BODY),
    "transfer-encoding misspelt": framed(b"Transfer-Encoding: xchunked\r\n", CHUNKED_BODY),
    "transfer-encoding folded": framed(b"Transfer-Encoding:\r\n chunked\r\n", CHUNKED_BODY),
    "transfer-encoding on http/1.0": framed(b"Transfer-Encoding: chunked\r\n", CHUNKED_BODY, version=b"1.0"),
    "bare line feeds": b"POST /v1/chat/completions HTTP/1.1\nHost: x\nContent-Length: %d\n\n%s" % (len(BODY), BODY),
    "chunk size overflowing": framed(b"Transfer-Encoding: chunked\r\n", b"ffffffffffffffffffff\r\n" + BODY),
}


@pytest.mark.parametrize("request_bytes", FRAMING.values(), ids=FRAMING.keys())
async def test_conflicting_framing_is_refused_and_never_forwarded(
    fake: StartFake, gateway: StartGateway, request_bytes: bytes
) -> None:
    backend = await fake("base")
    gw = await gateway([backend])
    responses, closed = await exchange(gw.port, request_bytes, 2, timeout=3)
    assert [status for status, _, _ in responses.done] == [400] and closed
    assert_openai_error(responses.done[0][2], "invalid_request")
    assert backend.stats.requests_total == 0
    assert await timed_chat(gw.port) < 1  # the gateway is unharmed


async def test_pipelined_requests_after_a_refusal_are_never_read(fake: StartFake, gateway: StartGateway) -> None:
    backend: FakeVLLM = await fake("base")
    gw = await gateway([backend])
    bad = framed(b"Transfer-Encoding: gzip, chunked\r\n", CHUNKED_BODY)
    responses, closed = await exchange(gw.port, chat_request() + bad + SMUGGLED + SMUGGLED, 4, timeout=3)
    assert [status for status, _, _ in responses.done] == [200, 400] and closed
    assert backend.stats.requests_total == 1  # the request before the bad one, and nothing after it
