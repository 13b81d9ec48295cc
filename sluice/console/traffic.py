"""The console's traffic series: every few seconds, the gateway's own counters turned into one point.

Each point covers one interval (2 s): proxied requests per second, 5xx answers and 429s per second, the
response cache's hit rate, and per model its requests per second and the p50/p99 of its latency and
time to first token. Percentiles come from the histograms' bucket deltas over the interval, interpolated
linearly within the bucket as Prometheus' `histogram_quantile` does. The last 150 points (5 minutes) are
kept in a ring buffer. Nothing here touches the request path: the sampler reads the instruments the
errors stage already updates. With several workers each keeps its own series (the page shows the worker
that answered).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from sluice.metrics import GatewayMetrics
from sluice.routes import PROXIED

INTERVAL = 2.0
POINTS = 150
PROXIED_ROUTES = frozenset(route.name for route in PROXIED)
CACHE_HITS = ("hit_exact", "hit_semantic")
Buckets = dict[str, list[int]]  # model -> counts per bucket (the last one +Inf)


class _Snapshot:
    """The counters as they stood at one moment."""

    __slots__ = ("at", "cache", "duration", "errors", "limited", "models", "total", "ttft")

    def __init__(self, metrics: GatewayMetrics, at: float) -> None:
        self.at = at
        self.total = self.errors = self.limited = 0.0
        self.models: dict[str, float] = {}
        for (route, model, _backend, status), child in metrics.requests.series():
            if route not in PROXIED_ROUTES:
                continue
            self.total += child.value
            if status.startswith("5"):
                self.errors += child.value
            elif status == "429":
                self.limited += child.value
            if model:
                self.models[model] = self.models.get(model, 0.0) + child.value
        self.cache: dict[str, float] = {}
        for (_route, result), child in metrics.cache_lookups.series():
            self.cache[result] = self.cache.get(result, 0.0) + child.value
        self.duration: Buckets = {labels[0]: list(child.counts) for labels, child in metrics.model_duration.series()}
        self.ttft: Buckets = {labels[0]: list(child.counts) for labels, child in metrics.ttft.series()}


class TrafficSampler:
    def __init__(
        self,
        metrics: GatewayMetrics,
        interval: float = INTERVAL,
        points: int = POINTS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._metrics = metrics
        self.interval = interval
        self._clock = clock
        self._points: deque[dict[str, Any]] = deque(maxlen=points)
        self._last: _Snapshot | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None

    async def start(self) -> None:
        if self._task is not None:
            return
        self._metrics.model_duration_on = True  # the per-model latency is recorded only for the console
        self.sample()  # the baseline: the first point comes one interval later
        self._task = asyncio.create_task(self._run(), name="console-traffic")

    async def close(self) -> None:
        self._metrics.model_duration_on = False
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def describe(self) -> dict[str, Any]:
        return {"interval": self.interval, "points": list(self._points)}

    def sample(self) -> None:
        """Take a snapshot now and, if there was an earlier one, add the point between the two."""
        now = _Snapshot(self._metrics, self._clock())
        last, self._last = self._last, now
        if last is not None and now.at > last.at:
            bounds = (self._metrics.model_duration.buckets, self._metrics.ttft.buckets)
            self._points.append(_point(last, now, *bounds))

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.sample()


def _point(
    before: _Snapshot, after: _Snapshot, latency_bounds: Sequence[float], ttft_bounds: Sequence[float]
) -> dict[str, Any]:
    seconds = after.at - before.at
    hits = sum(after.cache.get(r, 0.0) - before.cache.get(r, 0.0) for r in CACHE_HITS)
    looked_up = hits + after.cache.get("miss", 0.0) - before.cache.get("miss", 0.0)
    models: dict[str, dict[str, float | None]] = {}
    for model, count in after.models.items():
        requests = count - before.models.get(model, 0.0)
        if requests <= 0:
            continue
        duration = _delta(after.duration.get(model), before.duration.get(model))
        ttft = _delta(after.ttft.get(model), before.ttft.get(model))
        models[model] = {
            "rps": requests / seconds,
            "ttft_p50_ms": _ms(quantile(0.5, ttft_bounds, ttft)),
            "ttft_p99_ms": _ms(quantile(0.99, ttft_bounds, ttft)),
            "latency_p50_ms": _ms(quantile(0.5, latency_bounds, duration)),
            "latency_p99_ms": _ms(quantile(0.99, latency_bounds, duration)),
        }
    return {
        "t": after.at,
        "rps": (after.total - before.total) / seconds,
        "errors_per_s": (after.errors - before.errors) / seconds,
        "rate_limited_per_s": (after.limited - before.limited) / seconds,
        "cache_hit_rate": hits / looked_up if looked_up > 0 else None,
        "models": models,
    }


def _delta(after: list[int] | None, before: list[int] | None) -> list[int]:
    if after is None:
        return []
    if before is None:
        return after
    return [now - then for now, then in zip(after, before, strict=True)]


def quantile(q: float, bounds: Sequence[float], counts: Sequence[int]) -> float | None:
    """The q-quantile of observations counted per bucket (`counts[i]` up to `bounds[i]`, the last +Inf).

    Linear interpolation within the bucket, from 0 for the first; an answer in the +Inf bucket is the
    highest finite bound, as in Prometheus' `histogram_quantile`. None when nothing was counted.
    """
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    below = 0
    for index, count in enumerate(counts):
        if count > 0 and below + count >= rank:
            if index >= len(bounds):
                return bounds[-1]
            lower = bounds[index - 1] if index > 0 else 0.0
            return lower + (bounds[index] - lower) * (rank - below) / count
        below += count
    return bounds[-1]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)
