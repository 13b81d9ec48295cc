"""The outermost stage: renders errors and finalises every request, even when the client is gone.

A `GatewayError` becomes an OpenAI-style JSON error, or an SSE error event when a stream has already
started. Anything unexpected becomes a 500 that names the request id and nothing else; the traceback
goes to the log. Whatever happened, the request is then counted, logged and audited once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from sluice.audit.capture import RecordBuilder
from sluice.audit.writer import AuditWriter
from sluice.context import Handler, RequestContext
from sluice.errors import GatewayError, internal_error_body
from sluice.logs import AccessLog
from sluice.metrics import GatewayMetrics
from sluice.sse import data_event
from sluice.upstream.backends import Backends

log = logging.getLogger("sluice.errors")
AUDIT_FULL = "audit_log_full"  # refused for want of room in the audit log: counted, not recorded
CLIENT_CLOSED = 499  # nginx's code for "the client went away before the answer"
STATUS_TEXT = {code: str(code) for code in range(100, 600)}


class ErrorsStage:
    def __init__(
        self,
        metrics: GatewayMetrics,
        backends: Backends,
        access_log: AccessLog | None,
        on_finish: Callable[[RequestContext], None] | None = None,
        audit: tuple[AuditWriter, RecordBuilder] | None = None,
    ) -> None:
        self._metrics = metrics
        self._backends = backends
        self._access_log = access_log
        self._on_finish = on_finish  # settles what the rate limits reserved
        self._audit = audit

    async def __call__(self, ctx: RequestContext, call_next: Handler) -> None:
        self._metrics.in_flight += 1
        status = 0
        code: str | None = None
        try:
            await call_next(ctx)
            status = ctx.writer.status
            if ctx.stream_cut:
                code = "stream_interrupted"
        except GatewayError as error:
            status, code = answer_error(ctx, error), error.code
        except asyncio.CancelledError:
            status, code = CLIENT_CLOSED, "client_closed"
            raise
        except Exception:
            log.exception("unexpected error", extra={"request_id": ctx.request_id})
            status, code = answer_error(ctx, None), "internal_error"
        finally:
            self._finalize(ctx, status, code)

    def _finalize(self, ctx: RequestContext, status: int, code: str | None) -> None:
        if ctx.limit_ticket is not None and self._on_finish is not None:
            self._on_finish(ctx)
        metrics = self._metrics
        metrics.in_flight -= 1
        elapsed = time.perf_counter() - ctx.started
        route = ctx.route.name if ctx.route is not None else "unmatched"
        model = ctx.model if ctx.model and self._backends.knows(ctx.model) else ("" if not ctx.model else "unknown")
        metrics.requests.child(route, model, ctx.backend, STATUS_TEXT.get(status) or str(status)).inc()
        metrics.duration.child(route).observe(elapsed)
        if model and metrics.model_duration_on:
            metrics.model_duration.child(model).observe(elapsed)
        if ctx.ttft is not None:
            metrics.ttft.child(model).observe(ctx.ttft)
        if ctx.tpot is not None:
            metrics.tpot.child(model).observe(ctx.tpot)
        usage = ctx.usage
        if usage is not None:
            prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
            if isinstance(prompt, int):
                metrics.tokens.child(model, "prompt").inc(prompt)
            if isinstance(completion, int):
                metrics.tokens.child(model, "completion").inc(completion)
        matched = ctx.route
        if (
            self._audit is not None
            and code != AUDIT_FULL
            and (matched is None or (matched.audited and not matched.public))
        ):
            # every API and admin request, and every unknown path; not health checks, metrics scrapes, polls
            writer, builder = self._audit
            writer.submit(builder.build(ctx, status, code, elapsed))
        if self._access_log is not None:
            principal = ctx.principal
            self._access_log.write(
                {
                    "request_id": ctx.request_id,
                    "method": ctx.request.method,
                    "path": ctx.request.path,
                    "status": status,
                    "error": code,
                    "model": ctx.model or None,
                    "served_model": ctx.served_model or None,
                    "backend": ctx.backend or None,
                    "key": principal.name if principal else None,
                    "tenant": principal.tenant if principal else None,
                    "client_ip": ctx.client_ip,
                    "stream": ctx.stream,
                    "attempts": ctx.attempts,
                    "duration_ms": round(elapsed * 1000, 3),
                    "ttft_ms": round(ctx.ttft * 1000, 3) if ctx.ttft is not None else None,
                    "prompt_tokens": usage.get("prompt_tokens") if usage else None,
                    "completion_tokens": usage.get("completion_tokens") if usage else None,
                }
            )


def answer_error(ctx: RequestContext, error: GatewayError | None) -> int:
    """Tell the client about `error` (None: unexpected) in whatever form the response still allows."""
    writer = ctx.writer
    headers: tuple[tuple[str, str], ...] = ()
    if error is None:
        status, body = 500, internal_error_body(ctx.request_id)
    else:
        status, body, headers = error.status, error.body(), error.headers
    if not writer.started:
        writer.send(status, body, headers=headers)
        return status
    if not writer.finished:
        # The status line is gone; the client learns of the failure in-band, as OpenAI's SDK expects.
        writer.write(data_event(body))
        writer.end()
    return writer.status
