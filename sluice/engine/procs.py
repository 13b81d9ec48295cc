"""Running the engine venv's programs: a clean environment, full output to a log file, heartbeats meanwhile.

pip and the conversion scripts print a lot (resolver chatter, progress bars, library warnings); the user
sees only heartbeat dots and the scripts' own step lines, and the whole output lands in a log file that
error messages point to.
"""

from __future__ import annotations

import os
import re
import selectors
import shlex
import subprocess
import tempfile
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sluice.engine.progress import Progress

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
HEARTBEAT_SECONDS = 10.0
# Lines the standalone scripts print for the user start with this indent (see convert_model.log).
SCRIPT_LINE_PREFIX = "      "


@dataclass(frozen=True, slots=True)
class Finished:
    """How a logged command ended: exit code, captured stdout (if asked for) and its last output lines."""

    returncode: int
    stdout: str
    tail: tuple[str, ...]


def venv_env(venv: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The current environment as if `venv` were activated, offline for model hubs, plus `extra`."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    env["VIRTUAL_ENV"] = str(venv)
    env["PATH"] = os.pathsep.join([str(venv / "bin"), env.get("PATH", "/usr/bin:/bin")])
    env.update(OFFLINE_ENV)
    env.update({"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1", "PYTHONUNBUFFERED": "1"})
    if extra:
        env.update(extra)
    return env


def run_logged(
    cmd: list[str],
    *,
    env: Mapping[str, str],
    log_path: Path,
    progress: Progress,
    capture_stdout: bool = False,
    echo_script_lines: bool = False,
) -> Finished:
    """Run `cmd` to completion, appending its output to `log_path` and ticking `progress` while it runs.

    With `capture_stdout`, stdout is kept apart (returned, and logged after the run) and only stderr is
    streamed; otherwise both are streamed together. With `echo_script_lines`, lines starting with
    `SCRIPT_LINE_PREFIX` are shown to the user as they arrive.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tail: deque[str] = deque(maxlen=40)
    with log_path.open("ab") as log, tempfile.TemporaryFile() as out:
        log.write(f"\n$ {shlex.join(cmd)}\n".encode())
        log.flush()
        process = subprocess.Popen(
            cmd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=out if capture_stdout else subprocess.PIPE,
            stderr=subprocess.PIPE if capture_stdout else subprocess.STDOUT,
        )
        stream = process.stderr if capture_stdout else process.stdout
        assert stream is not None
        pending = b""
        with selectors.DefaultSelector() as selector:
            selector.register(stream, selectors.EVENT_READ)
            while True:
                if not selector.select(timeout=HEARTBEAT_SECONDS):
                    progress.tick()
                    continue
                chunk = os.read(stream.fileno(), 65536)
                if not chunk:
                    break
                log.write(chunk)
                log.flush()
                *lines, pending = (pending + chunk).replace(b"\r", b"\n").split(b"\n")
                for raw in lines:
                    line = raw.decode(errors="replace").rstrip()
                    if line:
                        tail.append(line)
                    if echo_script_lines and line.startswith(SCRIPT_LINE_PREFIX):
                        progress.note(line.strip())
        stream.close()
        returncode = process.wait()
        out.seek(0)
        stdout = out.read().decode(errors="replace")
        if capture_stdout:
            log.write(stdout.encode())
        log.write(f"# exit code {returncode}\n".encode())
    return Finished(returncode=returncode, stdout=stdout, tail=tuple(tail))


def failure_reason(finished: Finished) -> str:
    """The most telling line of a failed command's output: pip's `ERROR:` lines, else the last line."""
    errors = [line.removeprefix("ERROR: ").strip() for line in finished.tail if line.startswith("ERROR:")]
    if errors:
        reason = " ".join(errors[:3])
    else:
        reason = finished.tail[-1].strip() if finished.tail else f"exit code {finished.returncode}"
    reason = re.sub(r"\s*\(from versions: [^)]*\)", "", reason)
    return reason if len(reason) <= 300 else reason[:297] + "..."
