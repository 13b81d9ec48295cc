"""Usage reports read from the audit log: per caller and model, over a time window or by UTC day.

`usage_report` groups the rows of `requests` received in [since, until) by (key_id, key_name, model
requested): request and error counts, token sums, latency p50/p95/p99 and time-to-first-token p50.
PostgreSQL computes the percentiles in SQL (`percentile_cont`); SQLite has no percentile functions, so its
rows are fetched and the same definition (linear interpolation between the two nearest ranks) is applied
here, which is fine at embedded scale and gives the same numbers for the same rows.

`daily_usage` reads the `usage_daily` roll-up instead: cheap over long periods, but without percentiles
(only the mean latency) and without key names.

A `key` filter takes whatever a user has at hand: the key's name, its id (`k_abc` or `key:k_abc`), or a
caller id such as `static:<name>`. `parse_since` reads `30m`, `24h`, `7d`, `2w`, dates and times, for
the command line (`sluice usage`) and the admin API (`GET /admin/usage`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sluice.store.database import Row, Session

PERCENTILES = (0.5, 0.95, 0.99)
MANAGED_KEY_PREFIX = "key:"  # how managed keys appear in key_id (static keys: static:<name>)
STATIC_KEY_PREFIX = "static:"
AGO = re.compile(r"(\d+)\s*([mhdw])")
UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
ACCEPTED = (
    "30m, 24h, 7d or 2w (minutes, hours, days or weeks ago), a date such as 2026-11-01 (00:00 UTC) "
    "or a time such as 2026-11-01T12:00:00Z"
)


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One caller's use of one model over the report's window."""

    key_id: str | None  # None: requests refused before a caller was known
    key_name: str | None
    model: str | None  # the model requested; None for requests without one (e.g. /v1/models)
    requests: int
    errors: int  # status >= 400
    prompt_tokens: int
    completion_tokens: int
    latency_p50_ms: float
    latency_p95_ms: float
    latency_p99_ms: float
    ttft_p50_ms: float | None  # over the requests that had a first token; None if none did

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class DailyRow:
    """One caller's use of one model on one UTC day (from the `usage_daily` roll-up)."""

    day: date
    key_id: str | None
    model: str | None
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    latency_mean_ms: float | None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "day": self.day.isoformat()}


class InvalidWindow(ValueError):
    """A report window that cannot be read; `param` names the bound at fault ("since" or "until").

    The message does not repeat `param`: the command line shows it as `--since`, the API as `since`.
    """

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def parse_since(text: str, now: datetime) -> datetime:
    """`30m`, `24h`, `7d`, `2w` before `now`, or an ISO date (00:00 UTC) or time (UTC unless it says)."""
    value = text.strip()
    ago = AGO.fullmatch(value)
    try:
        if ago is not None:
            return now - timedelta(**{UNITS[ago[2]]: int(ago[1])})
        moment = datetime.fromisoformat(value)
        moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment
        moment.astimezone(UTC)  # an offset can take it out of range (before year 1, after 9999) in UTC
    except (ValueError, OverflowError):
        raise ValueError(f"{text[:100]!r} is not a time; use {ACCEPTED}") from None
    return moment


def report_window(since: str, until: str | None, now: datetime) -> tuple[datetime, datetime]:
    """The [since, until) of a report from user text; `until` defaults to `now`. Raises InvalidWindow."""
    bounds: dict[str, datetime] = {}
    for param, text in (("since", since), ("until", until)):
        try:
            bounds[param] = now if text is None else parse_since(text, now)
        except ValueError as exc:
            raise InvalidWindow(str(exc), param) from None
    if bounds["since"] >= bounds["until"]:
        raise InvalidWindow(
            f"{bounds['since'].isoformat()} is not before until ({bounds['until'].isoformat()}); "
            "the window would be empty",
            "since",
        )
    return bounds["since"], bounds["until"]


