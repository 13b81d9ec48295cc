"""Instructions per request of the bare gateway, counted by callgrind: `python -m bench.callgrind`.

Wall-clock throughput on this VM swings by ±20 % between runs, too much to see a change of a few per
cent on the request path. Instructions do not swing: the gateway runs under `valgrind --tool=callgrind`
(static key, no limits, audit off, the config of `make bench`'s core part), a client sends N requests
one after another on one keep-alive connection to a fake vLLM behind it, the gateway stops on SIGTERM,
and the difference of the totals of a run with N=600 and one with N=100, divided by 500, is the cost of
one request (start-up and shutdown cancel out). Takes a few minutes: Python under valgrind is ~50× slower.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.gateway import KEY_ENV, config_yaml, serve_command
from bench.procs import LOCALHOST, free_port
from bench.progress import Progress

KEY = "sk-callgrind-0123456789"
BODY = b'{"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}'
RUNS = (100, 600)
PLANNED_S = 90.0  # one run: start-up under valgrind dominates
TOTALS = re.compile(rb"^(?:summary|totals): (\d+)", re.MULTILINE)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, nargs=2, default=RUNS, metavar=("FEW", "MANY"))
    args = parser.parse_args()
    few, many = args.requests
    with tempfile.TemporaryDirectory(prefix="sluice-callgrind-") as folder:
        work = Path(folder)
        upstream_port = free_port()
        fake = subprocess.Popen(
            [sys.executable, "-m", "sluice", "fake-vllm", "--port", str(upstream_port), "--model", "base"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait(upstream_port, "/health", 30)
            progress = Progress(2, 2 * PLANNED_S)
            totals = []
            for count in (few, many):
                progress.step(f"gateway under callgrind, {count} requests", PLANNED_S)
                totals.append(_instructions(work, upstream_port, count))
        finally:
            fake.terminate()
            fake.wait(10)
    per_request = (totals[1] - totals[0]) / (many - few)
    print(f"instructions: {totals[0]:,} with {few} requests, {totals[1]:,} with {many}")
    print(f"per request: {per_request:,.0f}")
    return 0


def _instructions(work: Path, upstream_port: int, count: int) -> int:
    port = free_port()
    config = work / f"sluice-{count}.yaml"
    config.write_text(config_yaml(port, upstream_port))
    out = work / f"callgrind-{count}.out"
    command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *serve_command(config)]
    gateway = subprocess.Popen(
        command, env={**os.environ, KEY_ENV: KEY}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _wait(port, "/ready", 300)
        connection = http.client.HTTPConnection(LOCALHOST, port, timeout=60)
        headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
        for _ in range(count):
            connection.request("POST", "/v1/chat/completions", BODY, headers)
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise SystemExit(f"the gateway answered {response.status}")
        connection.close()
        gateway.send_signal(signal.SIGTERM)
        gateway.wait(300)
    finally:
        if gateway.poll() is None:
            gateway.kill()
    found = TOTALS.search(out.read_bytes())
    if found is None:
        raise SystemExit(f"no totals in {out}")
    return int(found.group(1))


def _wait(port: int, path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            connection = http.client.HTTPConnection(LOCALHOST, port, timeout=5)
            connection.request("GET", path)
            if connection.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"http://{LOCALHOST}:{port}{path} did not answer within {timeout:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
