"""The processes of the soak, each restartable on the same port: fake vLLM backends, a throwaway Redis, a
throwaway PostgreSQL and the gateway (`sluice serve`) over a generated configuration.

Nothing here touches the machine's own Redis or PostgreSQL: both servers are new, on free ports, with their
data in a temporary folder. PostgreSQL refuses to run as root, so as root it runs as the `postgres` user
(through `runuser`), as in tests/postgres_server.py.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from bench.env import BenchError
from bench.gateway import serve_command
from bench.postgres import postgres_binary
from bench.procs import LOCALHOST, Service, free_port, start, wait_http, wait_tcp
from sluice.engine.sessions import signal_group

MODEL = "soak-model"
READY_TIMEOUT_S = 30.0


def spawn(name: str, argv: list[str], logdir: Path, env: Mapping[str, str] | None = None) -> Service:
    """Start `argv` in a new process group (not pinned: the soak shares the machine like production does),
    appending its output to `logdir/<name>.log` so a restarted process keeps one log."""
    return start(name, argv, cpu=None, logdir=logdir, env=env, append=True)


@dataclass(frozen=True, slots=True)
class BackendLatency:
    """The fake engine's defaults; each request also asks for its own TTFT and ITL (`X-Fake-*` headers)."""

    ttft_ms: float = 120.0
    itl_ms: float = 15.0
    tokens: int = 60


class FakeBackend:
    """One `python -m sluice.testing.fake_vllm` process, killable with SIGKILL and restartable on its port."""

    def __init__(self, name: str, logdir: Path, latency: BackendLatency) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://{LOCALHOST}:{self.port}"
        self._logdir = logdir
        self._latency = latency
        self._service: Service | None = None

    def start(self) -> None:
        argv = [sys.executable, "-m", "sluice.testing.fake_vllm", "--port", str(self.port), "--model", MODEL,
                "--ttft-ms", f"{self._latency.ttft_ms:g}", "--itl-ms", f"{self._latency.itl_ms:g}",
                "--tokens", str(self._latency.tokens), "--max-num-seqs", "256"]  # fmt: skip
        self._service = spawn(self.name, argv, self._logdir)
        wait_http(self._service, f"{self.url}/health", timeout=READY_TIMEOUT_S)

    def kill(self) -> None:
        """SIGKILL, as an OOM kill or a crashed node would: in-flight requests are cut without a word."""
        if self._service is not None:
            signal_group(self._service.process.pid, signal.SIGKILL)
            self._service.process.wait()
            self._service = None

    def stop(self) -> None:
        if self._service is not None:
            self._service.stop()
            self._service = None


class ThrowawayRedis:
    """A redis-server without persistence on a free port; `stop` and `start` again keep the port."""

    def __init__(self, logdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise BenchError("redis-server is not installed (apt-get install -y redis-server)")
        self._binary = binary
        self.port = free_port()
        self.url = f"redis://{LOCALHOST}:{self.port}/0"
        self._dir = Path(tempfile.mkdtemp(prefix="sluice-soak-redis-"))
        self._logdir = logdir
        self._service: Service | None = None

    def start(self) -> None:
        argv = [self._binary, "--port", str(self.port), "--bind", LOCALHOST, "--save", "", "--appendonly", "no",
                "--dir", str(self._dir)]  # fmt: skip
        self._service = spawn("redis", argv, self._logdir)
        wait_tcp(self._service, self.port, timeout=READY_TIMEOUT_S)

    def stop(self) -> None:
        """SIGTERM: Redis closes its clients and exits (nothing to save)."""
        if self._service is not None:
            self._service.stop()
            self._service = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)


