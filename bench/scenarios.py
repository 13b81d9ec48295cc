"""The wrk and stream scenarios: core (direct/sluice/nginx), limits (auth + rate limits), streams, stacks."""

from __future__ import annotations

import functools
import json
import math
import os
import secrets
import subprocess
import sys
from dataclasses import dataclass, field

from bench.env import BenchError
from bench.loadgen import WrkResult, run_wrk
from bench.progress import Progress
from bench.targets import STACKS, Lab, Skipped, Target

CORE_CONCURRENCY = (1, 10, 100)
LIMITS_CONCURRENCY = (1, 100)
LIMITS_BARE = "sluice"
LIMITS_REDIS = "sluice+limits (redis)"
LIMITS_LOCAL = "sluice+limits (in process)"
# High enough never to refuse at any throughput this harness reaches, yet every request is counted: one
# requests quota, one tokens quota reserved and settled, one concurrency lease taken and released.
UNREFUSABLE = {"requests_per_minute": 10**9, "tokens_per_minute": 10**9, "max_concurrency": 10**6}
LIMITS_HEADER = "x-ratelimit-limit-requests"
# The c=100 p50 target is about the limiter, not about queueing: measured again with 100 connections that
# offer this many requests/s together (about a fifth of the bare gateway's capacity on one core).
LIMITS_PACED_RATE = 1000
STACK_CONCURRENCY = (1, 100)
WARMUP_S = 1.0
WRK_OVERHEAD_S = 0.5
STREAMS = 100
STREAM_RUN_S = 1.3 + 1.0
STREAMS_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class LoadRow:
    """The representative (median by requests/s) wrk result of one target at one concurrency."""

    target: str
    connections: int
    result: WrkResult


