"""wrk runs against one target and the parsing of wrk's ``--latency`` report."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench.env import BenchError

CHAT_SCRIPT = Path(__file__).resolve().parent / "wrk" / "chat.lua"
_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}
_PERCENTILE = re.compile(r"^\s*(50|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m)\s*$", re.MULTILINE)
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_TOTAL = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m)", re.MULTILINE)
_NON_2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


@dataclass(frozen=True, slots=True)
class WrkResult:
    """One wrk run: throughput, latency percentiles (ms) and the failures it saw."""

    requests_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    socket_errors: int

    @property
    def errors(self) -> int:
        return self.non_2xx + self.socket_errors


def parse_wrk(output: str) -> WrkResult:
    """Parse wrk's text report (run with ``--latency``)."""
    percentiles = {m.group(1): float(m.group(2)) * _UNITS_MS[m.group(3)] for m in _PERCENTILE.finditer(output)}
    rps = _RPS.search(output)
    total = _TOTAL.search(output)
    if rps is None or total is None or set(percentiles) != {"50", "99"}:
        raise BenchError(f"could not parse wrk output:\n{output.strip()}")
    non_2xx = _NON_2XX.search(output)
    socket = _SOCKET.search(output)
    return WrkResult(
        requests_per_s=float(rps.group(1)),
        p50_ms=percentiles["50"],
        p99_ms=percentiles["99"],
        requests=int(total.group(1)),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(n) for n in socket.groups()) if socket else 0,
    )


def run_wrk(
    url: str,
    *,
    connections: int,
    duration_s: float,
    wrk: str,
    taskset: str,
    cpu: int,
    env: dict[str, str],
    pause_ms: float | None = None,
) -> WrkResult:
    """One wrk run (1 thread, ``connections`` connections) pinned to ``cpu``, bounded in time.

    ``pause_ms``: each connection pauses a random time of that mean before each request (see chat.lua), so
    the offered rate is about ``connections / pause`` instead of as fast as the target answers.
    """
    if pause_ms is not None:
        env = {**env, "SLUICE_BENCH_PAUSE_MS": f"{pause_ms:g}"}
    argv = [
        taskset,
        "-c",
        str(cpu),
        wrk,
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(duration_s))}s",
        "--latency",
        "-s",
        str(CHAT_SCRIPT),
        url,
    ]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=duration_s + 30, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"wrk did not finish within {duration_s + 30:.0f} s against {url}") from exc
    if done.returncode != 0:
        raise BenchError(f"wrk failed against {url} (exit {done.returncode}): {done.stderr.strip()}")
    return parse_wrk(done.stdout)
