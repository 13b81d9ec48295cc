"""`sluice engine prepare | start | status | stop`: the local vLLM engine from the command line.

`main(argv)` takes the arguments after `sluice engine`. `start` runs vLLM in the foreground by default
(signals forwarded, the URL printed once it is healthy); `--detach` leaves it running in the background
with its log in `<data-dir>/logs/vllm-<port>.log` and a pid file that `status` and `stop` use.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from sluice.engine import runs
from sluice.engine.errors import EngineError
from sluice.engine.info import EngineInfo, info_path, load_engine_info, missing_files
from sluice.engine.launch import DEFAULT_PORT, engine_url, start_engine, stop_engine, wait_healthy
from sluice.engine.prepare import PrepareOptions, prepare, summary
from sluice.engine.progress import Progress, format_seconds
from sluice.engine.sessions import signal_group

DEFAULT_DATA_DIR = Path("data/engine")
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "prepare":
            return _prepare(args)
        if args.command == "start":
            return _start(args)
        if args.command == "status":
            return _status(args.data_dir)
        if args.command == "stop":
            return _stop(args.data_dir, args.port)
    except EngineError as exc:
        print(f"sluice engine: {exc}", file=sys.stderr)
        return 1
    _parser().print_help()
    return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sluice engine", description="The local vLLM engine (CPU, Gemma 3 270M).")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def data_dir(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "--data-dir",
            type=Path,
            default=DEFAULT_DATA_DIR,
            help="models, adapters, logs, engine.json (default: %(default)s)",
        )

    prepare_cmd = commands.add_parser(
        "prepare", help="install vLLM, convert the model, create the adapters (idempotent)"
    )
    data_dir(prepare_cmd)
    prepare_cmd.add_argument(
        "--venv", type=Path, default=Path(".venv-engine"), help="the engine venv (default: %(default)s)"
    )
    prepare_cmd.add_argument("--python", default=sys.executable, help="interpreter to create the venv with")
    prepare_cmd.add_argument("--no-check", action="store_true", help="skip the test generation after converting")

    start = commands.add_parser("start", help="run vLLM on the prepared engine")
    data_dir(start)
    start.add_argument("--port", type=int, default=DEFAULT_PORT, help="default: %(default)s")
    start.add_argument("--host", default="127.0.0.1", help="default: %(default)s")
    start.add_argument("--max-num-seqs", type=int, default=4, help="requests vLLM runs at once (default: %(default)s)")
    start.add_argument("--max-model-len", type=int, default=2048, help="context length (default: %(default)s)")
    start.add_argument("--kv-cache-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE (default: %(default)s)")
    start.add_argument("--cpus", metavar="LIST", help="pin to these CPUs with taskset, e.g. 1 or 0-1")
    start.add_argument("--no-lora", dest="lora", action="store_false", help="serve the base model only")
    start.add_argument("--detach", action="store_true", help="run in the background, log to <data-dir>/logs/")
    start.add_argument(
        "--wait", action=argparse.BooleanOptionalAction, default=True, help="wait for /health (default: wait)"
    )
    start.add_argument(
        "--timeout", type=float, default=300.0, help="seconds to wait for /health (default: %(default)s)"
    )

    status = commands.add_parser("status", help="what is prepared and what is running")
    data_dir(status)

    stop = commands.add_parser("stop", help="stop engines started with --detach")
    data_dir(stop)
    stop.add_argument("--port", type=int, help="only the engine on this port (default: all)")
    return parser


def _prepare(args: argparse.Namespace) -> int:
    progress = Progress(total=5)
    options = PrepareOptions(
        data_dir=args.data_dir, venv_dir=args.venv, base_python=args.python, check=not args.no_check
    )
    info = prepare(options, progress)
    print(summary(info, progress.elapsed()), file=sys.stderr)
    print(info_path(args.data_dir.absolute()))
    return 0


def _require_info(data_dir: Path) -> EngineInfo:
    info = load_engine_info(data_dir.absolute())
    if info is None:
        raise EngineError(f"no prepared engine in {data_dir}: run `sluice engine prepare` first (about 4 minutes)")
    return info


def _start(args: argparse.Namespace) -> int:
    info = _require_info(args.data_dir)
    data_dir = args.data_dir.absolute()
    url = engine_url(args.port, args.host)
    log_path = runs.log_file(data_dir, args.port) if args.detach else None
    process = start_engine(
        info,
        args.port,
        args.max_num_seqs,
        args.cpus,
        args.lora,
        host=args.host,
        log_path=log_path,
        kv_cache_gib=args.kv_cache_gib,
        max_model_len=args.max_model_len,
    )
    runs.record(data_dir, args.port, process.pid)
    served = [info.served_model_name, *(info.adapters if args.lora else [])]
    print(f"starting vLLM (pid {process.pid}) on {url} serving {', '.join(served)} …", file=sys.stderr)
    if args.detach:
        return _detached(process, data_dir, args, url, log_path)
    return _foreground(process, data_dir, args, url)


def _detached(
    process: subprocess.Popen[bytes], data_dir: Path, args: argparse.Namespace, url: str, log_path: Path | None
) -> int:
    print(f"log: {log_path}", file=sys.stderr)
    if args.wait:
        try:
            _wait(url, args.timeout, process, dots=True)
        except EngineError as exc:
            stop_engine(process)
            runs.forget(data_dir, args.port, process.pid)
            raise EngineError(f"{exc}; its log: {log_path}") from exc
    print(f"stop it with `sluice engine stop --port {args.port}`", file=sys.stderr)
    print(url)
    return 0


def _foreground(process: subprocess.Popen[bytes], data_dir: Path, args: argparse.Namespace, url: str) -> int:
    def forward(signum: int, _frame: FrameType | None) -> None:
        signal_group(process.pid, signal.Signals(signum))

    previous = {signum: signal.signal(signum, forward) for signum in FORWARDED_SIGNALS}
    try:
        if args.wait:
            try:
                _wait(url, args.timeout, process, dots=False)
            except EngineError as exc:
                print(f"sluice engine: {exc}", file=sys.stderr)
                stop_engine(process)
                return 1
            print(url, flush=True)
        return process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        runs.forget(data_dir, args.port, process.pid)


def _wait(url: str, timeout: float, process: subprocess.Popen[bytes], dots: bool) -> None:
    """Wait for /health; dots only when vLLM's own log is not on the terminal already."""
    progress = Progress(total=0)
    progress.step(f"waiting for {url}/health (about a minute; timeout {timeout:.0f} s)")
    wait_healthy(url, timeout, process=process, on_tick=_every(5.0, progress.tick) if dots else None)
    progress.done(f"ready at {url}")


