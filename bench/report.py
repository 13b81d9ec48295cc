"""Markdown tables of the results and their place in ``docs/benchmarks.md`` (between markers)."""

from __future__ import annotations

import math
from pathlib import Path

from bench.env import CpuPlan, Machine
from bench.scenarios import LIMITS_BARE, LIMITS_LOCAL, LIMITS_REDIS, LoadReport, StreamReport
from bench.targets import STACKS

DOC_INTRO = """# Benchmarks

Run the suite with `make bench` (or `python -m bench.run`; `--quick` for a smoke run, `--only
core|limits|audit|streams|stacks|strategies|cache|rag` for one part, `--no-write` to leave this file alone). It needs
`wrk` and `nginx` (`apt-get install -y wrk nginx-light`) and the bench extras (`pip install -r
bench/requirements.txt`).

Every proxy under test (the Sluice gateway, nginx as a plain reverse proxy with one worker, the
alternative Python stacks) runs pinned to CPU 0 with `taskset`; the upstream (nginx serving a canned chat
completion, or the fake vLLM for streams) and the load generator (wrk with one thread, or the asyncio
stream client) share CPU 1. "direct" is the load generator talking to the upstream with no proxy in
between. Requests are `POST /v1/chat/completions` with a small JSON body and a bearer key
(`bench/wrk/chat.lua`). The sections below are rewritten by each run; the machine and date are in each.
"""

SECTIONS = {
    "core": "## Non-streaming: direct vs Sluice vs nginx",
    "limits": "## Auth and rate limits on the hot path",
    "audit": "## Audit log: cost on the request path and writer throughput",
    "streams": "## Streaming: 100 concurrent streams",
    "stacks": "## HTTP stack study",
    "affinity": "## Prefix-cache affinity on real vLLM: round_robin vs affinity",
    "strategies": "## Routing strategies on fake vLLM: TTFT with shared system prompts",
    "cache": "## Response cache lookups (make bench, part cache)",
    "rag": "## RAG: ingestion and retrieval (make bench, part rag)",
}
LABELS = {
    "direct": "direct (no proxy)",
    "sluice": "Sluice gateway (full pipeline)",
    "nginx": "nginx reverse proxy (1 worker)",
    **{spec.name: spec.label for spec in STACKS},
}
LIMITS_LABELS = {
    LIMITS_BARE: "Sluice, static key, no limits",
    LIMITS_REDIS: "Sluice + key limits in Redis (loopback)",
    LIMITS_LOCAL: "Sluice + key limits in process",
}
LIMITS_TARGET_MS = 0.3  # issue 5: auth + rate limiting may add at most this much p50 at c=100


def _num(value: float | None, digits: int = 2) -> str:
    if value is None or math.isnan(value):
        return "—"
    return f"{value:,.{digits}f}"


def _signed(value: float) -> str:
    return f"{value:+.3f}"


def _share(value: float, reference: float) -> str:
    ratio = value / reference if reference else math.nan
    return "<1%" if ratio < 0.01 else f"{ratio:.0%}"


def preamble(machine: Machine, cpus: CpuPlan, detail: str) -> str:
    return f"_Measured on {machine.describe()}; {cpus.describe()}; {detail}._\n"


def _skipped_lines(skipped: list[tuple[str, str]]) -> str:
    if not skipped:
        return ""
    return "\n" + "\n".join(f"- **{name}** not measured: {reason}" for name, reason in skipped) + "\n"


