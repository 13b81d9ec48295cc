"""What a soak run measured, the bars it must meet, and its tables (Markdown, printed and for the docs).

Success is counted over every request except streams cut by a deliberately killed backend after their
first byte (those cannot be retried: the client already has part of the answer). A cut is excluded only
when it is provably one of those: the stream ended with the gateway's `stream_interrupted` error event,
the audit log names the backend that served it, and that backend was SIGKILLed while the request was in
flight. Any other cut counts as a failure. 429s of the metered key are the limit working and count as
successes; a 429 on any other key is a failure.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from bench.soak_chaos import ChaosEvent, ChaosPlan
from bench.soak_sampler import Window
from bench.soak_users import Outcome

SUCCESS_MIN = 0.999
RSS_GROWTH_MAX = 0.05
KILL_SLACK_S = 0.5  # a stream's end is observed a moment after the kill that cut it


@dataclass(frozen=True, slots=True)
class AuditRow:
    backend: str | None
    status: int
    error_type: str | None
    attempts: int


@dataclass(frozen=True, slots=True)
class AuditCount:
    rows: int
    distinct_ids: int
    by_id: dict[str, AuditRow]
    flush_wait_s: float  # from the end of the load until the count was taken


@dataclass(frozen=True, slots=True)
class Bar:
    name: str
    measured: str
    limit: str
    held: bool


@dataclass(slots=True)
class SoakReport:
    """Everything measured, as data; `rows` and `bars` are what the tables show."""

    machine: str
    duration_s: float
    window_s: float
    users: int
    workers: int
    chaos: str
    events: list[ChaosEvent]
    requests: int
    answered: int
    succeeded: int
    eligible: int
    excluded_cuts: int
    failures: Counter[str]
    failure_examples: list[str]
    status_counts: dict[int, int]
    windows: list[Window]
    audit_rows: int
    audit_missing: int
    rows: list[tuple[str, str]] = field(default_factory=list)
    bars: list[Bar] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def success_ratio(self) -> float:
        return self.succeeded / self.eligible if self.eligible else math.nan

    @property
    def held(self) -> bool:
        return bool(self.bars) and all(bar.held for bar in self.bars)

    def missed(self) -> list[Bar]:
        return [bar for bar in self.bars if not bar.held]


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(share * len(ordered)) - 1))]


def _ms(value: float) -> str:
    return "—" if math.isnan(value) else f"{value * 1000:,.0f}"


FD_SLACK_NOTE = (
    "Descriptor slack: a worker's descriptors are its listening socket, the clients' keep-alive connections "
    "(steady), Redis and PostgreSQL connections (bounded by their pools) and one upstream connection per request in "
    "flight to a backend (closed 4 s after it goes idle). Only that last part moves with the load, and it follows "
    "the number of requests in flight, which is random; 10 % of the second window's maximum (at least 10) covers "
    "that noise, while a leak of one descriptor per request would pass it within seconds at this rate."
)
IDLE_NOTE = (
    "Idle descriptors are counted before the load (every worker listening) and 8 s after it (clients gone, idle "
    "upstream connections closed after 4 s). Connections to PostgreSQL and Redis are left out: their pools open "
    "them on demand (a worker opens its Redis connections on first use) and keep them; PostgreSQL's are held to "
    "database.pool_size per worker. One descriptor per worker of slack covers a health or discovery probe open at "
    "that instant."
)


def fd_slack(second: Window) -> int:
    """Allowed growth of the descriptor count's maximum between the second and the last window (FD_SLACK_NOTE)."""
    return max(10, math.ceil(second.fds_max * 0.10))


@dataclass(frozen=True, slots=True)
class Inputs:
    machine: str
    duration_s: float
    window_s: float
    users: int
    workers: int
    metered_key: str
    plan: ChaosPlan
    events: list[ChaosEvent]
    kills: list[tuple[str, float]]
    planned_steps: int
    outcomes: list[Outcome]
    audit: AuditCount
    windows: dict[str, Window | None]
    idle_fds: tuple[Counter[str], Counter[str]]  # the gateway's descriptors by kind, before and after the load
    postgres_pool: int  # database.pool_size: PostgreSQL connections a worker may keep open
    notes: list[str]


