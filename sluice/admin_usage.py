"""Usage per key and model from the audit log: every caller's for the operator, one's own for a caller.

    GET /admin/usage?key=K&model=M&since=24h&until=WHEN&daily=1   (the admin credential)
    GET /v1/usage?model=M&since=24h&until=WHEN&daily=1            (any API key or token: its own rows only)

Every parameter is optional: `since` defaults to 24h, `until` to now; `since`/`until` take 30m, 24h, 7d,
2w, dates and times (sluice/audit/usage.py). The answer is `{"object": "list", "since", "until", "data"}`,
the same document `sluice usage --json` prints; with `daily=1` the rows come from the daily roll-up and
`since`/`until` are the UTC days covered ([since, until)). Without an open database (the audit log off)
the endpoint answers 503. A caller's report is filtered by its exact caller id (`static:<name>`,
`key:<id>`, `jwt:<issuer>:<subject>`) on the server side, so no parameter can widen it to another tenant.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

import orjson

from sluice.audit.usage import (
    InvalidWindow,
    daily_usage,
    days_overlapping,
    report_document,
    report_window,
    usage_report,
)
from sluice.context import RequestContext
from sluice.errors import GatewayError, InvalidRequest
from sluice.store.database import Database, DatabaseUnavailable

PARAMETERS = ("key", "model", "since", "until", "daily")
OWN_PARAMETERS = ("model", "since", "until", "daily")  # no `key`: a caller sees only itself
RETRY_AFTER = (("retry-after", "5"),)
DAILY = {"1": True, "true": True, "0": False, "false": False, "": False}


class UsageUnavailable(GatewayError):
    status = 503
    type = "service_unavailable"
    code = "audit_log_unavailable"


class AdminUsage:
    def __init__(self, database: Callable[[], Database | None]) -> None:
        """`database` gives the open database, if any (the audit log may connect after start-up)."""
        self._database = database

    async def report(self, ctx: RequestContext) -> None:
        """`GET /admin/usage`: any caller's usage, filtered by `key` if given."""
        query = _query(ctx.request.query or "", PARAMETERS)
        await self._answer(ctx, query, key=query.get("key") or None, caller=None)  # `?key=` filters nothing

    async def own(self, ctx: RequestContext) -> None:
        """`GET /v1/usage`: the calling key's (or token subject's) own usage, nothing else."""
        query = _query(ctx.request.query or "", OWN_PARAMETERS)
        principal = ctx.principal
        assert principal is not None  # an API route: authenticated before it gets here
        await self._answer(ctx, query, key=None, caller=principal.subject or principal.name)

    async def _answer(self, ctx: RequestContext, query: dict[str, str], key: str | None, caller: str | None) -> None:
        database = self._database()
        if database is None:
            raise UsageUnavailable(
                "Usage reports read the audit log, and this gateway has no database open: enable the audit log "
                "(audit.enabled: true) with database.url set, or run `sluice usage --config FILE` where the "
                "database is reachable."
            )
        try:
            since, until = report_window(query.get("since", "24h"), query.get("until"), datetime.now(UTC))
        except InvalidWindow as exc:
            raise InvalidRequest(f"{exc.param}: {exc}", param=exc.param) from None
        model = query.get("model") or None
        try:
            if _daily(query.get("daily", "")):
                first, last = days_overlapping(since, until)
                days = await daily_usage(database, since=first, until=last, key=key, model=model, caller=caller)
                document: dict[str, Any] = report_document(first, last, days)
            else:
                rows = await usage_report(
                    database, since=since, until=until, key=key, model=model, caller=caller
                )
                document = report_document(since, until, rows)
        except DatabaseUnavailable as exc:
            raise UsageUnavailable(f"The audit log cannot be read now: {exc}", headers=RETRY_AFTER) from None
        ctx.writer.send(200, orjson.dumps(document))


def _query(raw: str, accepted: tuple[str, ...]) -> dict[str, str]:
    """The query's parameters, each given at most once; anything else is a 400 naming what is accepted."""
    listed = ", ".join(accepted)
    try:
        parsed = parse_qs(raw, keep_blank_values=True, strict_parsing=bool(raw), max_num_fields=len(accepted))
    except ValueError:
        raise InvalidRequest(f"The query string is malformed or too long; use {listed}.") from None
    for name, values in parsed.items():
        if name not in accepted:
            raise InvalidRequest(f"Unknown parameter {name[:100]!r}; use {listed}.", param=name[:100])
        if len(values) > 1:
            raise InvalidRequest(f"Give {name} once.", param=name)
        if "\x00" in values[0]:  # PostgreSQL cannot compare text with NUL in it
            raise InvalidRequest(f"{name} cannot contain NUL characters.", param=name)
    return {name: values[0] for name, values in parsed.items()}


def _daily(value: str) -> bool:
    if value.lower() not in DAILY:
        raise InvalidRequest(f"daily: {value[:100]!r} is not 1, true, 0 or false.", param="daily")
    return DAILY[value.lower()]

