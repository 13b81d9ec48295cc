"""Admission for the audit log: with `audit.on_full: reject`, no new proxied request while its record has no room.

The audit writer's queue only fills when the database and the journal both refuse records (the disk is
full). Then a request that would leave no trace is refused with 503 before it uses a backend; health,
readiness and metrics stay available. Refused requests are counted (`sluice_audit_records_total`
{outcome="rejected"}), not recorded: recording them would need the room that is missing.
"""

from __future__ import annotations

from collections.abc import Awaitable

from sluice.audit.writer import AuditWriter
from sluice.context import RequestContext
from sluice.errors import GatewayError
from sluice.pipeline.errors import AUDIT_FULL


class AuditLogFull(GatewayError):
    status = 503
    type = "service_unavailable"
    code = AUDIT_FULL


class AuditGate:
    __slots__ = ("_retry_after", "_writer")

    def __init__(self, writer: AuditWriter, retry_after: int) -> None:
        self._writer = writer
        self._retry_after = (("retry-after", str(retry_after)),)

    def check(self, ctx: RequestContext) -> Awaitable[None] | None:
        route = ctx.route
        if route is not None and route.proxied and self._writer.saturated:
            self._writer.rejected()
            raise AuditLogFull(
                "The gateway cannot record requests right now (audit database and journal both unavailable) "
                "and is set to refuse them meanwhile (audit.on_full: reject); retry later.",
                headers=self._retry_after,
            )
        return None