def analyse(inputs: Inputs) -> SoakReport:
    outcomes = inputs.outcomes
    audit = inputs.audit
    failures: Counter[str] = Counter()
    examples: list[str] = []
    succeeded = excluded = unexplained_cuts = 0
    for outcome in outcomes:
        if outcome.kind == "ok" or (
            outcome.kind == "refused" and outcome.status == 429 and outcome.key == inputs.metered_key
        ):
            succeeded += 1
            continue
        if outcome.kind == "cut" and _cut_by_kill(outcome, audit.by_id.get(outcome.request_id), inputs.kills):
            excluded += 1
            continue
        label = f"{outcome.kind} {outcome.status}" if outcome.status else outcome.kind
        if outcome.kind == "cut":
            unexplained_cuts += 1
            label = "cut, not by a kill"
        failures[label] += 1
        if len(examples) < 8:
            examples.append(f"{label} ({'stream' if outcome.stream else 'plain'}, id {outcome.request_id or '—'}, "
                            f"t={outcome.started:.1f}): {outcome.detail[:160]}")  # fmt: skip
    status_counts = dict(sorted(Counter(o.status for o in outcomes).items()))
    answered = sum(1 for o in outcomes if o.status)
    eligible = len(outcomes) - excluded
    seen_ids = {o.request_id for o in outcomes if o.request_id}
    missing = len(seen_ids - audit.by_id.keys())
    report = SoakReport(
        machine=inputs.machine,
        duration_s=inputs.duration_s,
        window_s=inputs.window_s,
        users=inputs.users,
        workers=inputs.workers,
        chaos=inputs.plan.describe(),
        events=inputs.events,
        requests=len(outcomes),
        answered=answered,
        succeeded=succeeded,
        eligible=eligible,
        excluded_cuts=excluded,
        failures=failures,
        failure_examples=examples,
        status_counts=status_counts,
        windows=[w for w in inputs.windows.values() if w is not None],
        audit_rows=audit.rows,
        audit_missing=missing,
        notes=[*inputs.notes, FD_SLACK_NOTE, IDLE_NOTE],
    )
    report.rows = _rows(inputs, report, unexplained_cuts)
    report.bars = _bars(inputs, report)
    return report


def _cut_by_kill(outcome: Outcome, row: AuditRow | None, kills: list[tuple[str, float]]) -> bool:
    if row is None or row.error_type != "stream_interrupted" or not row.backend:
        return False
    return any(
        name == row.backend and outcome.started - KILL_SLACK_S <= at <= outcome.ended + KILL_SLACK_S
        for name, at in kills
    )


def _rows(inputs: Inputs, report: SoakReport, unexplained_cuts: int) -> list[tuple[str, str]]:
    outcomes = inputs.outcomes
    ok = [o for o in outcomes if o.kind == "ok"]
    ok_streams = [o.ttft_s for o in ok if o.stream and o.ttft_s is not None]
    served = [o.ttft_s for o in ok if o.stream and o.ttft_s is not None and not o.cache.startswith("hit")]
    repeated = [o for o in outcomes if o.repeated and o.status == 200]
    hits = sum(1 for o in repeated if o.cache.startswith("hit"))
    metered = [o for o in outcomes if o.key == inputs.metered_key]
    limited_metered = sum(1 for o in metered if o.status == 429)
    retried = sum(1 for row in inputs.audit.by_id.values() if row.attempts > 1)
    statuses = ", ".join(f"{status or 'none'}: {count:,}" for status, count in report.status_counts.items())
    failures = ", ".join(f"{label}: {count}" for label, count in report.failures.most_common()) or "none"
    latencies = [o.latency_s for o in ok]
    sent = f"{report.requests:,} ({report.requests / inputs.duration_s:.1f}/s offered by {inputs.users} users)"
    cut = f"{report.excluded_cuts:,} (each matched to a kill of the backend that served it, while in flight)"
    if unexplained_cuts:
        failures += f" ({unexplained_cuts} cuts not explained by a kill)"
    limited = f"{limited_metered:,} of {len(metered):,} / {report.status_counts.get(429, 0) - limited_metered:,}"
    audit = (
        f"{report.audit_rows:,} / {report.requests:,} (answered ids missing: {report.audit_missing}; "
        f"counted {inputs.audit.flush_wait_s:.0f} s after the load ended)"
    )
    rows = [
        ("requests sent", sent),
        ("HTTP statuses", statuses),
        ("streams cut by a killed backend (excluded)", cut),
        ("success ratio", f"{report.success_ratio:.4%} ({report.succeeded:,} of {report.eligible:,})"),
        ("failures", failures),
        ("429 (metered key / other keys)", limited),
        ("503", f"{report.status_counts.get(503, 0):,}"),
        ("retried on another backend (audit: attempts > 1)", f"{retried:,}"),
        (
            "latency p50 / p99 ms (complete answers)",
            f"{_ms(percentile(latencies, 0.5))} / {_ms(percentile(latencies, 0.99))}",
        ),
        (
            "TTFT p50 / p99 ms (complete streams)",
            f"{_ms(percentile(ok_streams, 0.5))} / {_ms(percentile(ok_streams, 0.99))}",
        ),
        (
            "TTFT p50 / p99 ms (streams a backend served)",
            f"{_ms(percentile(served, 0.5))} / {_ms(percentile(served, 0.99))}",
        ),
        ("cache hits (repeated questions answered 200)", f"{hits:,} of {len(repeated):,}"),
        ("audit rows / requests sent", audit),
    ]
    first, second, last = (inputs.windows.get(name) for name in ("first", "second", "last"))
    if first is not None and second is not None and last is not None:
        from_first, from_second = (
            last.rss_mib_mean / first.rss_mib_mean - 1,
            last.rss_mib_mean / second.rss_mib_mean - 1,
        )
        rows.append(
            ("gateway RSS growth (mean): first → last, second → last window", f"{from_first:+.1%}, {from_second:+.1%}")
        )
    before, after = inputs.idle_fds
    rows.append(("gateway descriptors while idle, before → after the load", _kinds_change(before, after)))
    for window in report.windows:
        span = f"{window.start_s:.0f}–{window.end_s:.0f} s"
        rows.append(
            (
                f"gateway RSS MiB mean / max, fds mean / max: {window.label} ({span})",
                f"{window.rss_mib_mean:.1f} / {window.rss_mib_max:.1f}, {window.fds_mean:.0f} / {window.fds_max}"
                f" ({window.workers} worker pid(s)); max by kind: "
                + ", ".join(f"{kind} {count}" for kind, count in window.kinds_max.items()),
            )
        )
    return rows


