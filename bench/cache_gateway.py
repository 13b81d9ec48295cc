"""The end-to-end half of the `cache` part of `make bench`: the gateway under wrk with the cache off and on.

Four gateways against the canned upstream at c=100: cache off (without and with the `redis:` section, which
also moves the rate limiter to Redis), every request an exact hit, and the cache on but the request not
cacheable (a bypass); throughput, latency and the gateway's CPU per request (bench/cache.py has the lookups).
"""

from __future__ import annotations

import math
import urllib.request
from typing import TYPE_CHECKING

from bench.audit import _cpu_and_requests
from bench.progress import Progress
from bench.scenarios import _measured, load_plan, run_load
from bench.targets import Lab, Target

if TYPE_CHECKING:
    from bench.cache import CacheReport

E2E_CONCURRENCY = (100,)
E2E_OFF = "cache off"
E2E_OFF_REDIS = "cache off, same redis section"
E2E_HIT = "cache on, every request an exact hit"
E2E_BYPASS = "cache on, request not cacheable (bypass)"


def end_to_end(
    lab: Lab, report: CacheReport, redis_url: str, progress: Progress, *, duration_s: float, rounds: int
) -> None:
    """wrk's body has temperature 0.7: not cacheable by default (a bypass), an exact hit with max_temperature 1."""
    progress.note("cache: starting canned upstream and four Sluice gateways (cache off twice, hit, bypass)")
    upstream = lab.canned_upstream()
    redis = 'redis: {{url: "{url}", key_prefix: "{prefix}"}}\n'
    section = redis + "cache: {{enabled: true, semantic: {{enabled: false}}{more}}}\n"
    hit = section.format(url=redis_url, prefix="bench-e2e-hit:", more=", default: {max_temperature: 1.0}")
    bypass = section.format(url=redis_url, prefix="bench-e2e-bypass:", more="")
    candidates = [
        lab.preflight(lab.sluice(upstream, name=E2E_OFF)),
        lab.preflight(lab.sluice(upstream, name=E2E_OFF_REDIS, extra=redis.format(url=redis_url, prefix="bench-e2e:"))),
        lab.preflight(lab.sluice(upstream, name=E2E_HIT, extra=hit)),
        lab.preflight(lab.sluice(upstream, name=E2E_BYPASS, extra=bypass)),
    ]
    steps, seconds = load_plan(1, E2E_CONCURRENCY, duration_s, rounds)
    targets, skipped = _measured(candidates, progress, steps, seconds)
    before = {target.name: _cpu_and_requests(target) for target in targets}
    report.load = run_load(
        lab,
        progress,
        title="cache",
        targets=targets,
        skipped=skipped,
        concurrencies=E2E_CONCURRENCY,
        duration_s=duration_s,
        rounds=rounds,
        require_2xx=True,
    )
    for target in targets:
        if target.name not in (E2E_OFF, E2E_OFF_REDIS):
            report.cache_results[target.name] = cache_results(target)
        cpu, requests = _cpu_and_requests(target)
        report.cpu_us[target.name] = (cpu - before[target.name][0]) / (requests - before[target.name][1]) * 1e6


def cache_results(target: Target) -> dict[str, int]:
    with urllib.request.urlopen(target.base_url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    counts: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("sluice_cache_lookups_total{"):
            labels, _, value = line.rpartition(" ")
            result = labels.partition('result="')[2].partition('"')[0]
            counts[result] = counts.get(result, 0) + int(float(value))
    return counts


def load_lines(report: CacheReport) -> list[str]:
    load = report.load
    assert load is not None
    lines = [
        "",
        "End to end: four gateways against the canned upstream, wrk 1 thread at c=100 "
        f"({load.duration_s:g} s, median of {load.rounds} round(s)), the same body as the other parts "
        "(`temperature: 0.7`): cache off, as in the other parts, and again with the `redis:` section the cache "
        "gateways have (with `redis.url` set, the rate limiter and key revocations use Redis too); cache on with "
        "`max_temperature: 1`, so every request after the first is an exact hit; cache on with the default "
        "`max_temperature: 0`, so every request is a bypass. Cache in the lab's Redis, semantic level off "
        "(neither an exact hit nor a bypass consults the embedder). CPU per request: the gateway process's CPU "
        "time (every thread) over its runs, warm-up included, divided by the requests it answered; steadier "
        "than req/s, which swings with whatever else shares the second core.",
        "",
        "| target | req/s | vs cache off | p50 ms | p99 ms | CPU µs per request | errors | cache lookups | RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    off = load.get(E2E_OFF, E2E_CONCURRENCY[0])
    for name in load.targets:
        result = load.get(name, E2E_CONCURRENCY[0])
        if result is None:
            continue
        share = f"{result.requests_per_s / off.requests_per_s:.1%}" if off and name != E2E_OFF else "—"
        counts = report.cache_results.get(name, {})
        looked = ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items())) or "—"
        rss = load.rss_mib.get(name)
        rss_text = "—" if rss is None else f"{rss:.1f}"
        lines.append(
            f"| {name} | {result.requests_per_s:,.0f} | {share} | {result.p50_ms:.3f} | {result.p99_ms:.3f} "
            f"| {report.cpu_us.get(name, math.nan):.0f} | {result.errors} | {looked} | {rss_text} |"
        )
    lines += [f"- **{s.name}** not measured: {s.reason}" for s in load.skipped]
    return lines
