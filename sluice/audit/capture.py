"""What a finished request leaves in the audit log: its record, built from the request context.

Runs once per request in the outermost stage (sluice/pipeline/errors.py), for every answer: success,
refusal, backend failure, the client leaving. Strings that come from the client (path, model, user) are
cut to a bounded length so one request cannot write an unbounded row. Prompts and responses are kept
only for callers whose key logs bodies, cut at `audit.body_max_bytes`.
"""

from __future__ import annotations

import time
from typing import Any

from sluice.audit.record import Record
from sluice.context import RequestContext
from sluice.upstream.backends import Backends

MAX_TEXT = 256  # model names, users, tenants
MAX_PATH = 1024


class RecordBuilder:
    __slots__ = ("_backends", "_body_cap")

    def __init__(self, backends: Backends, body_max_bytes: int) -> None:
        self._backends = backends
        self._body_cap = body_max_bytes

    def build(self, ctx: RequestContext, status: int, error_code: str | None, elapsed: float) -> Record:
        """`elapsed`: seconds since the request arrived (the caller has measured it already)."""
        finished = time.time()
        received = finished - elapsed
        principal = ctx.principal
        usage = ctx.usage
        ttft = ctx.ttft
        route = ctx.route
        model = ctx.model[:MAX_TEXT] or None
        served = (ctx.served_model or ctx.model)[:MAX_TEXT] or None if ctx.backend else None
        user = principal.user if principal is not None else None
        if user is None and ctx.body is not None:
            field = ctx.body.get("user")
            user = field if isinstance(field, str) else None
        prompt_body = response_body = None
        if principal is not None and principal.log_bodies:
            cap = self._body_cap
            prompt_body = ctx.request.body[:cap].decode(errors="replace")
            response_body = bytes(ctx.capture[:cap]).decode(errors="replace") if ctx.capture is not None else None
        return (
            ctx.request_id,
            received,
            received + ttft if ttft is not None else None,
            finished,
            principal.tenant if principal is not None else None,
            principal.subject or principal.name if principal is not None else None,
            principal.name if principal is not None else None,
            user[:MAX_TEXT] if user else None,
            ctx.client_ip,
            ctx.request.method,
            ctx.request.path[:MAX_PATH],
            route.name if route is not None else None,
            model,
            served,
            self._adapter(ctx.backend, served) if served else None,
            ctx.backend or None,
            ctx.stream,
            status,
            error_code,
            _int(usage, "prompt_tokens"),
            _int(usage, "completion_tokens"),
            round(ttft * 1000, 3) if ttft is not None else None,
            round(elapsed * 1000, 3),
            ctx.attempts,
            ctx.cache_result,
            ctx.rate_limit,
            prompt_body,
            response_body,
        )

    def _adapter(self, backend_name: str, model: str) -> str | None:
        """`model` if it is a LoRA adapter: registered, or listed by its backend with a parent model."""
        if model in self._backends.registry:
            return model
        backend = self._backends.by_name.get(backend_name)
        card = backend.model_cards.get(model) if backend is not None else None
        return model if card is not None and card.get("parent") not in (None, model) else None


def _int(usage: dict[str, Any] | None, name: str) -> int | None:
    value = usage.get(name) if usage is not None else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None
