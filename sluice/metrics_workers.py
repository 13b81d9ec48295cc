"""One `/metrics` for several worker processes (`server.workers` > 1): each answer covers every worker.

Workers share the listening port, so a scrape reaches one of them at random; alone, each would report
only its own share and the series would jump between workers' values. So each worker also serves its
current metric families on a Unix socket in a folder the supervisor made, and the worker that answers a
scrape asks its siblings (concurrently, 1 s at most) and merges: counters and histograms are summed,
gauges of shared totals (requests in flight, queue depth, audit queue and journal) are summed, and
gauges of state every worker observes for itself (backend health, circuits, dependency status) are the
answering worker's own. A worker that does not answer is left out of that scrape. A restarted worker
starts its counters at zero, so the sums drop once: Prometheus reads that as a counter reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import orjson
from prometheus_client import generate_latest
from prometheus_client.core import Metric

from sluice.metrics import GatewayMetrics

log = logging.getLogger("sluice.metrics")
SIBLING_TIMEOUT = 1.0
# Gauges of state each worker observes on its own (its health checks, its circuits, its connections):
# the answering worker's value stands for all (a sum would count each backend once per worker).
OWN_STATE = ("sluice_backend_", "sluice_model_", "sluice_dependency_up", "sluice_audit_database_up",
             "sluice_cache_store_up", "sluice_rate_limit_degraded")  # fmt: skip

Family = tuple[str, str, str, list[tuple[str, dict[str, str], float]]]  # name, type, help, samples


class WorkerMetrics:
    def __init__(self, metrics: GatewayMetrics, directory: Path) -> None:
        self._metrics = metrics
        self._directory = directory
        self._socket = directory / f"{os.getpid()}.sock"
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._socket.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._answer, path=str(self._socket))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self._socket.unlink(missing_ok=True)

    async def _answer(self, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(orjson.dumps(_families(self._metrics.registry.collect())))
            await writer.drain()
        except OSError:
            pass  # the asking worker gave up (timeout) or exited
        finally:
            writer.close()

    async def render(self) -> bytes:
        """This worker's families merged with every sibling's that answers in time."""
        siblings = [path for path in self._directory.glob("*.sock") if path != self._socket]
        answers = await asyncio.gather(*(_ask(path) for path in siblings))
        own = _families(self._metrics.registry.collect())
        return generate_latest(_Merged(_merge(own, [a for a in answers if a is not None])))


async def _ask(path: Path) -> list[Family] | None:
    try:
        async with asyncio.timeout(SIBLING_TIMEOUT):
            reader, writer = await asyncio.open_unix_connection(str(path))
            try:
                data = await reader.read()
            finally:
                writer.close()
    except (OSError, TimeoutError) as exc:
        if isinstance(exc, ConnectionRefusedError | FileNotFoundError):
            with contextlib.suppress(OSError):
                os.unlink(path)  # a worker that died without cleaning up
        log.warning("a sibling worker's metrics are missing from this scrape", extra={"error": str(exc)})
        return None
    families: list[Family] = orjson.loads(data)
    return families


def _families(metrics: Iterable[Metric]) -> list[Family]:
    return [
        (m.name, m.type, m.documentation, [(s.name, dict(s.labels), float(s.value)) for s in m.samples])
        for m in metrics
    ]


def _merge(own: list[Family], others: list[list[Family]]) -> list[Family]:
    merged: dict[str, tuple[str, str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]] = {}
    for position, families in enumerate([own, *others]):
        for name, kind, documentation, samples in families:
            if position and kind == "gauge" and name.startswith(OWN_STATE):
                continue
            _, _, values = merged.setdefault(name, (kind, documentation, {}))
            for sample, labels, value in samples:
                key = (sample, tuple(sorted(labels.items())))
                values[key] = values.get(key, 0.0) + value
    return [
        (name, kind, documentation, [(sample, dict(labels), value) for (sample, labels), value in values.items()])
        for name, (kind, documentation, values) in merged.items()
    ]


class _Merged:
    """What `generate_latest` reads: the merged families as prometheus-client metrics."""

    def __init__(self, families: list[Family]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        for name, kind, documentation, samples in self._families:
            metric = Metric(name, documentation, kind)
            for sample, labels, value in samples:
                metric.add_sample(sample, labels, value)
            yield metric


def sibling_directory() -> Path | None:
    """The folder of the workers' sockets, when this process is one of several workers."""
    value = os.environ.get(WORKERS_ENV)
    return Path(value) if value else None


WORKERS_ENV = "SLUICE_WORKERS_DIR"
