"""Routing strategies on fake vLLM backends: ``python -m bench.strategies`` (a part of ``make bench``).

Three fake vLLM servers with the timing model on (docs/fake-vllm.md: a scheduler queue, a bounded prefix
cache and one prefill lane per engine, so time to first token grows with queue depth and shrinks on a
prefix-cache hit) sit behind an in-process Sluice gateway, once per `routing.strategy`. Every strategy
gets freshly started, cold fakes and the same seeded workload: streamed chat requests at a fixed
concurrency, 80 % of them one of 5 long system prompts followed by a short unique question, 20 % a
unique long system prompt. TTFT is measured at the client, to the first content chunk.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
import uvloop

from bench import report
from bench.affinity import system_prompt
from bench.env import INSTALL_HINTS, BenchError, CpuPlan, Machine, cpu_plan, machine
from bench.procs import LOCALHOST, REPO_ROOT, free_port, start, wait_http
from bench.progress import Progress
from bench.streams import one_stream, percentile
from sluice.app import Gateway
from sluice.config import SluiceConfig

STRATEGIES = ("round_robin", "least_loaded", "affinity")
FAKE_VLLM_MODULE = "sluice.testing.fake_vllm"
MODEL = "bench-model"
KEY = "sk-bench-strategies-0123456789"
SEED = 4
STARTUP_S = 3.0  # planned: starting three fakes and the gateway
REQUEST_TIMEOUT_S = 120.0
MAX_ERRORS_KEPT = 5


@dataclass(frozen=True, slots=True)
class Setup:
    """The workload and the fakes' timing model (the same for every strategy)."""

    requests: int = 600
    concurrency: int = 32
    backends: int = 3
    shared_prompts: int = 5
    shared_fraction: float = 0.8
    prompt_words: int = 2000  # the fake counts one token per word
    prefill_ms_per_token: float = 0.075  # an uncached 2,000-token prompt: 150 ms of prefill
    ttft_ms: float = 10.0  # fixed cost of the first token after the prefill
    itl_ms: float = 15.0
    max_tokens: int = 24
    max_num_seqs: int = 8
    kv_capacity_tokens: int = 8192  # room for about four of the long prompts per engine

    def fake_argv(self, port: int) -> list[str]:
        flags = {
            "--port": port,
            "--model": MODEL,
            "--prefill-ms-per-token": self.prefill_ms_per_token,
            "--ttft-ms": self.ttft_ms,
            "--itl-ms": self.itl_ms,
            "--max-num-seqs": self.max_num_seqs,
            "--kv-capacity-tokens": self.kv_capacity_tokens,
            "--max-model-len": 4 * self.prompt_words,
        }
        return [sys.executable, "-m", FAKE_VLLM_MODULE, *(str(part) for item in flags.items() for part in item)]

    def planned_s(self) -> float:
        """A rough run time per strategy, for the progress estimate (about 40 requests/s)."""
        return STARTUP_S + self.requests / 40


@dataclass(frozen=True, slots=True)
class StrategyRow:
    """What one strategy measured."""

    strategy: str
    ok: int
    failed: int
    ttft_p50_ms: float
    ttft_p90_ms: float
    ttft_p99_ms: float
    ttft_mean_ms: float
    requests_per_s: float
    prefix_hit_rate: float  # prompt tokens found in the fakes' prefix caches / tokens looked up
    per_backend: tuple[int, ...]  # requests each fake served
    errors: tuple[str, ...]


@dataclass(slots=True)
class StrategiesReport:
    """Every strategy's row, in the order run."""

    setup: Setup
    rows: list[StrategyRow] = field(default_factory=list)


def workload(setup: Setup, seed: int = SEED) -> list[bytes]:
    """Request bodies: exactly `shared_fraction` of them on the shared system prompts, evenly, shuffled."""
    rng = random.Random(seed)
    shared = [system_prompt(rng, setup.prompt_words) for _ in range(setup.shared_prompts)]
    shared_count = round(setup.requests * setup.shared_fraction)
    systems = [shared[i % len(shared)] for i in range(shared_count)]
    systems += [system_prompt(rng, setup.prompt_words) for _ in range(setup.requests - shared_count)]
    rng.shuffle(systems)
    bodies = []
    for i, system in enumerate(systems):
        question = f"Question {i}: what does note {rng.randint(1, 9999)} say about the {rng.choice('abcdefgh')} list?"
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        body = {"model": MODEL, "stream": True, "max_tokens": setup.max_tokens, "messages": messages}
        bodies.append(orjson.dumps(body))
    return bodies