def report_document(
    since: datetime | date, until: datetime | date, rows: Sequence[UsageRow] | Sequence[DailyRow]
) -> dict[str, Any]:
    """The report as `GET /admin/usage` and `sluice usage --json` give it."""
    return {
        "object": "list",
        "since": since.isoformat(),
        "until": until.isoformat(),
        "data": [row.as_dict() for row in rows],
    }


def days_overlapping(since: datetime, until: datetime) -> tuple[date, date]:
    """The UTC days [first, last) that [since, until) touches, for the daily report of that window."""
    first = since.astimezone(UTC).date()
    end = until.astimezone(UTC)
    last = end.date() if end.time() == time(0) or end.date() == date.max else end.date() + timedelta(days=1)
    return first, last


async def usage_report(
    db: Session,
    *,
    since: datetime,
    until: datetime | None = None,
    key: str | None = None,
    model: str | None = None,
    caller: str | None = None,
) -> list[UsageRow]:
    """Requests received in [since, until) per (key_id, key_name, model), ordered by key then model.

    `caller` keeps exactly one caller id's rows (a caller's own report); `key` is the operator's looser match.
    """
    args: list[Any] = []
    where = [f"received_at >= {_bind(args, since)}"]
    if until is not None:
        where.append(f"received_at < {_bind(args, until)}")
    if caller is not None:
        where.append(f"key_id = {_bind(args, caller)}")
    if key is not None:
        name, managed_id = _bind(args, key), _bind(args, MANAGED_KEY_PREFIX + key)
        where.append(f"(key_id IN ({name}, {managed_id}) OR key_name = {name})")
    if model is not None:
        where.append(f"model_requested = {_bind(args, model)}")
    condition = " AND ".join(where)
    if db.dialect == "postgres":
        rows = [_from_postgres(row) for row in await db.fetch(POSTGRES_REPORT.format(where=condition), *args)]
    else:
        rows = _summarise(await db.fetch(SQLITE_ROWS.format(where=condition), *args))
    return sorted(rows, key=lambda r: (r.key_id or "", r.key_name or "", r.model or ""))


async def daily_usage(
    db: Session,
    *,
    since: date,
    until: date | None = None,
    key: str | None = None,
    model: str | None = None,
    caller: str | None = None,
) -> list[DailyRow]:
    """The `usage_daily` rows of the UTC days in [since, until), ordered by day, key and model.

    `key` matches a caller id (`static:<name>`, `key:k_abc`), a managed key's id (`k_abc`) or name (every
    key that ever had that name), or a static key's name; the roll-up keeps no names of its own. `caller`
    keeps exactly one caller id's rows.
    """

    def day(value: date) -> Any:
        return value if db.dialect == "postgres" else value.isoformat()  # SQLite keeps days as YYYY-MM-DD text

    args: list[Any] = []
    where = [f"day >= {_bind(args, day(since))}"]
    if until is not None:
        where.append(f"day < {_bind(args, day(until))}")
    if caller is not None:
        where.append(f"key_id = {_bind(args, caller)}")
    if key is not None:
        name = _bind(args, key)
        ids = (name, _bind(args, MANAGED_KEY_PREFIX + key), _bind(args, STATIC_KEY_PREFIX + key))
        where.append(
            f"(key_id IN ({', '.join(ids)})"
            f" OR key_id IN (SELECT '{MANAGED_KEY_PREFIX}' || id FROM api_keys WHERE name = {name}))"
        )
    if model is not None:
        where.append(f"model = {_bind(args, model)}")
    rows = await db.fetch(DAILY.format(where=" AND ".join(where)), *args)
    return [_daily(row) for row in rows]


def percentile_cont(ordered: Sequence[float], fraction: float) -> float | None:
    """PostgreSQL's `percentile_cont(fraction)` of values sorted ascending, computed the way it does."""
    if not ordered:
        return None
    position = fraction * (len(ordered) - 1)
    lower, upper = math.floor(position), math.ceil(position)
    if lower == upper:
        return ordered[lower]
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


