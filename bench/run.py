"""One command for the benchmark suite: ``python -m bench.run`` (``make bench``).

Runs, side by side, direct-to-upstream vs the Sluice gateway vs nginx as a plain reverse proxy
(non-streaming with wrk at concurrency 1/10/100, then 100 concurrent streams), the cost of per-key rate
limits (in Redis and in process) over the bare gateway, the HTTP stack study, the routing strategies
on fake vLLM backends (``bench/strategies.py``), and the response cache's lookup and embedding latency
(``bench/cache.py``); and RAG ingestion, retrieval latency and hit rate (``bench/rag.py``).
Progress goes to stderr, Markdown tables to stdout, and the tables into ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import secrets
import sys
import tempfile
from pathlib import Path

from bench import audit, cache, rag, report, scenarios, strategies
from bench.env import BenchError, CpuPlan, Machine, cpu_plan, find_tools, machine, require_modules
from bench.procs import REPO_ROOT
from bench.progress import Progress
from bench.scenarios import LoadReport, StreamReport
from bench.strategies import StrategiesReport
from bench.targets import STACKS, Lab

PARTS = ("core", "limits", "audit", "streams", "stacks", "strategies", "cache", "rag")
QUICK_STRATEGY_REQUESTS = 120
Result = LoadReport | StreamReport | StrategiesReport | cache.CacheReport | rag.RagReport
DEFAULT_DOC = REPO_ROOT / "docs" / "benchmarks.md"
RESULTS_DIR = REPO_ROOT / "bench" / "results"


@dataclasses.dataclass(frozen=True, slots=True)
class Options:
    """The validated command line."""

    parts: tuple[str, ...]
    duration_s: float
    stacks_duration_s: float
    rounds: int
    stream_rounds: int
    strategy_requests: int
    cache_samples: int
    quick: bool
    write: bool
    doc: Path
    logs: Path | None


def parse_args(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per core wrk run (default 10)")
    parser.add_argument(
        "--stacks-duration", type=float, default=5.0, help="seconds per stack-study wrk run (default 5)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat every wrk run N times, interleaved, and report the median (default 1)",
    )
    parser.add_argument("--stream-rounds", type=int, default=3, help="measured rounds of 100 streams (default 3)")
    parser.add_argument(
        "--strategy-requests",
        type=int,
        default=strategies.Setup().requests,
        help="requests per routing strategy (default %(default)s)",
    )
    parser.add_argument("--quick", action="store_true", help="short runs for smoke testing (2 s, 1 round)")
    parser.add_argument("--only", choices=PARTS, help="run one part only")
    parser.add_argument("--no-write", action="store_true", help=f"do not update {DEFAULT_DOC.relative_to(REPO_ROOT)}")
    parser.add_argument("--doc", type=Path, default=DEFAULT_DOC, help=argparse.SUPPRESS)
    parser.add_argument("--logs", type=Path, help="keep configs and server logs in this directory")
    args = parser.parse_args(argv)
    if args.duration < 1 or args.stacks_duration < 1 or args.rounds < 1 or args.stream_rounds < 1:
        parser.error("durations must be >= 1 s and rounds >= 1")
    if args.strategy_requests < 1:
        parser.error("--strategy-requests must be >= 1")
    quick = bool(args.quick)
    return Options(
        parts=(args.only,) if args.only else PARTS,
        duration_s=2.0 if quick else args.duration,
        stacks_duration_s=2.0 if quick else args.stacks_duration,
        rounds=1 if quick else args.rounds,
        stream_rounds=1 if quick else args.stream_rounds,
        strategy_requests=QUICK_STRATEGY_REQUESTS if quick else args.strategy_requests,
        cache_samples=cache.QUICK_SAMPLES if quick else cache.SAMPLES,
        quick=quick,
        write=not args.no_write,
        doc=args.doc,
        logs=args.logs.resolve() if args.logs else None,
    )


def plan(options: Options) -> Progress:
    steps, seconds = 0, 0.0
    if "core" in options.parts:
        s, t = scenarios.load_plan(3, scenarios.CORE_CONCURRENCY, options.duration_s, options.rounds)
        steps, seconds = steps + s, seconds + t
    if "limits" in options.parts:
        s, t = scenarios.load_plan(3, scenarios.LIMITS_CONCURRENCY, options.duration_s, options.rounds)
        steps, seconds = steps + s, seconds + t
        s, t = scenarios.paced_plan(3, options.duration_s, options.rounds)
        steps, seconds = steps + s, seconds + t
    if "audit" in options.parts:
        s, t = audit.plan(options.duration_s, options.rounds)
        steps, seconds = steps + s, seconds + t
    if "streams" in options.parts:
        s, t = scenarios.stream_plan(options.stream_rounds)
        steps, seconds = steps + s, seconds + t
    if "stacks" in options.parts:
        s, t = scenarios.load_plan(
            3 + len(STACKS), scenarios.STACK_CONCURRENCY, options.stacks_duration_s, options.rounds
        )
        steps, seconds = steps + s, seconds + t
    if "strategies" in options.parts:
        s, t = strategies.plan(_strategy_setup(options))
        steps, seconds = steps + s, seconds + t
    if "cache" in options.parts:
        s, t = cache.plan(options.duration_s, options.rounds)
        steps, seconds = steps + s, seconds + t
    if "rag" in options.parts:
        s, t = rag.plan(options.quick)
        steps, seconds = steps + s, seconds + t
    return Progress(total_steps=steps, planned_s=seconds)


def _strategy_setup(options: Options) -> strategies.Setup:
    return dataclasses.replace(strategies.Setup(), requests=options.strategy_requests)


def _save_raw(results: dict[str, Result], host: Machine, cpus: CpuPlan) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / "latest.json"
    payload = {
        "machine": dataclasses.asdict(host),
        "cpus": dataclasses.asdict(cpus),
        **{name: dataclasses.asdict(result) for name, result in results.items()},
    }
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def run(options: Options) -> int:
    tools = find_tools()
    require_modules("aiohttp", "orjson", "uvloop")
    cpus = cpu_plan()
    os.sched_setaffinity(0, {cpus.rest})
    host = machine()
    progress = plan(options)
    progress.note(f"{host.describe()}; {cpus.describe()}")
    key = "sk-bench-" + secrets.token_hex(16)
    results: dict[str, Result] = {}
    with contextlib.ExitStack() as stack:
        workdir = options.logs or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sluice-bench-")))
        for part in options.parts:
            (workdir / part).mkdir(parents=True, exist_ok=True)
            with Lab(tools, cpus, workdir / part, key) as lab:
                if part == "core":
                    results[part] = scenarios.run_core(
                        lab, progress, duration_s=options.duration_s, rounds=options.rounds
                    )
                elif part == "limits":
                    results[part] = scenarios.run_limits(
                        lab, progress, duration_s=options.duration_s, rounds=options.rounds
                    )
                elif part == "audit":
                    results[part] = audit.run(lab, progress, duration_s=options.duration_s, rounds=options.rounds)
                elif part == "streams":
                    results[part] = scenarios.run_streams(lab, progress, rounds=options.stream_rounds)
                elif part == "cache":
                    results[part] = cache.run(
                        lab,
                        progress,
                        samples=options.cache_samples,
                        duration_s=options.duration_s,
                        rounds=options.rounds,
                    )
                elif part == "rag":
                    results[part] = rag.run(lab, progress, quick=options.quick)
                elif part == "strategies":
                    results[part] = strategies.run_all(
                        _strategy_setup(options),
                        taskset=tools.taskset,
                        cpus=cpus,
                        logdir=lab.workdir,
                        progress=progress,
                    )
                else:
                    results[part] = scenarios.run_stacks(
                        lab, progress, duration_s=options.stacks_duration_s, rounds=options.rounds
                    )
    blocks = render(results, host, cpus)
    for part, block in blocks.items():
        print(f"{report.SECTIONS[part]}\n\n{block}")
    progress.note(f"raw results: {_save_raw(results, host, cpus).relative_to(REPO_ROOT)}")
    if options.write:
        kept = {part: block for part, block in blocks.items() if _measured_anything(results[part])}
        if kept:
            report.update_doc(options.doc, kept)
            progress.note(f"updated {options.doc} ({', '.join(kept)})")
    return 0


def _measured_anything(result: Result) -> bool:
    return bool(result.rows)


def render(results: dict[str, Result], host: Machine, cpus: CpuPlan) -> dict[str, str]:
    blocks: dict[str, str] = {}
    for part, result in results.items():
        if isinstance(result, StrategiesReport):
            blocks[part] = strategies.markdown(result, host, cpus)
        elif isinstance(result, StreamReport):
            blocks[part] = report.streams_markdown(result, host, cpus)
        elif isinstance(result, rag.RagReport):
            blocks[part] = rag.markdown(result, report.preamble(host, cpus, "uvloop; ChromaDB " + rag.chroma_version()))
        elif part == "core":
            blocks[part] = report.core_markdown(result, host, cpus)
        elif part == "limits":
            blocks[part] = report.limits_markdown(result, host, cpus)
        elif isinstance(result, cache.CacheReport):
            detail = f"uvloop; {result.rows[0].samples:,} lookups of each kind" if result.lookups else "uvloop"
            blocks[part] = cache.markdown(result, report.preamble(host, cpus, detail))
        elif isinstance(result, audit.AuditReport):
            detail = f"wrk 1 thread, {result.duration_s:g} s per run, median of {result.rounds} round(s)"
            blocks[part] = audit.markdown(result, report.preamble(host, cpus, detail))
        else:
            blocks[part] = report.stacks_markdown(result, host, cpus)
    return blocks


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    try:
        return run(options)
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
