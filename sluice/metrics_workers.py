"""One `/metrics` for several worker processes (`server.workers` > 1): each answer covers every worker.

Workers share the listening port, so a scrape reaches one of them at random; alone, each would report
only its own share and the series would jump between workers' values. So the worker that answers a
scrape asks its siblings for their current metric families (topic `metrics` on the channel of
sluice/siblings.py) and merges: counters and histograms are summed, gauges of shared totals (requests in
flight, per backend too, queue depth, audit queue and journal) are summed, and gauges of state every
worker observes for itself (backend health, circuits, dependency status) are the answering worker's own.
A worker that does not answer is left out of that scrape. A restarted worker starts its counters at zero,
so the sums drop once: Prometheus reads that as a counter reset.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import orjson
from prometheus_client import generate_latest
from prometheus_client.core import Metric

from sluice.metrics import GatewayMetrics
from sluice.siblings import Siblings

TOPIC = "metrics"
# Gauges of state each worker observes on its own (its health checks, its circuits, its connections):
# the answering worker's value stands for all (a sum would count each backend once per worker).
OWN_STATE = ("sluice_backend_", "sluice_model_", "sluice_dependency_up", "sluice_audit_database_up",
             "sluice_cache_store_up", "sluice_rate_limit_degraded")  # fmt: skip
SUMMED_STATE = frozenset({"sluice_backend_in_flight"})  # a per-backend gauge that is each worker's share

Family = tuple[str, str, str, list[tuple[str, dict[str, str], float]]]  # name, type, help, samples


class WorkerMetrics:
    def __init__(self, metrics: GatewayMetrics, siblings: Siblings) -> None:
        self._metrics = metrics
        self._siblings = siblings
        siblings.answers[TOPIC] = lambda _: orjson.dumps(_families(metrics.registry.collect()))

    async def render(self) -> bytes:
        """This worker's families merged with every sibling's that answers in time."""
        answers = [orjson.loads(answer) for answer in await self._siblings.ask(TOPIC) if answer]
        own = _families(self._metrics.registry.collect())
        return generate_latest(_Merged(_merge(own, answers)))


def _families(metrics: Iterable[Metric]) -> list[Family]:
    return [
        (m.name, m.type, m.documentation, [(s.name, dict(s.labels), float(s.value)) for s in m.samples])
        for m in metrics
    ]


def _merge(own: list[Family], others: list[list[Family]]) -> list[Family]:
    merged: dict[str, tuple[str, str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]] = {}
    for position, families in enumerate([own, *others]):
        for name, kind, documentation, samples in families:
            if position and kind == "gauge" and name.startswith(OWN_STATE) and name not in SUMMED_STATE:
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
