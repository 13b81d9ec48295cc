"""Composes the stages, in the order of one list, into a single handler built once at start-up.

Each link is a `functools.partial` binding a stage to the rest of the chain, so passing a request
along costs one coroutine per stage and no wrapper frames.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

from sluice.context import Handler, Stage


def build_chain(stages: Sequence[Stage], terminal: Handler) -> Handler:
    handler = terminal
    for stage in reversed(stages):
        handler = partial(stage.__call__, call_next=handler)
    return handler
