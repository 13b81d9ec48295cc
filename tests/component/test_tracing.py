"""OpenTelemetry tracing: a span per request exported over OTLP/HTTP, continuing the caller's trace and
handed on to the backend; off, the caller's traceparent passes through untouched."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.conftest import API_KEY, StartFake, StartGateway

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CALLER_SPAN}-01"


@pytest.fixture
async def collector() -> AsyncIterator[tuple[str, list[Any]]]:
    """A minimal OTLP/HTTP trace receiver: the spans it was sent."""
    spans: list[Any] = []

    async def receive(request: web.Request) -> web.Response:
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        for resource in message.resource_spans:
            for scope in resource.scope_spans:
                spans.extend(scope.spans)
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", receive)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}/v1/traces", spans
    await runner.cleanup()


async def chat(url: str, headers: dict[str, str]) -> int:
    body = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    async with (
        aiohttp.ClientSession(headers={"authorization": f"Bearer {API_KEY}", **headers}) as session,
        session.post(url + "/v1/chat/completions", json=body) as response,
    ):
        await response.read()
        return response.status


def attributes(span: Any) -> dict[str, Any]:
    values = {}
    for attribute in span.attributes:
        value = attribute.value
        values[attribute.key] = getattr(value, value.WhichOneof("value"))
    return values


async def test_a_request_span_continues_the_callers_trace_and_reaches_the_backend(
    fake: StartFake, gateway: StartGateway, collector: tuple[str, list[Any]]
) -> None:
    endpoint, spans = collector
    backend = await fake("base")
    gw = await gateway([backend], tracing={"otlp_endpoint": endpoint})
    assert await chat(gw.url, {"traceparent": TRACEPARENT}) == 200
    sent = backend.stats.last_request_headers.get("traceparent", "")
    await gw.close()  # flushes the exporter
    (span,) = spans
    assert span.name == "POST chat"
    assert span.trace_id.hex() == TRACE_ID and span.parent_span_id.hex() == CALLER_SPAN
    values = attributes(span)
    assert values["http.response.status_code"] == 200
    assert values["gen_ai.request.model"] == "base" and values["sluice.backend"] == "b0"
    assert values["gen_ai.usage.output_tokens"] == 3 and values["sluice.key"] == "test"
    assert "sluice.request_id" in values
    # the backend sees the gateway's span as the parent, in the same trace
    assert sent == f"00-{TRACE_ID}-{span.span_id.hex()}-01"


async def test_errors_are_marked_and_new_traces_start_without_a_caller(
    fake: StartFake, gateway: StartGateway, collector: tuple[str, list[Any]]
) -> None:
    endpoint, spans = collector
    backend = await fake("base")
    gw = await gateway([backend], tracing={"otlp_endpoint": endpoint})
    backend.settings.fail = "500"
    assert await chat(gw.url, {}) == 502
    await gw.close()
    (span,) = spans
    assert not span.parent_span_id
    assert span.status.code == 2  # ERROR
    assert attributes(span)["http.response.status_code"] == 502
    assert [event.name for event in span.events] == ["backend attempt failed"]


async def test_with_tracing_off_the_callers_traceparent_passes_through(fake: StartFake, gateway: StartGateway) -> None:
    backend = await fake("base")
    gw = await gateway([backend])
    assert gw.tracing is None
    assert await chat(gw.url, {"traceparent": TRACEPARENT}) == 200
    assert backend.stats.last_request_headers.get("traceparent") == TRACEPARENT
