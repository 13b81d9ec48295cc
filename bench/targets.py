"""The lab: upstreams, proxies under test and a Redis, started pinned and stopped when a scenario ends."""

from __future__ import annotations

import importlib.util
import json
import shutil
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from bench import gateway, nginx
from bench.env import BenchError, CpuPlan, Tools, missing_modules
from bench.postgres import start_postgres
from bench.procs import LOCALHOST, Service, free_port, start, wait_http, wait_tcp

FAKE_VLLM_MODULE = "sluice.testing.fake_vllm"
STREAM_ITL_MS = 20
STREAM_TOKENS = 64
REDIS_PORT = 6379  # the machine's own Redis, used when it answers PING without a password


@dataclass(frozen=True, slots=True)
class Target:
    """Something wrk or the stream client points at."""

    name: str
    base_url: str
    service: Service | None

    @property
    def chat_url(self) -> str:
        return self.base_url + "/v1/chat/completions"

    def rss_mib(self) -> float | None:
        return self.service.rss_mib() if self.service is not None else None


@dataclass(frozen=True, slots=True)
class Skipped:
    """A target that could not be measured, and why."""

    name: str
    reason: str


@dataclass(frozen=True, slots=True)
class Redis:
    """The Redis a gateway under test keeps its rate limits in, and how it runs (for the report)."""

    url: str
    description: str


@dataclass(frozen=True, slots=True)
class StackSpec:
    """One alternative proxy of the stack study."""

    name: str
    label: str
    modules: tuple[str, ...]


STACKS = (
    StackSpec(
        "protocol",
        "minimal asyncio Protocol + httptools, uvloop, own upstream pool (no pipeline)",
        ("httptools", "uvloop"),
    ),
    StackSpec("uvicorn-aiohttp", "ASGI on uvicorn (uvloop, httptools) + aiohttp client", ("uvicorn", "aiohttp")),
    StackSpec("uvicorn-httpx", "ASGI on uvicorn (uvloop, httptools) + httpx.AsyncClient", ("uvicorn", "httpx")),
    StackSpec("aiohttp", "aiohttp web server + aiohttp client", ("aiohttp",)),
    StackSpec("granian-aiohttp", "ASGI on granian (uvloop) + aiohttp client", ("granian", "aiohttp")),
)


