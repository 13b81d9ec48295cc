"""OpenTelemetry traces, when `tracing.otlp_endpoint` is set: one span per request, its stages as events.

Off by default and then free: nothing here is imported or put in the pipeline. On, the outermost stage
starts a server span (continuing the caller's trace from its `traceparent` header), the pipeline adds
events as it goes (cache result, each backend attempt, first token), and the span ends with the answer's
status, model, backend, tokens and cache result. The span's `traceparent` is sent to the backend, so a
vLLM started with `--otlp-traces-endpoint` shows its own spans under the gateway's. Spans are exported in
batches over OTLP/HTTP from a background thread (the SDK's BatchSpanProcessor); a collector that is down
costs dropped spans, never a slower request.
"""

from __future__ import annotations

import time
from typing import Any

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from sluice import __version__
from sluice.config import TracingConfig
from sluice.context import Handler, RequestContext
from sluice.pipeline.errors import CLIENT_CLOSED

PROPAGATOR = TraceContextTextMapPropagator()


class Tracing:
    """The tracer provider and exporter (one per process), closed with the gateway."""

    def __init__(self, config: TracingConfig) -> None:
        assert config.otlp_endpoint is not None
        resource = Resource.create({"service.name": config.service_name, "service.version": __version__})
        self.provider = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)))
        exporter = OTLPSpanExporter(endpoint=config.otlp_endpoint, timeout=config.export_timeout)
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("sluice")

    def close(self) -> None:
        self.provider.shutdown()  # flushes what is queued


class TracingStage:
    """Outermost: the span covers the whole request, error rendering and finalisation included."""

    def __init__(self, tracing: Tracing) -> None:
        self._tracer = tracing.tracer

    async def __call__(self, ctx: RequestContext, call_next: Handler) -> None:
        request = ctx.request
        carrier = {"traceparent": value.decode("latin-1")} if (value := request.header(b"traceparent")) else {}
        started_ns = time.time_ns() - int((time.perf_counter() - ctx.started) * 1e9)
        span = self._tracer.start_span(
            f"{request.method} {request.path}",
            context=PROPAGATOR.extract(carrier),
            kind=SpanKind.SERVER,
            start_time=started_ns,
            attributes={"http.request.method": request.method, "url.path": request.path,
                        "sluice.request_id": ctx.request_id},
        )  # fmt: skip
        ctx.span = span
        if span.is_recording():
            headers: dict[str, str] = {}
            PROPAGATOR.inject(headers, context=trace.set_span_in_context(span))
            ctx.traceparent = headers.get("traceparent", "").encode("latin-1")
        status = CLIENT_CLOSED
        try:
            await call_next(ctx)
            status = ctx.writer.status
        finally:
            _finish(span, ctx, status)


def _finish(span: Any, ctx: RequestContext, status: int) -> None:
    if not span.is_recording():
        span.end()
        return
    route = ctx.route
    if route is not None:
        span.update_name(f"{ctx.request.method} {route.name}")
    attributes: dict[str, Any] = {"http.response.status_code": status}
    if ctx.model:
        attributes["gen_ai.request.model"] = ctx.model
    if ctx.served_model:
        attributes["gen_ai.response.model"] = ctx.served_model
    if ctx.backend:
        attributes["sluice.backend"] = ctx.backend
    attributes["sluice.attempts"] = ctx.attempts
    if ctx.cache_result is not None:
        attributes["sluice.cache"] = ctx.cache_result
    if ctx.stream:
        attributes["sluice.stream"] = True
    usage = ctx.usage or {}
    for name, key in (("gen_ai.usage.input_tokens", "prompt_tokens"), ("gen_ai.usage.output_tokens",
                                                                       "completion_tokens")):  # fmt: skip
        if isinstance(usage.get(key), int):
            attributes[name] = usage[key]
    if ctx.ttft is not None:
        attributes["sluice.ttft_ms"] = round(ctx.ttft * 1000, 3)
    principal = ctx.principal
    if principal is not None:
        attributes["sluice.key"] = principal.name
        if principal.tenant:
            attributes["sluice.tenant"] = principal.tenant
    span.set_attributes(attributes)
    if status >= 500 or status == 0:
        span.set_status(Status(StatusCode.ERROR))
    span.end()