def core_markdown(report: LoadReport, machine: Machine, cpus: CpuPlan) -> str:
    """One row per target and concurrency; at c=1 the latency a proxy adds over direct."""
    detail = f"wrk 1 thread, {report.duration_s:g} s per run, median of {report.rounds} round(s)"
    lines = [
        preamble(machine, cpus, detail),
        "| c | target | req/s | p50 ms | p99 ms | added p50 / p99 ms (c=1) | errors | RSS MiB |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for connections in report.concurrencies:
        direct = report.get("direct", connections)
        for name in report.targets:
            result = report.get(name, connections)
            if result is None:
                continue
            added = "—"
            if connections == 1 and direct is not None and name != "direct":
                added = f"{_signed(result.p50_ms - direct.p50_ms)} / {_signed(result.p99_ms - direct.p99_ms)}"
            lines.append(
                f"| {connections} | {LABELS.get(name, name)} | {_num(result.requests_per_s, 0)} | "
                f"{_num(result.p50_ms, 3)} | {_num(result.p99_ms, 3)} | {added} | {result.errors} | "
                f"{_num(report.rss_mib.get(name), 1)} |"
            )
    return "\n".join(lines) + "\n" + _skipped_lines([(s.name, s.reason) for s in report.skipped])


def limits_markdown(report: LoadReport, machine: Machine, cpus: CpuPlan) -> str:
    """Bare gateway vs the same with per-key limits: the p50 the limits add, and at the highest
    concurrency (gateway CPU-bound) the CPU time they add per request, 1/req/s limited - 1/req/s bare."""
    detail = "; ".join(
        [f"wrk 1 thread, {report.duration_s:g} s per run, median of {report.rounds} round(s)", *report.notes]
    )
    high = report.concurrencies[-1]
    lines = [
        preamble(machine, cpus, detail),
        f"| c | target | req/s | p50 ms | p99 ms | added p50 ms | added µs per request (c={high}: 1/req/s) | "
        "errors | RSS MiB |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for connections in report.concurrencies:
        bare = report.get(LIMITS_BARE, connections)
        for name in report.targets:
            result = report.get(name, connections)
            if result is None:
                continue
            added_p50 = added_us = "—"
            if bare is not None and name != LIMITS_BARE:
                added_p50 = _signed(result.p50_ms - bare.p50_ms)
                if connections == high:
                    added_us = f"{(1 / result.requests_per_s - 1 / bare.requests_per_s) * 1e6:+.0f}"
            lines.append(
                f"| {connections} | {LIMITS_LABELS.get(name, name)} | {_num(result.requests_per_s, 0)} | "
                f"{_num(result.p50_ms, 3)} | {_num(result.p99_ms, 3)} | {added_p50} | {added_us} | "
                f"{result.errors} | {_num(report.rss_mib.get(name), 1)} |"
            )
    paced_bare = report.paced.get(LIMITS_BARE)
    for name in report.targets:
        result = report.paced.get(name)
        if result is None:
            continue
        added_p50 = _signed(result.p50_ms - paced_bare.p50_ms) if paced_bare and name != LIMITS_BARE else "—"
        lines.append(
            f"| {high} at {report.paced_rate:,.0f} req/s | {LIMITS_LABELS.get(name, name)} | "
            f"{_num(result.requests_per_s, 0)} | {_num(result.p50_ms, 3)} | {_num(result.p99_ms, 3)} | {added_p50} | "
            f"— | {result.errors} | {_num(report.rss_mib.get(name), 1)} |"
        )
    verdicts = []
    for name, where in ((LIMITS_REDIS, "with Redis"), (LIMITS_LOCAL, "in process")):
        result = report.paced.get(name)
        if paced_bare is not None and result is not None:
            added = result.p50_ms - paced_bare.p50_ms
            verdicts.append(f"{_signed(added)} ms {where} ({'met' if added <= LIMITS_TARGET_MS else 'not met'})")
    if verdicts:
        lines.append(
            f"\nAdded p50 at c={high} below saturation ({report.paced_rate:,.0f} req/s offered; target ≤ "
            f"{LIMITS_TARGET_MS:g} ms): {'; '.join(verdicts)}."
        )
    return "\n".join(lines) + "\n" + _skipped_lines([(s.name, s.reason) for s in report.skipped])


def stacks_markdown(report: LoadReport, machine: Machine, cpus: CpuPlan) -> str:
    """One row per stack: c=1 and c=100 side by side, throughput relative to nginx."""
    detail = f"wrk 1 thread, {report.duration_s:g} s per run, median of {report.rounds} round(s)"
    low, high = report.concurrencies[0], report.concurrencies[-1]
    nginx_high = report.get("nginx", high)
    lines = [
        preamble(machine, cpus, detail),
        f"| stack | c={low} req/s | c={low} p50 ms | c={low} p99 ms | c={high} req/s | c={high} p50 ms | "
        f"c={high} p99 ms | c={high} vs nginx | errors | RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in report.targets:
        first, last = report.get(name, low), report.get(name, high)
        if first is None or last is None:
            continue
        share = _share(last.requests_per_s, nginx_high.requests_per_s) if nginx_high else "—"
        lines.append(
            f"| {LABELS.get(name, name)} | {_num(first.requests_per_s, 0)} | {_num(first.p50_ms, 3)} | "
            f"{_num(first.p99_ms, 3)} | {_num(last.requests_per_s, 0)} | {_num(last.p50_ms, 3)} | "
            f"{_num(last.p99_ms, 3)} | {share} | {first.errors + last.errors} | "
            f"{_num(report.rss_mib.get(name), 1)} |"
        )
    return "\n".join(lines) + "\n" + _skipped_lines([(s.name, s.reason) for s in report.skipped])


def streams_markdown(report: StreamReport, machine: Machine, cpus: CpuPlan) -> str:
    """Time to first token and inter-chunk gaps per target."""
    detail = (
        f"fake vLLM streaming 64 tokens 20 ms apart; 100 concurrent streams, {report.rounds} measured "
        "round(s) after one warm-up"
    )
    lines = [
        preamble(machine, cpus, detail),
        "| target | streams ok | tokens | TTFT p50 ms | TTFT p99 ms | gap p50 ms | gap p99 ms | gap max ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report.rows:
        lines.append(
            f"| {LABELS.get(row.target, row.target)} | {row.ok}/{row.streams} | {row.tokens:,} | "
            f"{_num(row.ttft_p50_ms, 1)} | {_num(row.ttft_p99_ms, 1)} | {_num(row.gap_p50_ms, 1)} | "
            f"{_num(row.gap_p99_ms, 1)} | {_num(row.gap_max_ms, 1)} |"
        )
    return "\n".join(lines) + "\n" + _skipped_lines([(s.name, s.reason) for s in report.skipped])


def _markers(section: str) -> tuple[str, str]:
    return f"<!-- bench:{section}:start -->", f"<!-- bench:{section}:end -->"


def update_doc(path: Path, blocks: dict[str, str]) -> None:
    """Replace each section's text between its markers, creating the file or the markers if missing."""
    text = path.read_text() if path.exists() else DOC_INTRO
    for section, block in blocks.items():
        start, end = _markers(section)
        body = f"{start}\n{block.rstrip()}\n{end}"
        if start in text and end in text and text.index(start) < text.index(end):
            before, rest = text.split(start, 1)
            after = rest.split(end, 1)[1]
            text = before + body + after
        else:
            text = text.rstrip() + f"\n\n{SECTIONS[section]}\n\n{body}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text.endswith("\n") else text + "\n")
