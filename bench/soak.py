"""The soak: ``python -m bench.soak`` (``make soak``), ten minutes of realistic load under chaos.

100 simulated users (bench/soak_users.py) talk to a real gateway process (`sluice serve`, 2 workers) in
front of three fake vLLM backends (separate processes), with rate limits and the response cache in a
throwaway Redis and the audit log in a throwaway PostgreSQL (bench/soak_services.py), while a backend is
SIGKILLed and restarted every minute and Redis and PostgreSQL are each restarted once
(bench/soak_chaos.py). The gateway's memory and descriptors are sampled throughout (bench/soak_sampler.py).
At the end the audit log is given time to replay what it journaled, and the run is held to its bars
(bench/soak_report.py): the command exits 1 naming every bar missed. The table goes to stdout and, unless
``--no-write``, into the "Soak" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg
import uvloop

from bench.env import BenchError, machine
from bench.procs import REPO_ROOT, descendants, free_port
from bench.progress import Progress
from bench.soak_chaos import Chaos, ChaosPlan
from bench.soak_report import AuditCount, AuditRow, Inputs, SoakReport, analyse, markdown
from bench.soak_sampler import ProcessSampler, cpu_seconds, fd_kinds, machine_jiffies
from bench.soak_services import (
    ApiKey,
    BackendLatency,
    FakeBackend,
    GatewayProcess,
    ThrowawayPostgres,
    ThrowawayRedis,
    gateway_config,
)
from bench.soak_users import Mix, Outcome, Users

DEFAULT_DOC = REPO_ROOT / "docs" / "benchmarks.md"
DURATION_ENV = "SLUICE_SOAK_DURATION"
MARKERS = ("<!-- soak:start -->", "<!-- soak:end -->")
SECTION = "## Soak"
METERED_RPM = 60
POSTGRES_POOL = 5
STATUS_EVERY_S = 10.0
IDLE_SETTLE_S = 8.0  # after the load: idle upstream connections close after 4 s (timeouts.upstream_keepalive)


@dataclass(frozen=True, slots=True)
class SoakOptions:
    duration_s: float = 600.0
    kill_every_s: float = 60.0
    window_s: float = 60.0  # RSS and fds are compared between the second and the last window of this length
    users: int = 100
    workers: int = 2
    backend_down_s: float = 5.0
    store_down_s: float = 5.0
    sample_interval_s: float = 2.0
    flush_timeout_s: float = 120.0
    seed: int = 1
    logs: Path | None = None  # keep configs and process logs here (else a temporary folder)


def keys() -> tuple[list[ApiKey], ApiKey]:
    """Three ordinary keys (generous limit) and one metered key whose few users exceed its limit."""
    ordinary = [ApiKey(name, f"sk-soak-{name}-{secrets.token_hex(12)}") for name in ("team-a", "team-b", "team-c")]
    metered = ApiKey("metered", f"sk-soak-metered-{secrets.token_hex(12)}", requests_per_minute=METERED_RPM)
    return ordinary, metered


@contextlib.contextmanager
def workdir(options: SoakOptions) -> Iterator[Path]:
    if options.logs is not None:
        options.logs.mkdir(parents=True, exist_ok=True)
        yield options.logs
        return
    with tempfile.TemporaryDirectory(prefix="sluice-soak-") as folder:
        yield Path(folder)


async def soak(options: SoakOptions, progress: Progress | None = None) -> SoakReport:
    """Run the soak and return its report (bars included); raises BenchError when it cannot run at all."""
    progress = progress or Progress(total_steps=4, planned_s=options.duration_s + 30)
    ordinary, metered = keys()
    with workdir(options) as folder:
        redis = ThrowawayRedis(folder)
        postgres = ThrowawayPostgres(folder)
        backends = [FakeBackend(f"vllm-{n}", folder, BackendLatency()) for n in (1, 2, 3)]
        gateway: GatewayProcess | None = None
        try:
            progress.step("starting Redis, PostgreSQL, three fake vLLM backends and the gateway", 10)
            redis.start()
            postgres.init()
            postgres.start()
            for backend in backends:
                backend.start()
            port = free_port()
            config = gateway_config(
                port, options.workers, backends, [*ordinary, metered], redis_url=redis.url,
                database_url=postgres.url, journal_dir=folder / "journal", postgres_pool=POSTGRES_POOL,
            )  # fmt: skip
            gateway = GatewayProcess(folder, config, [*ordinary, metered], port)
            gateway.start()
            _wait_for_workers(gateway, options.workers)
            return await _measure(options, progress, gateway, backends, redis, postgres, ordinary, metered)
        finally:
            if gateway is not None:
                gateway.stop()
            for backend in backends:
                backend.stop()
            redis.remove()
            postgres.remove(keep_log_in=folder if options.logs else None)


def _wait_for_workers(gateway: GatewayProcess, workers: int, timeout_s: float = 30.0) -> None:
    """`/ready` is answered by the first worker up: wait until every worker listens (SO_REUSEPORT), so the
    load and the idle baseline of descriptors see them all."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        children = descendants(gateway.pid)
        if len(children) >= workers and fd_kinds(children, gateway.port, {})["listener"] >= workers:
            return
        time.sleep(0.1)
    raise BenchError(f"the gateway's {workers} workers were not all listening after {timeout_s:.0f} s")


