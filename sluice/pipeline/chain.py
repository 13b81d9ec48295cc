"""Composes the stages, in the order of one list, into a single handler built once at start-up."""

from __future__ import annotations

from collections.abc import Sequence

from sluice.context import Handler, RequestContext, Stage


def build_chain(stages: Sequence[Stage], terminal: Handler) -> Handler:
    handler = terminal
    for stage in reversed(stages):
        handler = _link(stage, handler)
    return handler


def _link(stage: Stage, call_next: Handler) -> Handler:
    async def handle(ctx: RequestContext) -> None:
        await stage(ctx, call_next)

    return handle