class ThrowawayPostgres:
    """`initdb` into a temporary folder, then `pg_ctl start` / `stop -m fast` on the same port and data."""

    def __init__(self, logdir: Path) -> None:
        self.port = free_port()
        self.url = f"postgresql://postgres@{LOCALHOST}:{self.port}/postgres"
        self._dir = Path(tempfile.mkdtemp(prefix="sluice-soak-pg-"))
        self._data = self._dir / "data"
        self._log = logdir / "postgres.log"
        self._runner: list[str] = []
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError as exc:
                raise BenchError("running as root needs a `postgres` user to run PostgreSQL as") from exc
            os.chown(self._dir, owner.pw_uid, owner.pw_gid)
            self._log = self._dir / "postgres.log"  # the `postgres` user must be able to write it
            self._runner = ["runuser", "-u", "postgres", "--"]

    @property
    def log(self) -> Path:
        return self._log

    def _run(self, *argv: str, timeout: float = 120.0) -> None:
        try:
            done = subprocess.run([*self._runner, *argv], capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"{Path(argv[0]).name} did not finish within {timeout:.0f} s") from exc
        if done.returncode != 0:
            raise BenchError(f"{Path(argv[0]).name} failed: {done.stderr.strip() or done.stdout.strip()}")

    def init(self) -> None:
        self._run(postgres_binary("initdb"), "-D", str(self._data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--no-sync")  # fmt: skip

    def start(self) -> None:
        options = f"-p {self.port} -k {self._dir} -c listen_addresses={LOCALHOST} -c max_connections=100"
        self._run(postgres_binary("pg_ctl"), "-D", str(self._data), "-o", options, "-l", str(self._log), "-w",
                  "-t", "60", "start")  # fmt: skip

    def stop(self) -> None:
        """A fast shutdown: sessions are cut, as in a failover or a restart of the database."""
        self._run(postgres_binary("pg_ctl"), "-D", str(self._data), "-m", "fast", "-w", "-t", "60", "stop")

    def remove(self, keep_log_in: Path | None = None) -> None:
        subprocess.run(
            [*self._runner, postgres_binary("pg_ctl"), "-D", str(self._data), "-m", "immediate", "stop"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        if keep_log_in is not None and self._log.exists() and self._log.parent == self._dir:
            shutil.copy(self._log, keep_log_in / "postgres.log")
        shutil.rmtree(self._dir, ignore_errors=True)


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A key of the soak's configuration; `requests_per_minute` None: only the generous default applies."""

    name: str
    secret: str
    requests_per_minute: int | None = None

    @property
    def env_name(self) -> str:
        return "SOAK_KEY_" + self.name.upper().replace("-", "_")


GENEROUS_REQUESTS_PER_MINUTE = 100_000


def gateway_config(
    port: int,
    workers: int,
    backends: list[FakeBackend],
    keys: list[ApiKey],
    *,
    redis_url: str,
    database_url: str,
    journal_dir: Path,
    postgres_pool: int,
) -> str:
    """Rate limits in Redis (fail open while it is away), the exact-match response cache in Redis, the
    audit log in PostgreSQL; health probes and discovery every second or so, so a restarted backend
    rejoins quickly. Keys come from the environment (`ApiKey.env_name`)."""
    backend_lines = "".join(f'  - {{name: {b.name}, url: "{b.url}"}}\n' for b in backends)
    key_lines = ""
    for key in keys:
        limit = f", requests_per_minute: {key.requests_per_minute}" if key.requests_per_minute else ""
        key_lines += f'    - {{name: {key.name}, key: "${{{key.env_name}}}"{limit}}}\n'
    return f"""server: {{host: {LOCALHOST}, port: {port}, workers: {workers}, drain_timeout: 10}}
backends:
{backend_lines}auth:
  api_keys:
{key_lines}health: {{interval: 1, timeout: 1, discovery_interval: 5, scrape_interval: 1}}
timeouts: {{connect: 2, read: 30, stream_read: 30}}
rate_limits:
  on_redis_failure: fail_open
  per_key: {{requests_per_minute: {GENEROUS_REQUESTS_PER_MINUTE}}}
redis: {{url: "{redis_url}", timeout: 0.25}}
cache:
  enabled: true
  store: redis
  semantic: {{enabled: false}}
database: {{url: "{database_url}", pool_size: {postgres_pool}, connect_timeout: 2}}
audit: {{journal_dir: "{journal_dir}", retry_interval: 1, write_timeout: 3}}
logging: {{level: warning, access_log: false}}
"""


class GatewayProcess:
    """`sluice serve --config <generated file>`: the supervisor and its workers."""

    def __init__(self, workdir: Path, config_text: str, keys: list[ApiKey], port: int) -> None:
        self.port = port
        self.url = f"http://{LOCALHOST}:{port}"
        self._workdir = workdir
        self._config = workdir / "sluice-soak.yaml"
        self._config.write_text(config_text)
        self._env = {key.env_name: key.secret for key in keys}
        self.service: Service | None = None

    def start(self) -> None:
        self.service = spawn("gateway", serve_command(self._config), self._workdir, self._env)
        wait_http(self.service, f"{self.url}/ready", timeout=READY_TIMEOUT_S)

    @property
    def pid(self) -> int:
        if self.service is None:
            raise BenchError("the gateway is not running")
        return self.service.process.pid

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()