POSTGRES_REPORT = """
SELECT key_id, key_name, model_requested,
       count(*) AS requests,
       count(*) FILTER (WHERE status >= 400) AS errors,
       coalesce(sum(prompt_tokens), 0) AS prompt_tokens,
       coalesce(sum(completion_tokens), 0) AS completion_tokens,
       percentile_cont(ARRAY[0.5, 0.95, 0.99]::double precision[]) WITHIN GROUP (ORDER BY latency_ms) AS latency,
       percentile_cont(0.5::double precision) WITHIN GROUP (ORDER BY ttft_ms) AS ttft_p50_ms
FROM requests
WHERE {where}
GROUP BY key_id, key_name, model_requested
"""
SQLITE_ROWS = """
SELECT key_id, key_name, model_requested, status, prompt_tokens, completion_tokens, latency_ms, ttft_ms
FROM requests
WHERE {where}
"""
DAILY = """
SELECT day, key_id, model, requests, errors, prompt_tokens, completion_tokens, latency_ms_sum
FROM usage_daily
WHERE {where}
ORDER BY day, key_id, model
"""


def _bind(args: list[Any], value: Any) -> str:
    """Add `value` to a query's arguments; returns its placeholder."""
    args.append(value)
    return f"${len(args)}"


def _from_postgres(row: Row) -> UsageRow:
    p50, p95, p99 = row["latency"]
    return UsageRow(
        key_id=row["key_id"],
        key_name=row["key_name"],
        model=row["model_requested"],
        requests=row["requests"],
        errors=row["errors"],
        prompt_tokens=row["prompt_tokens"],
        completion_tokens=row["completion_tokens"],
        latency_p50_ms=p50,
        latency_p95_ms=p95,
        latency_p99_ms=p99,
        ttft_p50_ms=row["ttft_p50_ms"],
    )


def _summarise(rows: list[Row]) -> list[UsageRow]:
    """SQLite's rows of `requests` grouped and summarised as PostgreSQL's query does it."""
    groups: dict[tuple[str | None, str | None, str | None], list[Row]] = {}
    for row in rows:
        groups.setdefault((row["key_id"], row["key_name"], row["model_requested"]), []).append(row)
    summaries = []
    for (key_id, key_name, model), members in groups.items():
        latencies = sorted(float(r["latency_ms"]) for r in members)
        ttfts = sorted(float(r["ttft_ms"]) for r in members if r["ttft_ms"] is not None)
        p50, p95, p99 = (percentile_cont(latencies, fraction) for fraction in PERCENTILES)
        assert p50 is not None and p95 is not None and p99 is not None  # a group has at least one row
        summaries.append(
            UsageRow(
                key_id=key_id,
                key_name=key_name,
                model=model,
                requests=len(members),
                errors=sum(1 for r in members if r["status"] >= 400),
                prompt_tokens=sum(r["prompt_tokens"] or 0 for r in members),
                completion_tokens=sum(r["completion_tokens"] or 0 for r in members),
                latency_p50_ms=p50,
                latency_p95_ms=p95,
                latency_p99_ms=p99,
                ttft_p50_ms=percentile_cont(ttfts, 0.5),
            )
        )
    return summaries


def _daily(row: Row) -> DailyRow:
    day = row["day"]
    return DailyRow(
        day=day if isinstance(day, date) else date.fromisoformat(day),
        key_id=row["key_id"] or None,  # '' in the roll-up: no caller, or no model
        model=row["model"] or None,
        requests=int(row["requests"]),
        errors=int(row["errors"]),
        prompt_tokens=int(row["prompt_tokens"]),
        completion_tokens=int(row["completion_tokens"]),
        latency_mean_ms=float(row["latency_ms_sum"]) / row["requests"] if row["requests"] else None,
    )
