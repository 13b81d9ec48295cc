"""Engines started by `sluice engine start`: pid files in `<data-dir>/run/`, logs in `<data-dir>/logs/`.

One pid file per port (`vllm-<port>.pid`, the pid of the API server, which leads its own session). A pid is
only trusted while `/proc/<pid>/cmdline` still names vLLM's server, so a reused pid is never signalled.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sluice.engine.sessions import terminate_group

SERVER_MODULE = "vllm.entrypoints.openai.api_server"


@dataclass(frozen=True, slots=True)
class EngineRun:
    """A pid file and what it points at."""

    port: int
    pid: int
    pid_file: Path
    log_file: Path
    alive: bool


def pid_file(data_dir: Path, port: int) -> Path:
    return data_dir / "run" / f"vllm-{port}.pid"


def log_file(data_dir: Path, port: int) -> Path:
    return data_dir / "logs" / f"vllm-{port}.log"


def record(data_dir: Path, port: int, pid: int) -> Path:
    path = pid_file(data_dir, port)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{pid}\n")
    return path


def forget(data_dir: Path, port: int, pid: int) -> None:
    """Remove the pid file if it is still this run's (a later run on the same port keeps its own)."""
    path = pid_file(data_dir, port)
    try:
        if int(path.read_text().strip()) == pid:
            path.unlink()
    except (OSError, ValueError):
        pass


def is_engine(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return SERVER_MODULE.encode() in cmdline


def runs(data_dir: Path) -> list[EngineRun]:
    found: list[EngineRun] = []
    for path in sorted((data_dir / "run").glob("vllm-*.pid")):
        try:
            port = int(path.stem.removeprefix("vllm-"))
            pid = int(path.read_text().strip())
        except (OSError, ValueError):
            continue
        found.append(EngineRun(port, pid, path, log_file(data_dir, port), is_engine(pid)))
    return found


def stop(run: EngineRun, timeout: float = 30.0) -> bool:
    """Stop the run's whole session (SIGTERM, SIGKILL after `timeout`); remove its pid file.

    False if it was not running.
    """
    was_alive = run.alive and is_engine(run.pid)
    if was_alive:
        terminate_group(run.pid, timeout)
    run.pid_file.unlink(missing_ok=True)
    return was_alive