def _every(seconds: float, action: Callable[[], None]) -> Callable[[], None]:
    """`action`, but at most once per `seconds` (wait_healthy polls every second; a dot per 5 s is enough)."""
    last = time.monotonic()

    def throttled() -> None:
        nonlocal last
        if time.monotonic() - last >= seconds:
            last = time.monotonic()
            action()

    return throttled


def _status(data_dir: Path) -> int:
    absolute = data_dir.absolute()
    info = load_engine_info(absolute)
    if info is None:
        print(f"not prepared: no {info_path(data_dir)}; run `sluice engine prepare`")
        prepared = False
    else:
        prepared = _print_info(info)
    engines = runs.runs(absolute)
    if not engines:
        print("running: none (start one with `sluice engine start --detach`)")
    for run in engines:
        if not run.alive:
            print(f"port {run.port}: not running (stale pid file {run.pid_file} removed)")
            run.pid_file.unlink(missing_ok=True)
            continue
        print(f"running: pid {run.pid}, {engine_url(run.port)} — {_health(engine_url(run.port))}; log {run.log_file}")
    return 0 if prepared else 1


def _print_info(info: EngineInfo) -> bool:
    missing = missing_files(info)
    size = (
        sum(path.stat().st_size for path in info.model_dir.glob("*") if path.is_file())
        if info.model_dir.exists()
        else 0
    )
    versions = ", ".join(f"{name} {version}" for name, version in info.versions.items())
    print(f"prepared {info.prepared_at}")
    print(f"  venv:     {info.venv} ({versions})")
    print(f"  model:    {info.served_model_name} = {info.model_dir} ({size / 1e6:.0f} MB)")
    adapters = ", ".join(f"{name} = {path}" for name, path in info.adapters.items())
    print(f"  adapters: {adapters} (untrained, for demonstration)")
    if missing:
        print(f"  INCOMPLETE: {missing[0]} is missing; re-run `sluice engine prepare`")
    return not missing


def _health(url: str) -> str:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2.0) as response:
            return "healthy" if response.status == 200 else f"/health answered {response.status}"
    except OSError:
        return "starting (or not answering /health)"


def _stop(data_dir: Path, port: int | None) -> int:
    engines = [run for run in runs.runs(data_dir.absolute()) if port is None or run.port == port]
    if not engines:
        print("no engine to stop" + (f" on port {port}" if port is not None else ""), file=sys.stderr)
        return 1 if port is not None else 0
    for run in engines:
        started = time.monotonic()
        stopped = runs.stop(run)
        what = f"stopped in {format_seconds(time.monotonic() - started)}" if stopped else "was not running"
        print(f"port {run.port} (pid {run.pid}): {what}", file=sys.stderr)
    return 0
