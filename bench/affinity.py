"""Prefix-cache affinity on real engines: ``python -m bench.affinity`` (``make bench-affinity``).

Two real vLLM instances (the prepared local engine, one per CPU) behind the gateway, once with
`routing.strategy: round_robin` and once with `affinity`. The workload is chat requests that share one of
16 long system prompts (about 1,500 tokens each, each used three times, shuffled), followed by a
short question. vLLM keeps the KV cache of a prompt prefix it has seen (prefix caching is on by
default), so a request whose system prompt the chosen engine already holds skips most of its prefill;
affinity sends all requests of one prompt to the same engine, round robin spreads them. Time to first
token is measured per request on a stream, with two requests in flight in all. Each strategy gets
fresh prompts, so neither starts with a warm cache.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench import report
from bench.env import machine
from bench.procs import REPO_ROOT
from sluice.app import Gateway
from sluice.config import SluiceConfig
from sluice.engine.info import load_engine_info
from sluice.engine.launch import engine_url, start_engine, stop_engine, wait_healthy

KEY = "sk-bench-affinity-0123456789"
WORDS = (
    "river",
    "stone",
    "ledger",
    "harbor",
    "copper",
    "lantern",
    "meadow",
    "signal",
    "orchard",
    "vessel",
    "thunder",
    "archive",
    "quartz",
    "pilgrim",
    "canyon",
    "velvet",
    "engine",
    "marble",
    "falcon",
    "cipher",
    "garden",
    "beacon",
    "summit",
    "willow",
    "anchor",
    "prism",
    "tundra",
    "ember",
)


@dataclass(frozen=True)
class Result:
    strategy: str
    ttfts: list[float]
    prompt_tokens: int

    def quantile(self, q: float) -> float:
        ordered = sorted(self.ttfts)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def system_prompt(rng: random.Random, words: int) -> str:
    return "You are a careful assistant. Reference notes: " + " ".join(rng.choice(WORDS) for _ in range(words))


def workload(seed: int, prompts: int, uses: int, words: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    systems = [system_prompt(rng, words) for _ in range(prompts)]
    requests = [
        (system, f"Question {i}: summarise note {rng.randint(1, 999)}.") for system in systems for i in range(uses)
    ]
    rng.shuffle(requests)
    return requests


async def one(session: aiohttp.ClientSession, url: str, system: str, question: str) -> tuple[float, int]:
    body = {
        "model": "gemma-3-270m",
        "max_tokens": 1,
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
    }
    started = time.perf_counter()
    ttft = 0.0
    prompt_tokens = 0
    async with session.post(url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        r.raise_for_status()
        async for line in r.content:
            if not ttft and line.startswith(b"data: {") and b'"choices":[{' in line:
                ttft = time.perf_counter() - started
            if b'"prompt_tokens"' in line:
                prompt_tokens = int(line.split(b'"prompt_tokens":')[1].split(b",")[0])
    return ttft, prompt_tokens


async def run_strategy(strategy: str, engines: list[str], requests: list[tuple[str, str]], concurrency: int) -> Result:
    config = SluiceConfig.model_validate({
        "server": {"host": "127.0.0.1", "port": 0},
        "backends": [{"name": f"vllm-{i}", "url": url} for i, url in enumerate(engines)],
        "auth": {"api_keys": [{"name": "bench", "key": KEY}]},
        "routing": {"strategy": strategy},
        "timeouts": {"read": 600},
        "logging": {"level": "warning", "access_log": False},
    })  # fmt: skip
    gateway = Gateway(config)
    await gateway.start()
    queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    for item in requests:
        queue.put_nowait(item)
    ttfts: list[float] = []
    tokens: list[int] = []

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            system, question = queue.get_nowait()
            ttft, prompt_tokens = await one(session, gateway.url, system, question)
            ttfts.append(ttft)
            tokens.append(prompt_tokens)
            print(f"\r    {strategy}: {len(ttfts)}/{len(requests)} requests", end="", file=sys.stderr, flush=True)

    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as session:
            await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    finally:
        await gateway.close()
    print(file=sys.stderr)
    return Result(strategy, ttfts, int(statistics.median(tokens)))


def markdown(results: list[Result], prompts: int, uses: int, concurrency: int) -> str:
    m = machine()
    rr, aff = results
    lines = [
        f"_Measured on {m.cpu_model}, {m.cores} cores, Python {m.python}, {m.date};"
        f" two vLLM 0.32 CPU engines (Gemma 3 270M, bf16, `--max-num-seqs 4`, prefix caching on), one pinned to"
        f" each core, gateway in the benchmark process; {prompts} system prompts of about {rr.prompt_tokens}"
        f" prompt tokens, each used {uses} times, shuffled; {concurrency} requests in flight; fresh prompts per"
        " strategy._",
        "",
        "| strategy | requests | TTFT p50 s | TTFT p90 s | TTFT p99 s | mean s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.strategy} | {len(r.ttfts)} | {r.quantile(0.5):.3f} | {r.quantile(0.9):.3f} | "
            f"{r.quantile(0.99):.3f} | {statistics.fmean(r.ttfts):.3f} |"
        )
    change = 1 - aff.quantile(0.5) / rr.quantile(0.5)
    lines += ["", f"Affinity lowers p50 TTFT by {change:.0%} against round robin (target: at least 30 %)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.affinity", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--uses", type=int, default=3)
    parser.add_argument("--words", type=int, default=1450, help="words per system prompt (about 1 token each)")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT / "data" / "engine")
    args = parser.parse_args(argv)
    info = load_engine_info(args.data_dir)
    if info is None:
        print(
            f"bench: error: the engine is not prepared in {args.data_dir}: run `sluice engine prepare`", file=sys.stderr
        )
        return 2
    processes = []
    try:
        urls = []
        for cpu in (0, 1):
            port = 18500 + cpu
            log = args.data_dir / "logs" / f"bench-affinity-{port}.log"
            print(f"    starting engine {cpu} on CPU {cpu} (port {port}, log {log})", file=sys.stderr)
            processes.append(start_engine(info, port, max_num_seqs=4, cpus=str(cpu), lora=False, log_path=log))
            urls.append(engine_url(port))
        for url, process in zip(urls, processes, strict=True):
            wait_healthy(url, 420, process=process)
        print("    engines ready", file=sys.stderr)
        results = []
        for seed, strategy in enumerate(("round_robin", "affinity"), start=1):
            requests = workload(seed, args.prompts, args.uses, args.words)
            results.append(asyncio.run(run_strategy(strategy, urls, requests, args.concurrency)))
    finally:
        for process in processes:
            stop_engine(process)
    text = markdown(results, args.prompts, args.uses, args.concurrency)
    print(text)
    if not args.no_write:
        report.update_doc(REPO_ROOT / "docs" / "benchmarks.md", {"affinity": text})
    return 0


if __name__ == "__main__":
    sys.exit(main())