def gateway_config(strategy: str, urls: list[str]) -> SluiceConfig:
    return SluiceConfig.model_validate({
        "server": {"host": LOCALHOST, "port": 0},
        "backends": [{"name": f"fake-{i}", "url": url} for i, url in enumerate(urls)],
        "auth": {"api_keys": [{"name": "bench", "key": KEY}]},
        "routing": {"strategy": strategy},
        "logging": {"level": "warning", "access_log": False},
    })  # fmt: skip


async def drive(
    strategy: str, urls: list[str], bodies: list[bytes], setup: Setup, tick: Callable[[int], None]
) -> StrategyRow:
    """Send every body through a fresh gateway, `setup.concurrency` at a time; read the fakes' counters."""
    gateway = Gateway(gateway_config(strategy, urls))
    await gateway.start()
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    pending = iter(bodies)
    ttfts: list[float] = []
    errors: list[str] = []

    async def worker(session: aiohttp.ClientSession) -> None:
        for body in pending:
            try:
                trace = await one_stream(session, gateway.url + "/v1/chat/completions", body, headers)
            except (aiohttp.ClientError, RuntimeError, TimeoutError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
            else:
                if trace.arrivals:
                    ttfts.append(trace.arrivals[0] - trace.sent)
                else:
                    errors.append("stream without content")
            tick(len(ttfts) + len(errors))

    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            started = time.monotonic()
            await asyncio.gather(*(worker(session) for _ in range(setup.concurrency)))
            elapsed = time.monotonic() - started
            stats = [await _fake_stats(session, url) for url in urls]
    finally:
        await gateway.close()
    queries = sum(s["prefix_queries"] for s in stats)
    hits = sum(s["prefix_hits"] for s in stats)
    ms = [t * 1000 for t in ttfts]
    return StrategyRow(
        strategy=strategy,
        ok=len(ttfts),
        failed=len(errors),
        ttft_p50_ms=percentile(ms, 50),
        ttft_p90_ms=percentile(ms, 90),
        ttft_p99_ms=percentile(ms, 99),
        ttft_mean_ms=statistics.fmean(ms) if ms else math.nan,
        requests_per_s=len(ttfts) / elapsed if elapsed > 0 else math.nan,
        prefix_hit_rate=hits / queries if queries else math.nan,
        per_backend=tuple(s["requests_total"] for s in stats),
        errors=tuple(errors[:MAX_ERRORS_KEPT]),
    )


async def _fake_stats(session: aiohttp.ClientSession, url: str) -> dict[str, int]:
    """The fake's request and prefix-cache counters (`GET /fake/stats`)."""
    async with session.get(url + "/fake/stats") as resp:
        resp.raise_for_status()
        stats = await resp.json()
    return {name: int(stats[name]) for name in ("requests_total", "prefix_queries", "prefix_hits")}


def run_strategy(
    strategy: str, setup: Setup, bodies: list[bytes], *, taskset: str, cpu: int, logdir: Path, progress: Progress
) -> StrategyRow:
    """Start cold fakes pinned to `cpu`, measure `strategy` through the gateway, stop the fakes."""
    with contextlib.ExitStack() as stack:
        urls = []
        services = []
        for i in range(setup.backends):
            port = free_port()
            service = start(f"{strategy}-fake-{i}", setup.fake_argv(port), cpu=cpu, taskset=taskset, logdir=logdir)
            stack.callback(service.stop)
            services.append(service)
            urls.append(f"http://{LOCALHOST}:{port}")
        for service, url in zip(services, urls, strict=True):
            wait_http(service, url + "/health")
        quarter = max(1, len(bodies) // 4)

        def tick(done: int) -> None:
            if done % quarter == 0 or done == len(bodies):
                progress.note(f"{strategy}: {done}/{len(bodies)} requests")

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(drive(strategy, urls, bodies, setup, tick))


def plan(setup: Setup) -> tuple[int, float]:
    """Steps and seconds this part is expected to take."""
    return len(STRATEGIES), len(STRATEGIES) * setup.planned_s()


def run_all(setup: Setup, *, taskset: str, cpus: CpuPlan, logdir: Path, progress: Progress) -> StrategiesReport:
    """Every strategy in turn; the fakes run on the CPU the proxy under test gets in the other parts."""
    bodies = workload(setup)
    result = StrategiesReport(setup)
    for strategy in STRATEGIES:
        progress.step(
            f"strategies: {strategy}, {setup.requests} requests, {setup.concurrency} in flight", setup.planned_s()
        )
        result.rows.append(
            run_strategy(strategy, setup, bodies, taskset=taskset, cpu=cpus.proxy, logdir=logdir, progress=progress)
        )
    return result


def _num(value: float, digits: int = 0) -> str:
    return "—" if math.isnan(value) else f"{value:,.{digits}f}"


def markdown(result: StrategiesReport, host: Machine, cpus: CpuPlan) -> str:
    s = result.setup
    lines = [
        f"_Measured on {host.describe()}; {s.backends} fake vLLM backends on CPU {cpus.proxy}, gateway and"
        f" client in one process on CPU {cpus.rest}; {s.requests} streamed chat requests, {s.concurrency} in"
        f" flight, {s.shared_fraction:.0%} on one of {s.shared_prompts} system prompts of {s.prompt_words:,}"
        f" tokens, the rest on unique prompts as long; fakes: prefill {s.prefill_ms_per_token:g} ms per"
        f" uncached token in one lane per engine, `--max-num-seqs {s.max_num_seqs}`, prefix cache of"
        f" {s.kv_capacity_tokens:,} tokens, {s.max_tokens} tokens {s.itl_ms:g} ms apart; fresh fakes per strategy._",
        "",
        "| strategy | ok | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms | mean ms | req/s | prefix hit rate |"
        " requests per backend |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in result.rows:
        ok = f"{row.ok}/{row.ok + row.failed}"
        lines.append(
            f"| {row.strategy} | {ok} | {_num(row.ttft_p50_ms)} | {_num(row.ttft_p90_ms)} | "
            f"{_num(row.ttft_p99_ms)} | {_num(row.ttft_mean_ms)} | {_num(row.requests_per_s, 1)} | "
            f"{_num(row.prefix_hit_rate * 100)} % | {' / '.join(str(n) for n in row.per_backend)} |"
        )
    errors = [f"- **{row.strategy}**: {error}" for row in result.rows for error in row.errors]
    return "\n".join(lines) + "\n" + ("\n" + "\n".join(errors) + "\n" if errors else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.strategies", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    defaults = Setup()
    parser.add_argument("--requests", type=int, default=defaults.requests, help="requests per strategy")
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency, help="requests in flight")
    parser.add_argument(
        "--kv-capacity-tokens", type=int, default=defaults.kv_capacity_tokens, help="each fake's prefix cache"
    )
    parser.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    args = parser.parse_args(argv)
    if min(args.requests, args.concurrency, args.kv_capacity_tokens) < 1:
        parser.error("--requests, --concurrency and --kv-capacity-tokens must be >= 1")
    taskset = shutil.which("taskset")
    if taskset is None:
        print(f"bench: error: {INSTALL_HINTS['taskset']}", file=sys.stderr)
        return 2
    setup = dataclasses.replace(
        defaults, requests=args.requests, concurrency=args.concurrency, kv_capacity_tokens=args.kv_capacity_tokens
    )
    cpus = cpu_plan()
    os.sched_setaffinity(0, {cpus.rest})
    steps, seconds = plan(setup)
    progress = Progress(total_steps=steps, planned_s=seconds)
    try:
        with tempfile.TemporaryDirectory(prefix="sluice-bench-strategies-") as logdir:
            result = run_all(setup, taskset=taskset, cpus=cpus, logdir=Path(logdir), progress=progress)
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    text = markdown(result, machine(), cpus)
    print(f"{report.SECTIONS['strategies']}\n\n{text}")
    if not args.no_write:
        doc = REPO_ROOT / "docs" / "benchmarks.md"
        report.update_doc(doc, {"strategies": text})
        progress.note(f"updated {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
