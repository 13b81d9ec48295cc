"""The Sluice gateway under test: generated config, start command, readiness."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from bench.env import BenchError
from bench.procs import LOCALHOST, Service, start, wait_http

KEY_ENV = "SLUICE_BENCH_KEY"
READY_TIMEOUT_S = 30.0


def config_yaml(port: int, upstream_port: int) -> str:
    """Minimal gateway config: one backend, one API key taken from the environment."""
    return f"""server: {{host: {LOCALHOST}, port: {port}}}
backends:
  - {{name: bench, url: "http://{LOCALHOST}:{upstream_port}"}}
auth:
  api_keys:
    - {{name: bench, key: "${{{KEY_ENV}}}"}}
"""


def serve_command(config: Path) -> list[str]:
    """``sluice serve`` from the venv's console script, else via ``python -m sluice.cli``."""
    script = Path(sys.executable).parent / "sluice"
    if script.exists():
        return [str(script), "serve", "--config", str(config)]
    if importlib.util.find_spec("sluice.cli") is None:
        raise BenchError("the Sluice gateway is not installed (no sluice.cli): pip install -e .")
    return [sys.executable, "-m", "sluice.cli", "serve", "--config", str(config)]


def start_gateway(workdir: Path, port: int, upstream_port: int, *, key: str, taskset: str, cpu: int) -> Service:
    """Start the gateway pinned to ``cpu`` and wait until ``GET /ready`` answers 200."""
    if importlib.util.find_spec("sluice.cli") is None:
        raise BenchError("sluice.cli does not exist yet")
    config = workdir / f"sluice-{port}.yaml"
    config.write_text(config_yaml(port, upstream_port))
    service = start(
        f"sluice-{port}", serve_command(config), cpu=cpu, taskset=taskset, logdir=workdir, env={KEY_ENV: key}
    )
    try:
        wait_http(service, f"http://{LOCALHOST}:{port}/ready", timeout=READY_TIMEOUT_S)
    except BenchError:
        service.stop()
        raise
    return service
