"""Counters and histograms for the request path, exposed through prometheus-client at scrape time.

prometheus-client's own instruments take a lock and, for histograms, walk every bucket in Python on
each observation; measured on the gateway that was several microseconds per request. These keep plain
numbers, updated only from the event loop's thread (so no lock is needed), find a bucket with
`bisect`, and are turned into metric families by a collector when Prometheus scrapes.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import ItemsView, Iterator, Sequence

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

MAX_SERIES = 10_000  # per instrument; beyond it new label sets share one overflow series


class CounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class HistogramChild:
    __slots__ = ("buckets", "counts", "sum")

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last slot is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.sum += value


class _Instrument:
    def __init__(self, name: str, documentation: str, labels: Sequence[str]) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = tuple(labels)
        self._overflow = tuple("overflow" for _ in self.labels)


class Counter(_Instrument):
    def __init__(self, name: str, documentation: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, documentation, labels)
        self._children: dict[tuple[str, ...], CounterChild] = {}

    def child(self, *labels: str) -> CounterChild:
        found = self._children.get(labels)
        if found is None:
            key = labels if len(self._children) < MAX_SERIES else self._overflow
            found = self._children.setdefault(key, CounterChild())
        return found

    def series(self) -> ItemsView[tuple[str, ...], CounterChild]:
        """Every label set and its child, live (read from the event loop's thread only)."""
        return self._children.items()

    def collect(self) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for labels, child in self._children.items():
            family.add_metric(labels, child.value)
        return family


class Histogram(_Instrument):
    def __init__(self, name: str, documentation: str, labels: Sequence[str], buckets: Sequence[float]) -> None:
        super().__init__(name, documentation, labels)
        self.buckets = tuple(sorted(buckets))
        self._children: dict[tuple[str, ...], HistogramChild] = {}

    def child(self, *labels: str) -> HistogramChild:
        found = self._children.get(labels)
        if found is None:
            key = labels if len(self._children) < MAX_SERIES else self._overflow
            found = self._children.setdefault(key, HistogramChild(self.buckets))
        return found

    def series(self) -> ItemsView[tuple[str, ...], HistogramChild]:
        """Every label set and its child, live (read from the event loop's thread only)."""
        return self._children.items()

    def collect(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        for labels, child in self._children.items():
            cumulative, running = [], 0
            for bound, count in zip((*self.buckets, float("inf")), child.counts, strict=True):
                running += count
                cumulative.append((_bound(bound), running))
            family.add_metric(labels, cumulative, child.sum)
        return family


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(float(value))


def collect_all(instruments: Sequence[Counter | Histogram]) -> Iterator[Metric]:
    for instrument in instruments:
        yield instrument.collect()