async def _measure(
    options: SoakOptions,
    progress: Progress,
    gateway: GatewayProcess,
    backends: list[FakeBackend],
    redis: ThrowawayRedis,
    postgres: ThrowawayPostgres,
    ordinary: list[ApiKey],
    metered: ApiKey,
) -> SoakReport:
    mix = Mix(users=options.users)
    users = Users(gateway.url, ordinary, metered, mix, seed=options.seed)
    plan = ChaosPlan.for_run(
        options.duration_s, options.kill_every_s,
        backend_down_s=options.backend_down_s, store_down_s=options.store_down_s,
    )  # fmt: skip
    planned_steps = 2 * len(plan.kills_at_s) + 2 * (plan.redis_at_s is not None) + 2 * (plan.postgres_at_s is not None)
    peers = {backend.port: "backends" for backend in backends} | {redis.port: "redis", postgres.port: "postgres"}
    gateway_pids = [gateway.pid, *descendants(gateway.pid)]
    idle_before = fd_kinds(gateway_pids, gateway.port, peers)
    cpu_before = cpu_seconds(gateway_pids), time.process_time(), machine_jiffies()
    progress.step(f"load for {options.duration_s:g} s; chaos: {plan.describe()}", options.duration_s)
    started = time.monotonic()
    chaos = Chaos(plan, backends, redis, postgres, started)
    sampler = ProcessSampler(gateway.pid, started, options.sample_interval_s, gateway.port, peers)
    stop = asyncio.Event()
    connector = aiohttp.TCPConnector(limit=max(100, options.users + 20), limit_per_host=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        background = [
            asyncio.create_task(sampler.run(stop)),
            asyncio.create_task(_status(progress, users, sampler, chaos, stop)),
        ]
        try:
            await asyncio.gather(users.run(session, started + options.duration_s), chaos.run())
        finally:
            stop.set()
            await asyncio.gather(*background)
    load_ended = time.monotonic()
    load_s = load_ended - started
    gateway_pids = [gateway.pid, *descendants(gateway.pid)]
    cpu_after = cpu_seconds(gateway_pids), time.process_time(), machine_jiffies()
    progress.step("waiting for the audit log to write (and replay) every record", options.flush_timeout_s)
    audit = await _audit_rows(postgres.url, users.outcomes, options.flush_timeout_s)
    await asyncio.sleep(max(0.0, load_ended + IDLE_SETTLE_S - time.monotonic()))
    idle_after = fd_kinds([gateway.pid, *descendants(gateway.pid)], gateway.port, peers)
    progress.step("report", 0)
    window = options.window_s
    windows = {
        "first": sampler.window("first window", 0, window),
        "second": sampler.window("second window", window, 2 * window),
        "last": sampler.window("last window", options.duration_s - window, options.duration_s + 1),
    }
    busy = (cpu_after[2][0] - cpu_before[2][0]) / max(1, cpu_after[2][1] - cpu_before[2][1])
    notes = [
        f"CPU during the load: gateway (supervisor and workers) {(cpu_after[0] - cpu_before[0]) / load_s:.0%} of "
        f"one core, load generator {(cpu_after[1] - cpu_before[1]) / load_s:.0%} of one core; the whole machine "
        f"{busy:.0%} busy ({os.cpu_count()} cores, shared with whatever else ran)",
    ]
    return analyse(
        Inputs(
            machine=machine().describe(),
            duration_s=options.duration_s,
            window_s=window,
            users=options.users,
            workers=options.workers,
            metered_key=metered.name,
            plan=plan,
            events=chaos.events,
            kills=chaos.kills,
            planned_steps=planned_steps,
            outcomes=users.outcomes,
            audit=audit,
            windows=windows,
            idle_fds=(idle_before, idle_after),
            postgres_pool=POSTGRES_POOL,
            notes=notes,
        )
    )


async def _status(progress: Progress, users: Users, sampler: ProcessSampler, chaos: Chaos, stop: asyncio.Event) -> None:
    """A status line every STATUS_EVERY_S: requests so far, outcomes, memory, the last chaos step."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), STATUS_EVERY_S)
        outcomes = users.outcomes
        done = [o for o in outcomes if o.ended]
        ok = sum(1 for o in done if o.kind == "ok")
        refused = sum(1 for o in done if o.status == 429)
        unavailable = sum(1 for o in done if o.status == 503)
        last = sampler.samples[-1].at_s if sampler.samples else None
        now = [s for s in sampler.samples if s.at_s == last]
        memory = f"RSS {sum(s.rss_kib for s in now) / 1024:.0f} MiB, fds {sum(s.fds for s in now)}" if now else ""
        event = chaos.events[-1] if chaos.events else None
        happened = f"; last chaos: {event.what} {event.target} at {event.at_s:.0f} s" if event else ""
        progress.note(
            f"{time.monotonic() - chaos.started:5.0f} s: {len(done):,} requests, {ok:,} ok, {refused} 429, "
            f"{unavailable} 503, {users.in_flight} in flight; {memory}{happened}"
        )


async def _audit_rows(url: str, outcomes: list[Outcome], timeout_s: float) -> AuditCount:
    """Poll `requests` until every answered request id is there (then one more flush interval for the
    rest), or `timeout_s` passes; PostgreSQL may just have come back and the gateway may still replay."""
    expected = {o.request_id for o in outcomes if o.request_id}
    begun = time.monotonic()
    found: dict[str, AuditRow] = {}
    rows = 0
    settled_at: float | None = None
    while time.monotonic() - begun < timeout_s:
        try:
            connection = await asyncpg.connect(url, timeout=5)
            try:
                records = await connection.fetch(
                    "SELECT request_id, backend, status, error_type, attempts FROM requests"
                )
            finally:
                await connection.close()
        except (OSError, asyncpg.PostgresError):
            await asyncio.sleep(1)
            continue
        rows = len(records)
        found = {r["request_id"]: AuditRow(r["backend"], r["status"], r["error_type"], r["attempts"]) for r in records}
        if expected <= found.keys():
            if settled_at is not None and time.monotonic() - settled_at >= 2:
                break
            settled_at = settled_at or time.monotonic()
        await asyncio.sleep(1)
    return AuditCount(rows=rows, distinct_ids=len(found), by_id=found, flush_wait_s=time.monotonic() - begun)


def update_doc(path: Path, block: str) -> None:
    """Replace the text between the soak markers, or append the section with them."""
    start, end = MARKERS
    text = path.read_text() if path.exists() else ""
    body = f"{start}\n{block.rstrip()}\n{end}"
    if start in text and end in text and text.index(start) < text.index(end):
        before, rest = text.split(start, 1)
        text = before + body + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + f"\n\n{SECTION}\n\n{body}\n"
    path.write_text(text if text.endswith("\n") else text + "\n")


def parse_args(argv: list[str] | None) -> tuple[SoakOptions, bool, Path]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    default_duration = float(os.environ.get(DURATION_ENV, "600"))
    parser.add_argument("--duration", type=float, default=default_duration,
                        help=f"seconds of load (default 600, or ${DURATION_ENV})")  # fmt: skip
    parser.add_argument("--kill-every", type=float, default=60.0, help="seconds between backend kills (default 60)")
    parser.add_argument("--window", type=float, default=60.0,
                        help="length of the windows RSS and fds are compared over (default 60)")  # fmt: skip
    parser.add_argument("--users", type=int, default=100, help="simulated users (default 100)")
    parser.add_argument("--workers", type=int, default=2, help="gateway worker processes (default 2)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--logs", type=Path, help="keep the configuration and every process's log here")
    parser.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    parser.add_argument("--doc", type=Path, default=DEFAULT_DOC, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.window <= 0 or args.duration < 3 * args.window:
        parser.error("--duration must be at least three --window lengths (RSS compares the second and the last)")
    if args.users < 1 or args.workers < 1 or args.kill_every <= 0:
        parser.error("--users and --workers must be >= 1, --kill-every > 0")
    options = SoakOptions(
        duration_s=args.duration,
        kill_every_s=args.kill_every,
        window_s=args.window,
        users=args.users,
        workers=args.workers,
        seed=args.seed,
        logs=args.logs.resolve() if args.logs else None,
    )
    return options, not args.no_write, args.doc


def main(argv: list[str] | None = None) -> int:
    options, write, doc = parse_args(argv)
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            report = runner.run(soak(options))
    except BenchError as exc:
        print(f"soak: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("soak: interrupted", file=sys.stderr)
        return 130
    block = markdown(report)
    print(block)
    if write:
        update_doc(doc, block)
        print(f"soak: updated {doc}", file=sys.stderr)
    for bar in report.missed():
        print(f"soak: bar missed: {bar.name}: {bar.measured} (limit {bar.limit})", file=sys.stderr)
    return 0 if report.held else 1


if __name__ == "__main__":
    sys.exit(main())