def _kinds_change(before: Counter[str], after: Counter[str]) -> str:
    kinds = sorted(before.keys() | after.keys())
    changes = ", ".join(f"{kind} {before[kind]} → {after[kind]}" for kind in kinds)
    return f"{before.total()} → {after.total()} ({changes})"


def _steady(kinds: Counter[str]) -> int:
    """Descriptors that must not grow once idle: all but the store pools' connections."""
    return kinds.total() - kinds["postgres"] - kinds["redis"]


def _bars(inputs: Inputs, report: SoakReport) -> list[Bar]:
    bars = [
        Bar("success (cut streams excluded)", f"{report.success_ratio:.4%}", f"≥ {SUCCESS_MIN:.1%}",
            report.success_ratio >= SUCCESS_MIN),
        Bar("audit rows = requests the gateway received", f"{report.audit_rows:,} rows, {report.requests:,} sent, "
            f"{report.answered:,} answered, {report.audit_missing} answered ids missing",
            "every answered id present; rows ≤ sent",
            report.audit_missing == 0 and report.answered <= report.audit_rows <= report.requests),
        Bar("no duplicate audit rows", f"{inputs.audit.rows - inputs.audit.distinct_ids} duplicates", "0",
            inputs.audit.rows == inputs.audit.distinct_ids),
        Bar("chaos ran as planned", f"{len(inputs.events)} of {inputs.planned_steps} steps", "all",
            len(inputs.events) == inputs.planned_steps),
    ]  # fmt: skip
    before, after = inputs.idle_fds
    pool_cap = inputs.postgres_pool * inputs.workers
    steady_before, steady_after = _steady(before), _steady(after)
    bars.append(
        Bar(
            "no descriptor leak: idle after the load vs before",
            f"{steady_before} → {steady_after} besides the store pools; PostgreSQL {before['postgres']} → "
            f"{after['postgres']}, Redis {before['redis']} → {after['redis']}",
            f"≤ {steady_before} + {inputs.workers}; PostgreSQL ≤ {pool_cap} (its pools)",
            steady_after <= steady_before + inputs.workers and after["postgres"] <= pool_cap,
        )
    )
    second, last = inputs.windows.get("second"), inputs.windows.get("last")
    if second is None or last is None or second.end_s > last.start_s:
        bars.append(Bar("RSS and fds measurable", "too short a run", "second and last windows apart", False))
        return bars
    growth = last.rss_mib_mean / second.rss_mib_mean - 1
    slack = fd_slack(second)
    bars += [
        Bar("RSS growth, second → last window (mean)",
            f"{second.rss_mib_mean:.1f} → {last.rss_mib_mean:.1f} MiB ({growth:+.1%})", f"≤ {RSS_GROWTH_MAX:+.0%}",
            growth <= RSS_GROWTH_MAX),
        Bar("fd growth, second → last window (max)", f"{second.fds_max} → {last.fds_max}",
            f"≤ {second.fds_max} + {slack}", last.fds_max <= second.fds_max + slack),
    ]  # fmt: skip
    return bars


def markdown(report: SoakReport) -> str:
    lines = [
        f"_Measured on {report.machine}; {report.users} users for {report.duration_s:g} s against three fake vLLM "
        f"backends through `sluice serve` with {report.workers} workers; windows of {report.window_s:g} s._",
        "",
        f"Chaos: {report.chaos}.",
        "",
        "| measure | value |",
        "|---|---|",
        *(f"| {label} | {value} |" for label, value in report.rows),
        "",
        "| bar | measured | limit | held |",
        "|---|---|---|---|",
        *(f"| {b.name} | {b.measured} | {b.limit} | {'yes' if b.held else '**no**'} |" for b in report.bars),
    ]
    if report.notes:
        lines += ["", *(f"- {note}" for note in report.notes)]
    if report.failure_examples:
        lines += ["", "First failures:", "", *(f"- {example}" for example in report.failure_examples)]
    return "\n".join(lines) + "\n"
