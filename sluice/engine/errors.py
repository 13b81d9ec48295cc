"""The one error type of the engine commands: a message that says what went wrong and what to do."""

from __future__ import annotations


class EngineError(Exception):
    """Preparing, starting or talking to the local engine failed; `str(error)` is meant for the user."""
