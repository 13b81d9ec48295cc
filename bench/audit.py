"""The `audit` part of `make bench`: what the audit log costs the request path, and what its writer sustains.

1. The same gateway side by side, audit off vs audit on into PostgreSQL (a throwaway server pinned to the
   load generator's core, bench/postgres.py) vs audit on into SQLite, under wrk at c=1 and c=100: the
   throughput ratio is the cost of building and queueing a record per request plus the writer's batches,
   in the same process and core.
   After the runs, each audited gateway's /metrics must show every record written and none journaled,
   dropped or waiting: a gateway that merely queued would look free.
2. The writer alone: batches of `audit.batch_size` synthetic records inserted back to back by the same
   code the gateway uses (sluice/audit/sink.py), by one writer and by four at once (four replicas), into
   PostgreSQL with the daily partitions in place, and into SQLite. Rows per second, sustained.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench.env import BenchError
from bench.progress import Progress
from bench.scenarios import LoadReport, _measured, load_plan, run_load
from bench.targets import Lab, Skipped, Target

AUDIT_CONCURRENCY = (1, 100)
AUDIT_OFF = "sluice"
AUDIT_POSTGRES = "sluice+audit (postgres)"
AUDIT_SQLITE = "sluice+audit (sqlite)"
WRITER_SECONDS = 8.0
BATCH = 500


@dataclass(frozen=True, slots=True)
class WriterRow:
    database: str
    writers: int
    rows: int
    seconds: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds


@dataclass(slots=True)
class AuditReport(LoadReport):
    writer: list[WriterRow] = field(default_factory=list)
    written: dict[str, dict[str, int]] = field(default_factory=dict)  # target -> written/journaled/replayed
    cpu_us: dict[str, float] = field(default_factory=dict)  # target -> gateway CPU per request over every run


def plan(duration_s: float, rounds: int) -> tuple[int, float]:
    steps, seconds = load_plan(3, AUDIT_CONCURRENCY, duration_s, rounds)
    return steps + 3, seconds + 3 * WRITER_SECONDS


def run(lab: Lab, progress: Progress, *, duration_s: float, rounds: int) -> AuditReport:
    progress.note("audit: starting canned upstream and three Sluice gateways (audit off, PostgreSQL, SQLite)")
    upstream = lab.canned_upstream()
    database = lab.postgres()
    candidates: list[Target | Skipped] = [lab.preflight(lab.sluice(upstream, name=AUDIT_OFF))]
    for name, url in ((AUDIT_POSTGRES, database), (AUDIT_SQLITE, f"sqlite:///{lab.workdir}/audit.db")):
        section = f'database: {{url: "{url}"}}\naudit: {{journal_dir: "{lab.workdir}/journal-{name[-8:-1]}"}}\n'
        candidates.append(lab.preflight(lab.sluice(upstream, name=name, audit=section)))
    targets, skipped = _measured(candidates, progress, len(AUDIT_CONCURRENCY) * rounds, 0.0)
    before = {target.name: _cpu_and_requests(target) for target in targets}
    load = run_load(
        lab, progress, title="audit", targets=targets, skipped=skipped, concurrencies=AUDIT_CONCURRENCY,
        duration_s=duration_s, rounds=rounds, require_2xx=True,
    )  # fmt: skip
    report = AuditReport(load.targets, load.concurrencies, load.duration_s, load.rounds, load.rows,
                         load.rss_mib, load.skipped)  # fmt: skip
    for target in targets:
        if target.name != AUDIT_OFF:
            report.written[target.name] = _check_drained(target)
        cpu, requests = _cpu_and_requests(target)
        report.cpu_us[target.name] = (cpu - before[target.name][0]) / (requests - before[target.name][1]) * 1e6
    progress.step("audit: writer alone into PostgreSQL, 1 writer", WRITER_SECONDS)
    report.writer.append(asyncio.run(_writer_rate(database, 1)))
    progress.step("audit: writer alone into PostgreSQL, 4 writers", WRITER_SECONDS)
    report.writer.append(asyncio.run(_writer_rate(database, 4)))
    progress.step("audit: writer alone into SQLite, 1 writer", WRITER_SECONDS)
    report.writer.append(asyncio.run(_writer_rate(f"sqlite:///{lab.workdir}/writer.db", 1)))
    for row in report.writer:
        progress.note(f"{row.database}, {row.writers} writer(s): {row.rows_per_s:,.0f} rows/s")
    return report


def _cpu_and_requests(target: Target) -> tuple[float, float]:
    """The gateway process's CPU seconds so far (all its threads) and the requests it has answered."""
    assert target.service is not None
    fields = Path(f"/proc/{target.service.process.pid}/stat").read_text().rpartition(")")[2].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    with urllib.request.urlopen(target.base_url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    requests = sum(
        float(line.rpartition(" ")[2]) for line in text.splitlines() if line.startswith("sluice_requests_total{")
    )
    return cpu, requests


def _check_drained(target: Target) -> dict[str, int]:
    """What became of the gateway's records, once its queue and journal are empty (up to a minute).

    Records may go through the journal (a database slower than the traffic spills there, by design); none
    may be dropped, rejected or refused.
    """
    deadline = time.monotonic() + 60
    while True:
        with urllib.request.urlopen(target.base_url + "/metrics", timeout=5) as response:
            text = response.read().decode()
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith(
                ("sluice_audit_records_total{", "sluice_audit_queue_depth ", "sluice_audit_journal_bytes ")
            ):
                name, _, value = line.rpartition(" ")
                values[name.removeprefix('sluice_audit_records_total{outcome="').removesuffix('"}')] = float(value)
        if not values.get("sluice_audit_queue_depth") and not values.get("sluice_audit_journal_bytes"):
            break
        if time.monotonic() > deadline:
            raise BenchError(f"audit: {target.name} still had records waiting a minute after the runs: {values}")
        time.sleep(0.5)
    lost = {k: v for k, v in values.items() if k in ("dropped", "rejected", "invalid") and v}
    if lost:
        raise BenchError(f"audit: {target.name} lost or refused records: {lost}")
    return {k: int(values.get(k, 0)) for k in ("written", "journaled", "replayed")}


async def _writer_rate(url: str, writers: int) -> WriterRow:
    from datetime import UTC, datetime

    from sluice.audit.partitions import maintain
    from sluice.audit.record import COLUMNS
    from sluice.audit.sink import insert
    from sluice.config import DatabaseConfig
    from sluice.store.database import Database
    from sluice.store.migrations import upgrade

    database = await Database.connect(DatabaseConfig(url=url, pool_size=writers + 1))
    try:
        await upgrade(database)
        await maintain(database, today=datetime.now(UTC).date(), ahead=3, retention_days=30)
        template = dict.fromkeys(COLUMNS)
        template.update(method="POST", path="/v1/chat/completions", route="chat", model_requested="base",
                        model_served="base", backend="b0", stream=False, status=200, prompt_tokens=42,
                        completion_tokens=64, latency_ms=812.5, ttft_ms=95.25, attempts=1, key_id="key:k_bench",
                        key_name="bench", tenant="acme", client_ip="10.0.0.7", rate_limit="allowed")  # fmt: skip
        prefix = secrets.token_hex(6)
        counter = 0

        def batch() -> list[tuple[object, ...]]:
            nonlocal counter
            now = time.time()
            rows = []
            for _ in range(BATCH):
                counter += 1
                template.update(request_id=f"{prefix}{counter:08x}", received_at=now - 0.8, first_token_at=now - 0.7,
                                finished_at=now)  # fmt: skip
                rows.append(tuple(template[c] for c in COLUMNS))
            return rows

        done = 0
        started = time.perf_counter()
        stop = started + WRITER_SECONDS

        async def writer() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                await insert(database, batch())
                done += BATCH

        await asyncio.gather(*(writer() for _ in range(writers)))
        elapsed = time.perf_counter() - started
        kind = "PostgreSQL" if url.startswith("postgres") else "SQLite"
        return WriterRow(kind, writers, done, elapsed)
    finally:
        await database.close()


def markdown(report: AuditReport, preamble: str) -> str:
    off_high = next((r.result for r in report.rows if r.target == AUDIT_OFF and r.connections == 100), None)
    lines = [
        preamble,
        "| c | target | req/s | vs audit off | p50 ms | p99 ms | errors | RSS MiB |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for connections in report.concurrencies:
        off = next((r.result for r in report.rows if r.target == AUDIT_OFF and r.connections == connections), None)
        for row in (r for r in report.rows if r.connections == connections):
            result = row.result
            share = f"{result.requests_per_s / off.requests_per_s:.1%}" if off and row.target != AUDIT_OFF else "—"
            rss = report.rss_mib.get(row.target)
            rss_text = "—" if rss is None else f"{rss:.1f}"
            lines.append(
                f"| {connections} | {LABELS.get(row.target, row.target)} | {result.requests_per_s:,.0f} | {share} | "
                f"{result.p50_ms:.3f} | {result.p99_ms:.3f} | {result.errors} | {rss_text} |"
            )
    verdicts = []
    for name in (AUDIT_POSTGRES, AUDIT_SQLITE):
        high = next((r.result for r in report.rows if r.target == name and r.connections == 100), None)
        if off_high is not None and high is not None:
            verdicts.append(f"{LABELS[name]} {high.requests_per_s / off_high.requests_per_s:.1%}")
    if verdicts:
        lines.append(f"\nThroughput at c=100 relative to audit off: {'; '.join(verdicts)}.")
    off_cpu = report.cpu_us.get(AUDIT_OFF)
    if off_cpu:
        costs = [f"{LABELS[AUDIT_OFF]} {off_cpu:.0f} µs"]
        for name in (AUDIT_POSTGRES, AUDIT_SQLITE):
            if name in report.cpu_us:
                extra = report.cpu_us[name] / off_cpu - 1
                verdict = "met" if extra <= 0.05 else "not met"
                costs.append(f"{LABELS[name]} {report.cpu_us[name]:.0f} µs ({extra:+.1%}, {verdict})")
        lines.append(
            "Gateway CPU per request over all runs (its process, every thread; target: within 5 % of audit off): "
            + "; ".join(costs)
            + "."
        )
    for name, counts in report.written.items():
        lines.append(
            f"{LABELS[name]}: {counts['written']:,} records inserted as they came, {counts['journaled']:,} spilled "
            f"to the journal while the database lagged and {counts['replayed']:,} replayed from it; none dropped."
        )
    if report.writer:
        lines += ["", "| writer alone into | writers | rows | seconds | rows/s |", "|---|---:|---:|---:|---:|"]
        lines += [
            f"| {w.database} | {w.writers} | {w.rows:,} | {w.seconds:.1f} | {w.rows_per_s:,.0f} |"
            for w in report.writer
        ]
    lines += [f"- **{s.name}** not measured: {s.reason}" for s in report.skipped]
    return "\n".join(lines) + "\n"


LABELS = {
    AUDIT_OFF: "Sluice, audit off",
    AUDIT_POSTGRES: "Sluice + audit into PostgreSQL",
    AUDIT_SQLITE: "Sluice + audit into SQLite",
}
