"""Stopping an engine as a whole: vLLM's API server leads its own session, its engine-core and worker follow.

An engine is started with `start_new_session=True`, so its process-group id is the API server's pid and
the group holds every process vLLM spawned. Stopping sends SIGTERM to the group, waits until every member
has exited (vLLM shuts its children down in order), and only then SIGKILLs whatever is left.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path


def signal_group(pgid: int, signum: signal.Signals) -> None:
    """Signal every process of the group; a group that is already gone is fine."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def process_table() -> list[tuple[int, str, int, int]]:
    """(pid, state, ppid, pgrp) of every process, from /proc."""
    table: list[tuple[int, str, int, int]] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ..." — comm may hold spaces and parentheses, so split after the last ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2:
            table.append((int(entry.name), fields[0], int(fields[1]), int(fields[2])))
    return table


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of the group."""
    return [pid for pid, state, _ppid, pgrp in process_table() if state != "Z" and pgrp == pgid]


def terminate_group(pgid: int, timeout: float = 30.0) -> bool:
    """SIGTERM the group, wait up to `timeout` s for all of it to exit, then SIGKILL. True if it went quietly."""
    signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while group_members(pgid):
        if time.monotonic() >= deadline:
            signal_group(pgid, signal.SIGKILL)
            return False
        time.sleep(0.25)
    return True
