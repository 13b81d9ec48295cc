"""Child processes of the harness: start pinned to a CPU, wait until ready, measure, stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from bench.env import BenchError
from sluice.engine.sessions import process_table, signal_group

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCALHOST = "127.0.0.1"
STOP_GRACE_S = 5.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        return int(sock.getsockname()[1])


@dataclass(slots=True)
class Service:
    """A server the harness started in its own process group, logging to a file."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 12) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def rss_mib(self) -> float | None:
        """Resident memory of the process and its descendants (nginx workers, granian workers)."""
        total_kib = 0
        for pid in [self.process.pid, *descendants(self.process.pid)]:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("VmRSS:"):
                    total_kib += int(line.split()[1])
        return total_kib / 1024 if total_kib else None

    def stop(self) -> None:
        """SIGTERM the service's process group, SIGKILL it if it lingers."""
        if self.process.poll() is not None:
            return
        signal_group(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            signal_group(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=STOP_GRACE_S)


def descendants(root: int) -> list[int]:
    """Every process below `root` (children, grandchildren, …), from the process table."""
    parents: dict[int, list[int]] = {}
    for pid, _state, ppid, _pgrp in process_table():
        parents.setdefault(ppid, []).append(pid)
    found: list[int] = []
    todo = [root]
    while todo:
        children = parents.get(todo.pop(), [])
        found.extend(children)
        todo.extend(children)
    return found


def start(
    name: str,
    argv: list[str],
    *,
    cpu: int | None,
    taskset: str = "taskset",
    logdir: Path,
    env: Mapping[str, str] | None = None,
    append: bool = False,
) -> Service:
    """Start ``argv`` in a new process group, pinned to ``cpu`` unless it is None, output to
    ``logdir/<name>.log`` (``append``: a restarted process keeps adding to one log)."""
    log = logdir / f"{name}.log"
    command = argv if cpu is None else [taskset, "-c", str(cpu), *argv]
    with log.open("ab" if append else "wb") as out:
        try:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=REPO_ROOT,
                env={**os.environ, **(env or {})},
            )
        except OSError as exc:
            raise BenchError(f"cannot start {name}: {exc}") from exc
    return Service(name=name, process=process, log=log)


def http_status(
    url: str,
    *,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 2.0,
) -> tuple[int, bytes]:
    """One request to 127.0.0.1; ``(0, reason)`` when it could not be made."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        return 0, str(exc).encode()


def wait_http(service: Service, url: str, *, timeout: float = 20.0) -> None:
    """Poll ``url`` until it answers 200; fail with the service's log if it dies or times out."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if not service.alive():
            raise BenchError(f"{service.name} exited (code {service.process.returncode}):\n{service.log_tail()}")
        status, body = http_status(url, timeout=1.0)
        if status == 200:
            return
        last = f"last answer {status}: {body[:200].decode(errors='replace')}"
        time.sleep(0.1)
    raise BenchError(f"{service.name} not ready at {url} after {timeout:.0f} s ({last}):\n{service.log_tail()}")


def wait_tcp(service: Service, port: int, *, timeout: float = 20.0) -> None:
    """Poll until 127.0.0.1:``port`` accepts connections."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not service.alive():
            raise BenchError(f"{service.name} exited (code {service.process.returncode}):\n{service.log_tail()}")
        try:
            with socket.create_connection((LOCALHOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise BenchError(f"{service.name} not listening on port {port} after {timeout:.0f} s:\n{service.log_tail()}")
