"""The console's traffic series: points on shared ticks, added up across workers (sluice/console/traffic.py)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from sluice.console.traffic import TrafficSampler
from sluice.metrics import GatewayMetrics


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def serve(metrics: GatewayMetrics, model: str, count: int, seconds: float, status: str = "200") -> None:
    for _ in range(count):
        metrics.requests.child("chat", model, "b0", status).inc()
        metrics.model_duration.child(model).observe(seconds)
        metrics.ttft.child(model).observe(seconds / 10)


def worker(clock: Clock) -> tuple[GatewayMetrics, TrafficSampler]:
    metrics = GatewayMetrics()
    sampler = TrafficSampler(metrics, interval=2.0, clock=clock)
    sampler.sample()  # the baseline
    return metrics, sampler


def raw(sampler: TrafficSampler) -> list[dict[str, Any]]:
    """What a sibling sends over its socket."""
    points: list[dict[str, Any]] = orjson.loads(orjson.dumps(list(sampler._points)))
    return points


def test_two_workers_add_up_per_tick() -> None:
    clock = Clock(1000.3)  # the workers started at different moments of the same interval
    one_metrics, one = worker(clock)
    clock.now = 1001.1
    two_metrics, two = worker(clock)
    serve(one_metrics, "base", 2, 0.01)  # 2 fast requests here
    serve(two_metrics, "base", 98, 1.5)  # 98 slow ones there
    serve(two_metrics, "medical", 4, 0.2, status="503")
    two_metrics.requests.child("chat", "base", "", "429").inc(6)
    one_metrics.cache_lookups.child("chat", "hit_exact").inc(3)
    two_metrics.cache_lookups.child("chat", "miss").inc(1)
    clock.now = 1002.004  # both wake a few milliseconds after the tick
    one.sample()
    clock.now = 1002.011
    two.sample()

    alone = one.describe()["points"]
    assert [p["t"] for p in alone] == [1002.0] and alone[0]["rps"] == pytest.approx(2 / 1.704)
    point = one.describe([raw(two)])["points"]
    assert len(point) == 1 and point[0]["t"] == 1002.0
    merged = point[0]
    assert merged["rps"] == pytest.approx(2 / 1.704 + 108 / 0.911)
    assert merged["errors_per_s"] == pytest.approx(4 / 0.911)
    assert merged["rate_limited_per_s"] == pytest.approx(6 / 0.911)
    assert merged["cache_hit_rate"] == pytest.approx(3 / 4)  # from the summed hits and lookups, not a mean
    base = merged["models"]["base"]
    # From the summed buckets: the median is among the slow requests (one worker's p50 would be 10 ms).
    assert 1000 < base["latency_p50_ms"] <= 2500 and 100 < base["ttft_p50_ms"] <= 250
    assert set(merged["models"]) == {"base", "medical"}
    # The same answer whichever worker is asked.
    assert two.describe([raw(one)])["points"] == one.describe([raw(two)])["points"]


def test_ticks_align_and_a_sibling_missing_a_tick_adds_nothing_to_it() -> None:
    clock = Clock(10.0)
    one_metrics, one = worker(clock)
    _, two = worker(clock)
    for now in (12.002, 14.001, 16.003):
        serve(one_metrics, "base", 4, 0.05)
        clock.now = now
        one.sample()
    clock.now = 16.0
    two.sample()  # the sibling's only point: the tick at 16
    points = one.describe([raw(two)])["points"]
    assert [p["t"] for p in points] == [12.0, 14.0, 16.0]
    assert [round(p["rps"], 3) for p in points[:2]] == [round(4 / 2.002, 3), round(4 / 1.999, 3)]


def test_a_second_sample_within_a_tick_extends_its_point() -> None:
    clock = Clock(100.0)
    metrics, sampler = worker(clock)
    serve(metrics, "base", 3, 0.05)
    clock.now = 101.9
    sampler.sample()  # an early sample (a test or a reload) lands on the tick at 102
    serve(metrics, "base", 5, 0.05)
    clock.now = 102.01
    sampler.sample()  # the sampler's own tick: the same point, now covering all 8 requests
    points = sampler.describe()["points"]
    assert len(points) == 1 and points[0]["rps"] == pytest.approx(8 / 2.01)


def test_the_buffer_keeps_the_newest_points_after_merging() -> None:
    clock = Clock(0.0)
    metrics, sampler = worker(clock)
    for tick in range(1, 200):
        serve(metrics, "base", 1, 0.05)
        clock.now = tick * 2.0
        sampler.sample()
    points = sampler.describe([raw(sampler)])["points"]  # its own points again: every rate doubles
    assert len(points) == 150 and points[-1]["t"] == 398.0
    assert points[-1]["rps"] == pytest.approx(1.0)
