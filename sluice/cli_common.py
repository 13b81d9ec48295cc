"""What the database commands (`sluice keys`, `sluice db`, `sluice usage`) share: loading `--config`,
one-line errors with exit codes, the common options, and plain-text tables.

Exit codes: 0 done, 1 the operation failed (database unreachable, no such key...), 2 wrong usage or
configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from typing import Any

from sluice.config import SluiceConfig
from sluice.config_loader import ConfigError, load_config
from sluice.store.database import DatabaseError


class UsageError(Exception):
    """Wrong arguments or configuration (exit code 2)."""


def run_command(
    prog: str,
    work: Callable[[SluiceConfig], Coroutine[Any, Any, None]],
    config_path: str,
    *,
    usage_errors: tuple[type[Exception], ...] = (),
    failures: tuple[type[Exception], ...] = (),
) -> int:
    """Load the configuration and run `work` with it; errors become one line on stderr and an exit code
    (`usage_errors` 2, like UsageError; `failures` 1, like DatabaseError)."""
    wrong_usage: tuple[type[Exception], ...] = (UsageError, *usage_errors)
    failed: tuple[type[Exception], ...] = (DatabaseError, *failures)
    try:
        try:
            config = load_config(config_path)
        except ConfigError as exc:
            raise UsageError(f"invalid configuration\n{exc}") from None
        asyncio.run(work(config))
    except wrong_usage as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except failed as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    return 0


def common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", required=True, metavar="FILE", help="the gateway's YAML configuration")
    common.add_argument("--json", action="store_true", help="print JSON for programs")
    return common


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = (headers, *rows)
    widths = [max(len(line[i]) for line in lines) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines)


def when(value: datetime | None, missing: str = "-") -> str:
    return missing if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
