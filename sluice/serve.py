"""Runs the gateway: one process, or N worker processes sharing the port through SO_REUSEPORT.

Each worker is a complete, independent gateway on its own uvloop event loop (the gateway is stateless;
shared state will live in Redis). The supervisor restarts a worker that dies and stops all of them on
SIGINT or SIGTERM. SIGHUP reloads the configuration file (sluice/reload.py): the supervisor re-reads it
for the workers it will start later and passes the signal to every worker, which applies it in place.
`POST /admin/reload` reaches one worker; that worker applies it and signals the supervisor, so the
others follow.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from sluice.app import Gateway
from sluice.audit.journal import JournalError
from sluice.config import SluiceConfig
from sluice.logs import configure_logging
from sluice.reload import InvalidConfig, plan_reload, read_config
from sluice.siblings import WORKERS_ENV
from sluice.store.database import DatabaseError

log = logging.getLogger("sluice.serve")


def serve(config: SluiceConfig, workers: int | None = None, path: Path | None = None) -> int:
    """Run until SIGTERM; `path` is the file `config` came from (re-read on SIGHUP and admin reloads)."""
    configure_logging(config.logging)
    count = workers or config.server.workers
    if count == 1:
        return run_worker(config, reuse_port=False, path=path)
    return _supervise(config, count, path)


def run_worker(config: SluiceConfig, reuse_port: bool, path: Path | None = None, supervised: bool = False) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; this keeps odd platforms working
        return asyncio.run(_worker(config, reuse_port, path, supervised))
    return uvloop.run(_worker(config, reuse_port, path, supervised))


async def _worker(config: SluiceConfig, reuse_port: bool, path: Path | None, supervised: bool) -> int:
    supervisor = os.getppid()
    gateway = Gateway(config, path, (lambda: os.kill(supervisor, signal.SIGHUP)) if supervised else None)
    try:
        await gateway.start(reuse_port=reuse_port)
    except (DatabaseError, JournalError) as exc:  # the message says what to check
        log.error("cannot start", extra={"error": str(exc)})
        await gateway.close()
        return 1
    except OSError as exc:
        log.error("cannot listen", extra={"host": config.server.host, "port": config.server.port, "error": str(exc)})
        await gateway.close()
        return 1
    healthy = [b.name for b in gateway.backends.all if b.healthy]
    log.info(
        "sluice listening",
        extra={"url": gateway.url, "pid": os.getpid(), "healthy_backends": healthy,
               "backends": [b.name for b in gateway.backends.all]},
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[None]] = set()

    def on_sighup() -> None:
        task = loop.create_task(_reload(gateway, path))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    if _early_sighup:
        on_sighup()
    await stop.wait()
    log.info("sluice draining", extra={"pid": os.getpid(), "timeout_s": config.server.drain_timeout})
    finished = await gateway.drain()
    log.info("sluice stopping", extra={"pid": os.getpid(), "drained": finished})
    await gateway.close()
    return 0


async def _reload(gateway: Gateway, path: Path | None) -> None:
    try:
        await gateway.reload(read_config(path))
    except InvalidConfig as exc:
        log.error("reload refused", extra={"error": exc.message})


FORK_BLOCKED = {signal.SIGHUP, signal.SIGINT, signal.SIGTERM}
_early_sighup = False  # a reload asked for while this worker was still starting


def _child(config: SluiceConfig, path: Path | None) -> None:
    # Forked with the supervisor's handlers: until the worker's loop installs its own, SIGTERM and SIGINT
    # just end it, and a SIGHUP is remembered and applied once it listens.
    def remember(signum: int, _frame: object) -> None:
        global _early_sighup
        _early_sighup = True

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, remember)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORK_BLOCKED)  # blocked by the supervisor around the fork
    configure_logging(config.logging)
    sys.exit(run_worker(config, reuse_port=True, path=path, supervised=True))


def _supervise(config: SluiceConfig, count: int, path: Path | None) -> int:
    if config.redis.url is None:
        log.warning(
            "several workers and no redis.url: each worker counts rate limits on its own, so a limit admits up"
            " to workers x its rate; set redis.url (a Redis on this host is enough) to share them",
            extra={"workers": count},
        )
    sockets = tempfile.mkdtemp(prefix="sluice-workers-")  # where workers find each other (sluice/siblings.py)
    os.environ[WORKERS_ENV] = sockets
    try:
        return _run_workers(config, count, path)
    finally:
        shutil.rmtree(sockets, ignore_errors=True)


def _run_workers(config: SluiceConfig, count: int, path: Path | None) -> int:
    context = multiprocessing.get_context("fork")
    children: dict[int, multiprocessing.process.BaseProcess] = {}
    stopping = False

    def start_one() -> None:
        process = context.Process(target=_child, args=(config, path), daemon=False)
        signal.pthread_sigmask(signal.SIG_BLOCK, FORK_BLOCKED)  # none may run a supervisor handler in the child
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, FORK_BLOCKED)
        assert process.pid is not None
        children[process.pid] = process

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for process in children.values():
            if process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)

    def reload(signum: int, _frame: object) -> None:
        nonlocal config
        try:
            config = plan_reload(config, read_config(path)).config  # for workers started from now on
        except InvalidConfig as exc:
            log.error("reload refused", extra={"error": exc.message})
            return
        for process in children.values():
            if process.pid is not None:
                os.kill(process.pid, signal.SIGHUP)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, reload)
    for _ in range(count):
        start_one()
    log.info("supervisor started", extra={"workers": count, "pid": os.getpid()})
    while children:
        time.sleep(0.2)
        for pid, process in list(children.items()):
            if process.is_alive():
                continue
            process.join()
            del children[pid]
            if not stopping:
                log.error("worker died; restarting", extra={"pid": pid, "exitcode": process.exitcode})
                start_one()
    return 0
