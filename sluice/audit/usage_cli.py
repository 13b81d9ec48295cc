"""`sluice usage`: who used which model, how much and how fast, from the audit log in `database.url`.

    sluice usage --config FILE [--key K] [--model M] [--since 24h] [--until WHEN] [--daily] [--json]

Reads the `requests` table (percentiles over the window) or, with `--daily`, the `usage_daily` roll-up
(one line per UTC day, cheap over months). Like `sluice keys`, it applies pending schema migrations first
and shares its conventions (sluice/cli_common.py): a table for people or, with `--json`, the same
document `GET /admin/usage` answers; exit codes 0 done, 1 the database failed or cannot be reached, 2
wrong usage or configuration (a bad `--since` included).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from datetime import UTC, datetime

from sluice.audit.usage import (
    ACCEPTED,
    DailyRow,
    InvalidWindow,
    UsageRow,
    daily_usage,
    days_overlapping,
    report_document,
    report_window,
    usage_report,
)
from sluice.cli_common import UsageError, common_options, run_command, table, when
from sluice.config import SluiceConfig
from sluice.store.database import Database
from sluice.store.migrations import upgrade


def main(argv: list[str]) -> int:
    """`sluice usage ...` (the arguments after `usage`)."""
    args = _parser().parse_args(argv)
    return run_command("sluice usage", lambda config: _usage(args, config), args.config)


async def _usage(args: argparse.Namespace, config: SluiceConfig) -> None:
    try:
        since, until = report_window(args.since, args.until, datetime.now(UTC))
    except InvalidWindow as exc:
        raise UsageError(f"--{exc.param}: {exc}") from None
    db = await Database.connect(config.database)
    try:
        await upgrade(db)
        if args.daily:
            first, last = days_overlapping(since, until)
            days = await daily_usage(db, since=first, until=last, key=args.key, model=args.model)
            title = f"Usage per UTC day from {first} to {last} (excluded)"
            _print(report_document(first, last, days), title, _daily_table(days), args.json)
        else:
            rows = await usage_report(db, since=since, until=until, key=args.key, model=args.model)
            title = f"Requests from {when(since)} to {when(until)}"
            _print(report_document(since, until, rows), title, _report_table(rows), args.json)
    finally:
        await db.close()


def _print(document: dict[str, object], title: str, table: str | None, as_json: bool) -> None:
    if as_json:
        print(json.dumps(document, indent=2))
        return
    print(f"{title}\n")
    print(table or "No requests in this window.")


def _report_table(rows: Sequence[UsageRow]) -> str | None:
    if not rows:
        return None
    headers = (
        "KEY",
        "ID",
        "MODEL",
        "REQUESTS",
        "ERRORS",
        "PROMPT",
        "COMPLETION",
        "P50 MS",
        "P95 MS",
        "P99 MS",
        "TTFT P50",
    )
    lines = [
        (
            r.key_name or "-",
            r.key_id or "-",
            r.model or "-",
            str(r.requests),
            str(r.errors),
            str(r.prompt_tokens),
            str(r.completion_tokens),
            _ms(r.latency_p50_ms),
            _ms(r.latency_p95_ms),
            _ms(r.latency_p99_ms),
            _ms(r.ttft_p50_ms),
        )
        for r in rows
    ]
    return table(headers, lines)


def _daily_table(days: Sequence[DailyRow]) -> str | None:
    if not days:
        return None
    headers = ("DAY", "ID", "MODEL", "REQUESTS", "ERRORS", "PROMPT", "COMPLETION", "MEAN MS")
    lines = [
        (
            d.day.isoformat(),
            d.key_id or "-",
            d.model or "-",
            str(d.requests),
            str(d.errors),
            str(d.prompt_tokens),
            str(d.completion_tokens),
            _ms(d.latency_mean_ms),
        )
        for d in days
    ]
    return table(headers, lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sluice usage",
        parents=[common_options()],
        description="Usage per key and model from the audit log in database.url.",
        epilog=f"--since and --until take {ACCEPTED}. Example: --since 7d --model base --daily",
    )
    parser.add_argument("--key", metavar="K", help="a key's name or id (k_abc, key:k_abc, static:NAME)")
    parser.add_argument("--model", metavar="M", help="the model requested")
    parser.add_argument("--since", default="24h", metavar="WHEN", help="start of the window (default: 24h ago)")
    parser.add_argument("--until", metavar="WHEN", help="end of the window, excluded (default: now)")
    parser.add_argument("--daily", action="store_true", help="one line per UTC day, from the daily roll-up")
    return parser