class Lab:
    """Starts services pinned per the CPU plan; everything started is stopped by ``close``."""

    def __init__(self, tools: Tools, cpus: CpuPlan, workdir: Path, key: str) -> None:
        self.tools = tools
        self.cpus = cpus
        self.workdir = workdir
        self.key = key
        self._stack = ExitStack()

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    def _keep(self, service: Service) -> Service:
        self._stack.callback(service.stop)
        return service

    def _dir(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def canned_upstream(self) -> Target:
        """nginx answering a canned chat completion, pinned with the load generator."""
        port = free_port()
        service = nginx.start_canned_upstream(
            self._dir("upstream"),
            port,
            nginx=self.tools.nginx,
            taskset=self.tools.taskset,
            cpu=self.cpus.rest,
        )
        return Target("direct", f"http://{LOCALHOST}:{port}", self._keep(service))

    def fake_vllm(self) -> Target:
        """The fake vLLM streaming 64 tokens 20 ms apart, pinned with the load generator."""
        if importlib.util.find_spec(FAKE_VLLM_MODULE) is None:
            raise BenchError(f"{FAKE_VLLM_MODULE} not found (the fake vLLM is not written yet)")
        port = free_port()
        argv = [
            sys.executable,
            "-m",
            FAKE_VLLM_MODULE,
            "--port",
            str(port),
            "--model",
            nginx.MODEL,
            "--itl-ms",
            str(STREAM_ITL_MS),
            "--tokens",
            str(STREAM_TOKENS),
        ]
        service = self._keep(
            start(f"fake-vllm-{port}", argv, cpu=self.cpus.rest, taskset=self.tools.taskset, logdir=self.workdir)
        )
        wait_http(service, f"http://{LOCALHOST}:{port}/health")
        return Target("direct", f"http://{LOCALHOST}:{port}", service)

    def nginx_proxy(self, upstream: Target) -> Target:
        """nginx as a plain reverse proxy in front of ``upstream``."""
        port = free_port()
        service = nginx.start_reverse_proxy(
            self._dir(f"proxy-{port}"),
            port,
            _port(upstream),
            nginx=self.tools.nginx,
            taskset=self.tools.taskset,
            cpu=self.cpus.proxy,
        )
        return Target("nginx", f"http://{LOCALHOST}:{port}", self._keep(service))

    def sluice(
        self,
        upstream: Target,
        *,
        name: str = "sluice",
        key_limits: Mapping[str, int] | None = None,
        extra: str = "",
        audit: str = gateway.AUDIT_OFF,
    ) -> Target | Skipped:
        """The Sluice gateway in front of ``upstream``, or why it could not run (config: ``gateway.config_yaml``)."""
        port = free_port()
        try:
            service = gateway.start_gateway(
                self.workdir,
                port,
                _port(upstream),
                key=self.key,
                taskset=self.tools.taskset,
                cpu=self.cpus.proxy,
                key_limits=key_limits,
                extra=extra,
                audit=audit,
            )
        except BenchError as exc:
            return Skipped(name, f"gateway not measured: {exc}")
        return Target(name, f"http://{LOCALHOST}:{port}", self._keep(service))

    def postgres(self) -> str:
        """A throwaway PostgreSQL server on the load generator's core; its URL (see bench/postgres.py)."""
        url, service, folder = start_postgres(self.workdir, taskset=self.tools.taskset, cpu=self.cpus.rest)
        self._stack.callback(shutil.rmtree, folder, True)  # after the server stops (callbacks run last first)
        self._keep(service)
        return url

    def redis(self) -> Redis:
        """Redis on loopback: a throwaway redis-server pinned to the load generator's core (like the
        throwaway PostgreSQL, so Redis's CPU is not taken from the gateway's core: in production it has a
        host of its own); the machine's on port 6379 only when redis-server is not installed."""
        server = shutil.which("redis-server")
        if server is None:
            if _redis_answers(REDIS_PORT):
                return Redis(
                    f"redis://{LOCALHOST}:{REDIS_PORT}/0",
                    f"the machine's Redis on {LOCALHOST}:{REDIS_PORT} (not pinned)",
                )
            raise BenchError(
                f"redis-server is not installed (apt-get install -y redis-server) and no Redis answers on "
                f"{LOCALHOST}:{REDIS_PORT}"
            )
        port = free_port()
        argv = [server, "--port", str(port), "--bind", LOCALHOST, "--save", "", "--appendonly", "no"]
        service = self._keep(
            start(f"redis-{port}", argv, cpu=self.cpus.rest, taskset=self.tools.taskset, logdir=self.workdir)
        )
        wait_tcp(service, port)
        return Redis(
            f"redis://{LOCALHOST}:{port}/0",
            f"a throwaway redis-server on {LOCALHOST}:{port}, no persistence, on CPU {self.cpus.rest}",
        )

    def stack(self, spec: StackSpec, upstream: Target) -> Target | Skipped:
        """One alternative proxy of the stack study, or why it could not run."""
        missing = missing_modules(*spec.modules)
        if missing:
            return Skipped(spec.name, f"not installed: {', '.join(missing)} (pip install -r bench/requirements.txt)")
        port = free_port()
        argv = [
            sys.executable,
            "-m",
            "bench.stacks.serve",
            spec.name,
            "--port",
            str(port),
            "--upstream",
            upstream.base_url,
        ]
        service = self._keep(
            start(
                f"stack-{spec.name}",
                argv,
                cpu=self.cpus.proxy,
                taskset=self.tools.taskset,
                logdir=self.workdir,
                env={gateway.KEY_ENV: self.key},
            )
        )
        try:
            wait_tcp(service, port)
        except BenchError as exc:
            return Skipped(spec.name, str(exc))
        return Target(spec.name, f"http://{LOCALHOST}:{port}", service)

    def preflight(self, target: Target | Skipped, *, header: str | None = None) -> Target | Skipped:
        """One real chat request; a target that does not answer 200 with choices (and ``header``) is skipped."""
        if isinstance(target, Skipped):
            return target
        body = json.dumps({"model": nginx.MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode()
        headers = {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"}
        status, answer, received = _post(target.chat_url, body, headers)
        if status != 200 or b'"choices"' not in answer:
            return Skipped(target.name, f"preflight POST answered {status}: {answer[:200].decode(errors='replace')}")
        if header is not None and header not in received:
            return Skipped(target.name, f"preflight answer has no {header} header (are the limits in force?)")
        return target


def _port(target: Target) -> int:
    return int(target.base_url.rsplit(":", 1)[1])


def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes, dict[str, str]]:
    """POST to 127.0.0.1: status, body and lower-cased headers; ``(0, reason, {})`` if it could not be made."""
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5.0) as response:
            return int(response.status), response.read(), {k.lower(): v for k, v in response.headers.items()}
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), {k.lower(): v for k, v in exc.headers.items()}
    except (urllib.error.URLError, OSError) as exc:
        return 0, str(exc).encode(), {}


def _redis_answers(port: int) -> bool:
    """Whether a Redis on 127.0.0.1:``port`` answers PING (one that wants a password does not)."""
    try:
        with socket.create_connection((LOCALHOST, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False
