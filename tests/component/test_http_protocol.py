"""The edges of the client-facing HTTP/1.1 server, tested on raw sockets."""

from __future__ import annotations

import asyncio

import httptools
import orjson

from tests.conftest import API_KEY, StartFake, StartGateway

BODY = orjson.dumps({"model": "base", "messages": [{"role": "user", "content": "hi"}]})


def chat_request(body: bytes = BODY, extra: bytes = b"", version: bytes = b"1.1") -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/" + version + b"\r\nHost: x\r\nAuthorization: Bearer " + API_KEY.encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n" % len(body) + extra + b"\r\n" + body
    )


class Responses:
    """Parses the responses read from a raw connection."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.done: list[tuple[int, dict[bytes, bytes], bytes]] = []
        self._headers: dict[bytes, bytes] = {}
        self._body = b""

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        self.done.append((self.parser.get_status_code(), self._headers, self._body))
        self._headers, self._body = {}, b""


async def exchange(port: int, data: bytes, count: int, timeout: float = 5) -> tuple[Responses, bool]:
    """Send raw bytes, read until `count` responses came back; also tell whether the server closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    responses = Responses()
    closed = False
    try:
        async with asyncio.timeout(timeout):
            while len(responses.done) < count:
                chunk = await reader.read(65536)
                if not chunk:
                    closed = True
                    break
                responses.parser.feed_data(chunk)
            if not closed:
                try:
                    async with asyncio.timeout(0.2):
                        closed = await reader.read(1) == b""
                except TimeoutError:
                    closed = False
    finally:
        writer.close()
    return responses, closed


async def test_keep_alive_serves_many_requests_on_one_connection(fake: StartFake, gateway: StartGateway) -> None:
    gw = await gateway([await fake("base")])
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    responses = Responses()
    for i in range(5):
        writer.write(chat_request())
        while len(responses.done) < i + 1:
            responses.parser.feed_data(await reader.read(65536))
    assert [status for status, _, _ in responses.done] == [200] * 5
    ids = {headers[b"x-request-id"] for _, headers, _ in responses.done}
    assert len(ids) == 5
    writer.close()


async def test_pipelined_requests_are_answered_in_order(fake: StartFake, gateway: StartGateway) -> None:
    gw = await gateway([await fake("base")])
    requests = (
        chat_request()
        + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
        + chat_request(body=b"{broken")
        + b"GET /version HTTP/1.1\r\nHost: x\r\nX-Request-Id: my-own-id-1\r\n\r\n"
    )
    responses, closed = await exchange(gw.port, requests, 4)
    assert [status for status, _, _ in responses.done] == [200, 200, 400, 200]
    assert b"chat.completion" in responses.done[0][2]
    assert responses.done[1][2] == b'{"status":"ok"}'
    assert responses.done[3][1][b"x-request-id"] == b"my-own-id-1"
    assert not closed


async def test_chunked_request_body(fake: StartFake, gateway: StartGateway) -> None:
    gw = await gateway([await fake("base")])
    half = len(BODY) // 2
    chunked = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (half, BODY[:half], len(BODY) - half, BODY[half:])
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + API_KEY.encode()
        + b"\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked
    )
    responses, _ = await exchange(gw.port, request, 1)
    assert responses.done[0][0] == 200


async def test_oversized_headers_get_431_and_close(fake: StartFake, gateway: StartGateway) -> None:
    gw = await gateway([await fake("base")], limits={"max_header_bytes": 4096})
    request = chat_request(extra=b"X-Junk: " + b"a" * 8000 + b"\r\n")
    responses, closed = await exchange(gw.port, request, 1)
    assert responses.done[0][0] == 431
    assert orjson.loads(responses.done[0][2])["error"]["code"] == "request_header_fields_too_large"
    assert closed


async def test_declared_oversized_body_is_refused_before_it_is_sent(fake: StartFake, gateway: StartGateway) -> None:
    gw = await gateway([await fake("base")], limits={"max_body_bytes": 2048})
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 999999\r\nExpect: 100-continue\r\n\r\n"
    )
    responses, closed = await exchange(gw.port, head, 1)
    assert responses.done[0][0] == 413 and closed


async def test_expect_100_continue(fake: StartFake, gateway: StartGateway) -> None:
    gw = await gateway([await fake("base")])
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    request = chat_request(extra=b"Expect: 100-continue\r\n")
    head, body = request.split(b"\r\n\r\n", 1)
    writer.write(head + b"\r\n\r\n")
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(body)
    responses = Responses()
    while not responses.done:
        responses.parser.feed_data(await asyncio.wait_for(reader.read(65536), 2))
    assert responses.done[0][0] == 200
    writer.close()


async def test_slow_client_gets_408(fake: StartFake, gateway: StartGateway) -> None:
    gw = await gateway([await fake("base")], timeouts={"client_header": 0.3})
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # and then nothing
    data = await asyncio.wait_for(reader.read(), 3)
    assert data.startswith(b"HTTP/1.1 408 ")
    writer.close()


async def test_idle_keep_alive_connections_are_closed(fake: StartFake, gateway: StartGateway) -> None:
    gw = await gateway([await fake("base")], timeouts={"client_keepalive": 0.3})
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    assert await asyncio.wait_for(reader.read(), 3) == b""
    writer.close()


async def test_malformed_http_is_400(fake: StartFake, gateway: StartGateway) -> None:
    gw = await gateway([await fake("base")])
    responses, closed = await exchange(gw.port, b"GARBAGE\x00\x01 / HTTP/9\r\n\r\n", 1)
    assert responses.done[0][0] == 400 and closed


async def test_http_1_0_gets_an_answer_and_a_close(fake: StartFake, gateway: StartGateway) -> None:
    gw = await gateway([await fake("base", tokens=3)])
    responses, closed = await exchange(gw.port, chat_request(version=b"1.0"), 1)
    assert responses.done[0][0] == 200 and closed
    stream = orjson.dumps({"model": "base", "messages": [{"role": "user", "content": "x"}], "stream": True})
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(chat_request(body=stream, version=b"1.0"))
    raw = await asyncio.wait_for(reader.read(), 3)  # close-delimited: read to EOF
    assert b"transfer-encoding" not in raw.lower() and raw.rstrip().endswith(b"data: [DONE]")
    writer.close()


async def test_upgrade_is_ignored_then_the_connection_closes(fake: StartFake, gateway: StartGateway) -> None:
    gw = await gateway([await fake("base")])
    request = (
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Authorization: Bearer " + API_KEY.encode() + b"\r\n\r\nGET /health HTTP/1.1\r\n\r\n"
    )
    responses, closed = await exchange(gw.port, request, 2)
    # The request is answered as plain HTTP (an upgrade is optional for a server); nothing after it is read.
    assert [status for status, _, _ in responses.done] == [200, 400] and closed
