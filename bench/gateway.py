"""The Sluice gateway under test: generated config, start command, readiness."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Mapping
from pathlib import Path

from bench.env import BenchError
from bench.procs import LOCALHOST, Service, start, wait_http

KEY_ENV = "SLUICE_BENCH_KEY"
# The audit log is off unless a part measures it (the `audit` part): the other parts' numbers stay
# comparable with earlier runs, and the audit part reports what it adds.
AUDIT_OFF = "audit: {enabled: false}\n"
READY_TIMEOUT_S = 30.0


def config_yaml(
    port: int,
    upstream_port: int,
    *,
    key_limits: Mapping[str, int] | None = None,
    extra: str = "",
    audit: str = AUDIT_OFF,
) -> str:
    """Minimal gateway config: one backend, one API key taken from the environment.

    ``key_limits`` become fields of the key (``requests_per_minute``…); ``extra`` is appended as more
    top-level sections (``redis``, ``rate_limits``); ``audit`` holds the ``database`` and ``audit`` sections.
    """
    limits = "".join(f", {name}: {value}" for name, value in (key_limits or {}).items())
    return f"""server: {{host: {LOCALHOST}, port: {port}}}
backends:
  - {{name: bench, url: "http://{LOCALHOST}:{upstream_port}"}}
auth:
  api_keys:
    - {{name: bench, key: "${{{KEY_ENV}}}"{limits}}}
{audit}{extra}"""


def serve_command(config: Path) -> list[str]:
    """``sluice serve`` from the venv's console script, else via ``python -m sluice.cli``."""
    script = Path(sys.executable).parent / "sluice"
    if script.exists():
        return [str(script), "serve", "--config", str(config)]
    if importlib.util.find_spec("sluice.cli") is None:
        raise BenchError("the Sluice gateway is not installed (no sluice.cli): pip install -e .")
    return [sys.executable, "-m", "sluice.cli", "serve", "--config", str(config)]


def start_gateway(
    workdir: Path,
    port: int,
    upstream_port: int,
    *,
    key: str,
    taskset: str,
    cpu: int,
    key_limits: Mapping[str, int] | None = None,
    extra: str = "",
    audit: str = AUDIT_OFF,
) -> Service:
    """Start the gateway pinned to ``cpu`` and wait until ``GET /ready`` answers 200."""
    if importlib.util.find_spec("sluice.cli") is None:
        raise BenchError("sluice.cli does not exist yet")
    config = workdir / f"sluice-{port}.yaml"
    config.write_text(config_yaml(port, upstream_port, key_limits=key_limits, extra=extra, audit=audit))
    service = start(
        f"sluice-{port}", serve_command(config), cpu=cpu, taskset=taskset, logdir=workdir, env={KEY_ENV: key}
    )
    try:
        wait_http(service, f"http://{LOCALHOST}:{port}/ready", timeout=READY_TIMEOUT_S)
    except BenchError:
        service.stop()
        raise
    return service
