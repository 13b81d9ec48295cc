"""Composes the pipeline, in the order of one list, into a single handler built once at start-up.

Each `Stage` is bound to the rest of the chain with `functools.partial`. A run of consecutive `Check`s
becomes one plain function that runs them and returns the next step's coroutine unawaited, so checks
add no coroutine and no depth to the stack that every suspension of the request has to unwind. A check
that has to wait this time returns an awaitable; only then does the run continue in a coroutine.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import cast

from sluice.context import Check, Handler, RequestContext, Stage


def build_chain(steps: Sequence[Stage | Check], terminal: Handler) -> Handler:
    handler = terminal
    checks: list[Check] = []
    for step in reversed(steps):
        check = getattr(step, "check", None)
        if callable(check):
            checks.insert(0, cast(Check, step))
            continue
        handler = _with_checks(checks, handler)
        checks = []
        handler = partial(cast(Stage, step).__call__, call_next=handler)
    return _with_checks(checks, handler)


def _with_checks(checks: list[Check], call_next: Handler) -> Handler:
    if not checks:
        return call_next
    run = tuple(check.check for check in checks)

    def checked(ctx: RequestContext) -> Awaitable[None]:
        for i, check in enumerate(run):
            pending = check(ctx)
            if pending is not None:
                return _resume(pending, run[i + 1 :], call_next, ctx)
        return call_next(ctx)

    return checked


async def _resume(
    pending: Awaitable[None],
    rest: tuple[Callable[[RequestContext], Awaitable[None] | None], ...],
    call_next: Handler,
    ctx: RequestContext,
) -> None:
    """The rest of a run of checks after one had to wait."""
    await pending
    for check in rest:
        waiting = check(ctx)
        if waiting is not None:
            await waiting
    await call_next(ctx)
