"""The lock-free instruments expose exactly what prometheus-client's own would."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client import Histogram as ReferenceHistogram
from prometheus_client.registry import Collector

from sluice.instruments import MAX_SERIES, Counter, Histogram

BUCKETS = (0.01, 0.1, 1, 10)


class _One(Collector):
    def __init__(self, instrument: Counter | Histogram) -> None:
        self.instrument = instrument

    def collect(self):  # type: ignore[no-untyped-def]
        yield self.instrument.collect()


@given(st.lists(st.floats(0, 100, allow_nan=False) | st.sampled_from(BUCKETS), max_size=50))
def test_histogram_matches_prometheus_client(values: list[float]) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    histogram = Histogram("h_seconds", "doc", ["route"], BUCKETS)
    ours.register(_One(histogram))
    reference = ReferenceHistogram("h_seconds", "doc", ["route"], buckets=BUCKETS, registry=theirs)
    for value in values:
        histogram.child("chat").observe(value)
        reference.labels("chat").observe(value)
    strip = lambda text: [line for line in text.decode().splitlines() if "_created" not in line]  # noqa: E731
    assert strip(generate_latest(ours)) == strip(generate_latest(theirs))


def test_counter_and_series_bound() -> None:
    registry = CollectorRegistry()
    counter = Counter("c", "doc", ["key"])
    registry.register(_One(counter))
    counter.child("a").inc()
    counter.child("a").inc(2)
    assert 'c_total{key="a"} 3.0' in generate_latest(registry).decode()
    for i in range(MAX_SERIES + 10):
        counter.child(str(i)).inc()
    assert counter.child("overflow").value == 11  # label sets past the bound share one series
