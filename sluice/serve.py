"""Runs the gateway: one process, or N worker processes sharing the port through SO_REUSEPORT.

Each worker is a complete, independent gateway on its own uvloop event loop (the gateway is stateless;
shared state will live in Redis). The supervisor restarts a worker that dies and stops all of them on
SIGINT or SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import sys
import time

from sluice.app import Gateway
from sluice.config import SluiceConfig
from sluice.logs import configure_logging

log = logging.getLogger("sluice.serve")


def serve(config: SluiceConfig, workers: int | None = None) -> int:
    configure_logging(config.logging)
    count = workers or config.server.workers
    if count == 1:
        return run_worker(config, reuse_port=False)
    return _supervise(config, count)


def run_worker(config: SluiceConfig, reuse_port: bool) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; this keeps odd platforms working
        return asyncio.run(_worker(config, reuse_port))
    return uvloop.run(_worker(config, reuse_port))


async def _worker(config: SluiceConfig, reuse_port: bool) -> int:
    gateway = Gateway(config)
    try:
        await gateway.start(reuse_port=reuse_port)
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
    await stop.wait()
    log.info("sluice draining", extra={"pid": os.getpid(), "timeout_s": config.server.drain_timeout})
    finished = await gateway.drain()
    log.info("sluice stopping", extra={"pid": os.getpid(), "drained": finished})
    await gateway.close()
    return 0


def _child(config: SluiceConfig) -> None:
    configure_logging(config.logging)
    sys.exit(run_worker(config, reuse_port=True))


def _supervise(config: SluiceConfig, count: int) -> int:
    context = multiprocessing.get_context("fork")
    children: dict[int, multiprocessing.process.BaseProcess] = {}
    stopping = False

    def start_one() -> None:
        process = context.Process(target=_child, args=(config,), daemon=False)
        process.start()
        assert process.pid is not None
        children[process.pid] = process

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for process in children.values():
            if process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
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