@dataclass(slots=True)
class LoadReport:
    """A wrk scenario's results, in target order, with memory and what was skipped."""

    targets: list[str]
    concurrencies: tuple[int, ...]
    duration_s: float
    rounds: int
    rows: list[LoadRow] = field(default_factory=list)
    rss_mib: dict[str, float | None] = field(default_factory=dict)
    skipped: list[Skipped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    paced_rate: float = 0.0  # offered requests/s of the paced runs (0: none)
    paced: dict[str, WrkResult] = field(default_factory=dict)  # target -> median paced run at max(concurrencies)

    def get(self, target: str, connections: int) -> WrkResult | None:
        return next((r.result for r in self.rows if r.target == target and r.connections == connections), None)


@dataclass(frozen=True, slots=True)
class StreamRow:
    """Summary of the stream client against one target."""

    target: str
    streams: int
    ok: int
    tokens: int
    ttft_p50_ms: float
    ttft_p99_ms: float
    gap_p50_ms: float
    gap_p99_ms: float
    gap_max_ms: float
    errors: list[str]


@dataclass(slots=True)
class StreamReport:
    """The streaming scenario's results."""

    rounds: int
    rows: list[StreamRow] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def load_plan(targets: int, concurrencies: tuple[int, ...], duration_s: float, rounds: int) -> tuple[int, float]:
    """Steps and seconds a wrk scenario is expected to take."""
    runs = targets * len(concurrencies) * rounds
    return runs, runs * (duration_s + WRK_OVERHEAD_S) + targets * WARMUP_S


def stream_plan(rounds: int) -> tuple[int, float]:
    """Steps and seconds the streaming scenario is expected to take."""
    return 3, 3 * (rounds + 1) * STREAM_RUN_S


def _median_run(results: list[WrkResult]) -> WrkResult:
    ordered = sorted(results, key=lambda r: r.requests_per_s)
    return ordered[(len(ordered) - 1) // 2]


def _wrk_env(lab: Lab) -> dict[str, str]:
    return {**os.environ, "SLUICE_BENCH_KEY": lab.key}


def run_load(
    lab: Lab,
    progress: Progress,
    *,
    title: str,
    targets: list[Target],
    skipped: list[Skipped],
    concurrencies: tuple[int, ...],
    duration_s: float,
    rounds: int,
    require_2xx: bool = False,
) -> LoadReport:
    """Warm each target up, then wrk every target at every concurrency, ``rounds`` times interleaved.

    With ``require_2xx`` any answer that is not 2xx, warm-up included, stops the run with an error.
    """
    report = LoadReport([t.name for t in targets], concurrencies, duration_s, rounds, skipped=skipped)
    runs: dict[tuple[str, int], list[WrkResult]] = {}
    env = _wrk_env(lab)
    wrk = functools.partial(run_wrk, wrk=lab.tools.wrk, taskset=lab.tools.taskset, cpu=lab.cpus.rest, env=env)
    for target in targets:
        progress.note(f"{title}: warming up {target.name} ({WARMUP_S:g} s at c={max(concurrencies)})")
        warmup = wrk(target.chat_url, connections=max(concurrencies), duration_s=WARMUP_S)
        if require_2xx:
            _require_2xx(title, target.name, max(concurrencies), warmup, "warm-up")
    for round_no in range(1, rounds + 1):
        for target in targets:
            for connections in concurrencies:
                suffix = f", round {round_no}/{rounds}" if rounds > 1 else ""
                progress.step(
                    f"{title}: {target.name} c={connections} ({duration_s:g} s{suffix})",
                    duration_s + WRK_OVERHEAD_S,
                )
                result = wrk(target.chat_url, connections=connections, duration_s=duration_s)
                errors = f", {result.errors} errors" if result.errors else ""
                progress.note(
                    f"{result.requests_per_s:,.0f} req/s, p50 {result.p50_ms:.3f} ms, "
                    f"p99 {result.p99_ms:.3f} ms{errors}"
                )
                if require_2xx:
                    _require_2xx(title, target.name, connections, result, "run")
                runs.setdefault((target.name, connections), []).append(result)
    for target in targets:
        report.rss_mib[target.name] = target.rss_mib() if target.name != "direct" else None
        for connections in concurrencies:
            report.rows.append(LoadRow(target.name, connections, _median_run(runs[(target.name, connections)])))
    return report


def _require_2xx(title: str, target: str, connections: int, result: WrkResult, what: str) -> None:
    if result.non_2xx:
        raise BenchError(
            f"{title}: {target} answered {result.non_2xx:,} of {result.requests:,} requests with a non-2xx status "
            f"in the c={connections} {what}; every request must be admitted for the numbers to mean anything "
            f"(gateway logs: --logs DIR)"
        )


def _measured(
    targets: list[Target | Skipped], progress: Progress, steps_each: int, seconds_each: float
) -> tuple[list[Target], list[Skipped]]:
    ok = [t for t in targets if isinstance(t, Target)]
    skipped = [t for t in targets if isinstance(t, Skipped)]
    for item in skipped:
        progress.note(f"skipping {item.name}: {item.reason}")
        progress.skip(steps_each, seconds_each)
    return ok, skipped


def run_core(lab: Lab, progress: Progress, *, duration_s: float, rounds: int) -> LoadReport:
    """Non-streaming chat completions: direct vs Sluice vs nginx at concurrency 1, 10, 100."""
    progress.note("core: starting canned upstream, Sluice gateway and nginx proxy")
    upstream = lab.canned_upstream()
    candidates = [upstream, lab.preflight(lab.sluice(upstream)), lab.preflight(lab.nginx_proxy(upstream))]
    steps, seconds = load_plan(1, CORE_CONCURRENCY, duration_s, rounds)
    targets, skipped = _measured(candidates, progress, steps, seconds)
    return run_load(
        lab,
        progress,
        title="core",
        targets=targets,
        skipped=skipped,
        concurrencies=CORE_CONCURRENCY,
        duration_s=duration_s,
        rounds=rounds,
    )


def run_limits(lab: Lab, progress: Progress, *, duration_s: float, rounds: int) -> LoadReport:
    """Auth + rate limits on the hot path: bare Sluice vs per-key limits in Redis vs in process, c=1 and 100."""
    progress.note("limits: starting canned upstream and three Sluice gateways (no limits, Redis, in process)")
    upstream = lab.canned_upstream()
    notes: list[str] = []
    candidates: list[Target | Skipped] = [lab.preflight(lab.sluice(upstream, name=LIMITS_BARE))]
    try:
        redis = lab.redis()
    except BenchError as exc:
        candidates.append(Skipped(LIMITS_REDIS, str(exc)))
    else:
        prefix = f"sluice-bench-{secrets.token_hex(4)}:"  # fresh counters, apart from anything else in that Redis
        # fail_closed: a Redis failure answers 503, which the run refuses, instead of quietly limiting in process
        extra = (
            f'redis: {{url: "{redis.url}", key_prefix: "{prefix}"}}\nrate_limits: {{on_redis_failure: fail_closed}}\n'
        )
        gateway = lab.sluice(upstream, name=LIMITS_REDIS, key_limits=UNREFUSABLE, extra=extra)
        candidates.append(lab.preflight(gateway, header=LIMITS_HEADER))
        notes.append(f"Redis: {redis.description}, keys prefixed `{prefix}`")
    local = lab.sluice(upstream, name=LIMITS_LOCAL, key_limits=UNREFUSABLE)
    candidates.append(lab.preflight(local, header=LIMITS_HEADER))
    steps, seconds = load_plan(1, LIMITS_CONCURRENCY, duration_s, rounds)
    targets, skipped = _measured(candidates, progress, steps, seconds)
    report = run_load(
        lab,
        progress,
        title="limits",
        targets=targets,
        skipped=skipped,
        concurrencies=LIMITS_CONCURRENCY,
        duration_s=duration_s,
        rounds=rounds,
        require_2xx=True,
    )
    report.notes = notes
    _run_paced(lab, progress, report, targets, duration_s=duration_s, rounds=rounds)
    return report


def paced_plan(targets: int, duration_s: float, rounds: int) -> tuple[int, float]:
    """Steps and seconds of the limits part's paced runs."""
    return targets * rounds, targets * rounds * (duration_s + WRK_OVERHEAD_S)


def _run_paced(
    lab: Lab, progress: Progress, report: LoadReport, targets: list[Target], *, duration_s: float, rounds: int
) -> None:
    """Each target at the highest concurrency again, offered LIMITS_PACED_RATE requests/s in total."""
    connections = max(report.concurrencies)
    pause_ms = connections / LIMITS_PACED_RATE * 1000
    env = _wrk_env(lab)
    runs: dict[str, list[WrkResult]] = {}
    for round_no in range(1, rounds + 1):
        for target in targets:
            suffix = f", round {round_no}/{rounds}" if rounds > 1 else ""
            progress.step(
                f"limits: {target.name} c={connections} paced at {LIMITS_PACED_RATE:,} req/s "
                f"({duration_s:g} s{suffix})",
                duration_s + WRK_OVERHEAD_S,
            )
            result = run_wrk(
                target.chat_url,
                connections=connections,
                duration_s=duration_s,
                wrk=lab.tools.wrk,
                taskset=lab.tools.taskset,
                cpu=lab.cpus.rest,
                env=env,
                pause_ms=pause_ms,
            )
            progress.note(f"{result.requests_per_s:,.0f} req/s, p50 {result.p50_ms:.3f} ms, p99 {result.p99_ms:.3f} ms")
            _require_2xx("limits", target.name, connections, result, "paced run")
            runs.setdefault(target.name, []).append(result)
    report.paced_rate = LIMITS_PACED_RATE
    report.paced = {name: _median_by_p50(results) for name, results in runs.items()}


def _median_by_p50(results: list[WrkResult]) -> WrkResult:
    ordered = sorted(results, key=lambda r: r.p50_ms)
    return ordered[(len(ordered) - 1) // 2]


def run_stacks(lab: Lab, progress: Progress, *, duration_s: float, rounds: int) -> LoadReport:
    """The HTTP stack study: the same hot path on several Python stacks, next to nginx and Sluice."""
    progress.note("stacks: starting canned upstream, nginx, Sluice and the alternative stacks")
    upstream = lab.canned_upstream()
    candidates: list[Target | Skipped] = [
        upstream,
        lab.preflight(lab.nginx_proxy(upstream)),
        lab.preflight(lab.sluice(upstream)),
    ]
    candidates += [lab.preflight(lab.stack(spec, upstream)) for spec in STACKS]
    steps, seconds = load_plan(1, STACK_CONCURRENCY, duration_s, rounds)
    targets, skipped = _measured(candidates, progress, steps, seconds)
    return run_load(
        lab,
        progress,
        title="stacks",
        targets=targets,
        skipped=skipped,
        concurrencies=STACK_CONCURRENCY,
        duration_s=duration_s,
        rounds=rounds,
    )


def _stream_client(lab: Lab, target: Target, rounds: int) -> StreamRow:
    argv = [
        lab.tools.taskset,
        "-c",
        str(lab.cpus.rest),
        sys.executable,
        "-m",
        "bench.streams",
        "--url",
        target.base_url,
        "--streams",
        str(STREAMS),
        "--rounds",
        str(rounds),
    ]
    limit = (rounds + 1) * STREAMS_TIMEOUT_S + 30
    try:
        done = subprocess.run(argv, capture_output=True, text=True, env=_wrk_env(lab), timeout=limit, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"stream client did not finish within {limit:.0f} s against {target.name}") from exc
    if done.returncode != 0:
        raise BenchError(f"stream client failed against {target.name}: {done.stderr.strip()[-1500:]}")
    data = json.loads(done.stdout)
    return StreamRow(
        target=target.name,
        streams=int(data["streams"]),
        ok=int(data["ok"]),
        tokens=int(data["tokens"]),
        ttft_p50_ms=float(data["ttft_p50_ms"]),
        ttft_p99_ms=float(data["ttft_p99_ms"]),
        gap_p50_ms=float(data["gap_p50_ms"]),
        gap_p99_ms=float(data["gap_p99_ms"]),
        gap_max_ms=float(data["gap_max_ms"]),
        errors=[str(e) for e in data["errors"]],
    )


def run_streams(lab: Lab, progress: Progress, *, rounds: int) -> StreamReport:
    """100 concurrent streams of 64 tokens 20 ms apart: direct vs Sluice vs nginx."""
    report = StreamReport(rounds=rounds)
    progress.note("streams: starting fake vLLM, Sluice gateway and nginx proxy")
    try:
        upstream = lab.fake_vllm()
    except BenchError as exc:
        report.skipped.append(Skipped("streams", str(exc)))
        progress.note(f"skipping streams: {exc}")
        progress.skip(*stream_plan(rounds))
        return report
    _, seconds = stream_plan(rounds)
    targets, report.skipped = _measured(
        [upstream, lab.sluice(upstream), lab.nginx_proxy(upstream)], progress, 1, seconds / 3
    )
    for target in targets:
        progress.step(
            f"streams: {target.name}, {STREAMS} concurrent streams x {rounds + 1} rounds (first is warm-up)",
            seconds / 3,
        )
        row = _stream_client(lab, target, rounds)
        progress.note(
            f"{row.ok}/{row.streams} streams ok, TTFT p50 {row.ttft_p50_ms:.1f} ms "
            f"p99 {row.ttft_p99_ms:.1f} ms, gap p50 {row.gap_p50_ms:.1f} ms p99 {row.gap_p99_ms:.1f} ms"
        )
        if row.errors:
            progress.note(f"first errors: {'; '.join(row.errors[:2])}")
        if math.isnan(row.ttft_p50_ms):
            report.skipped.append(Skipped(target.name, f"no stream succeeded: {'; '.join(row.errors[:2])}"))
        report.rows.append(row)
    return report
