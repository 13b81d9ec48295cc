"""The console's traffic series: every few seconds, the gateway's own counters turned into one point.

Each point covers one interval (2 s): proxied requests (count and per second), 5xx answers and 429s
per second, the response cache's hit rate, and per model its requests per second and the p50/p99 of its
latency and time to first token. Percentiles come from the histograms' bucket deltas over the interval,
interpolated linearly within the bucket as Prometheus' `histogram_quantile` does. The last 150 points (5 minutes) are
kept in a ring buffer. Nothing here touches the request path: the sampler reads the instruments the
errors stage already updates.

With several workers (`server.workers` > 1) the page must show them all, whichever worker answers its
poll. Every worker samples on the same wall-clock ticks (multiples of the interval), so points of the
same moment carry the same `t`; the answering worker asks its siblings for their raw points (topic
`console-traffic`, sluice/siblings.py) and adds them up per tick: rates are summed, hit rates are
recomputed from the summed hits and lookups, and percentiles from the summed bucket deltas. A sibling
that does not answer in time is left out of that poll.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from sluice.metrics import GatewayMetrics
from sluice.routes import PROXIED
from sluice.siblings import Siblings

INTERVAL = 2.0
POINTS = 150
TOPIC = "console-traffic"
SUMMED = ("requests", "rps", "errors_per_s", "rate_limited_per_s", "hits", "lookups")
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
        siblings: Siblings | None = None,
        interval: float = INTERVAL,
        points: int = POINTS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._metrics = metrics
        self._siblings = siblings
        self.interval = interval
        self._clock = clock
        self._points: deque[dict[str, Any]] = deque(maxlen=points)
        self._last: _Snapshot | None = None
        self._last_base: _Snapshot | None = None  # where the newest point starts
        self._task: asyncio.Task[None] | None = None
        if siblings is not None:
            siblings.answers[TOPIC] = lambda _: orjson.dumps(list(self._points) if self.running else [])

    @property
    def running(self) -> bool:
        return self._task is not None

    async def start(self) -> None:
        if self._task is not None:
            return
        self._metrics.model_duration_on = True  # the per-model latency is recorded only for the console
        self.sample()  # the baseline: the first point comes at the next tick
        self._task = asyncio.create_task(self._run(), name="console-traffic")

    async def close(self) -> None:
        self._metrics.model_duration_on = False
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def describe(self, siblings: Sequence[list[dict[str, Any]]] = ()) -> dict[str, Any]:
        """The series as the page reads it: this worker's points, added up with `siblings`' raw points."""
        bounds = (self._metrics.model_duration.buckets, self._metrics.ttft.buckets)
        return {"interval": self.interval, "points": _render(_merge([list(self._points), *siblings]), *bounds)}

    async def describe_all(self) -> dict[str, Any]:
        """`describe` over every worker: the siblings that answer in time."""
        if self._siblings is None:
            return self.describe()
        answers = await self._siblings.ask(TOPIC)
        return self.describe([orjson.loads(answer) for answer in answers if answer])

    def sample(self) -> None:
        """Take a snapshot now and add the point since the last one (a second sample within a tick extends it)."""
        now = _Snapshot(self._metrics, self._clock())
        last, self._last = self._last, now
        if last is None or now.at <= last.at:
            return
        tick = round(now.at / self.interval) * self.interval  # the same moment has the same `t` in every worker
        if self._points and self._points[-1]["t"] == tick and self._last_base is not None:
            self._points.pop()
            last = self._last_base
        self._last_base = last
        self._points.append(_raw_point(last, now, tick))

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval - self._clock() % self.interval)  # the next wall-clock tick
            self.sample()


def _raw_point(before: _Snapshot, after: _Snapshot, tick: float) -> dict[str, Any]:
    """One worker's point: rates, and what percentiles and hit rates need to be added up across workers."""
    seconds = after.at - before.at
    hits = sum(after.cache.get(r, 0.0) - before.cache.get(r, 0.0) for r in CACHE_HITS)
    models: dict[str, dict[str, Any]] = {}
    for model, count in after.models.items():
        requests = count - before.models.get(model, 0.0)
        if requests > 0:
            models[model] = {
                "rps": requests / seconds,
                "duration": _delta(after.duration.get(model), before.duration.get(model)),
                "ttft": _delta(after.ttft.get(model), before.ttft.get(model)),
            }
    return {
        "t": tick,
        "requests": after.total - before.total,
        "rps": (after.total - before.total) / seconds,
        "errors_per_s": (after.errors - before.errors) / seconds,
        "rate_limited_per_s": (after.limited - before.limited) / seconds,
        "hits": hits,
        "lookups": hits + after.cache.get("miss", 0.0) - before.cache.get("miss", 0.0),
        "models": models,
    }


def _merge(series: Sequence[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Raw points of several workers added up per tick, oldest first."""
    ticks: dict[float, dict[str, Any]] = {}
    for points in series:
        for point in points:
            total = ticks.get(point["t"])
            if total is None:
                ticks[point["t"]] = {**point, "models": {m: dict(v) for m, v in point["models"].items()}}
                continue
            for field in SUMMED:
                total[field] += point[field]
            for model, values in point["models"].items():
                mine = total["models"].setdefault(model, {"rps": 0.0, "duration": [], "ttft": []})
                mine["rps"] += values["rps"]
                mine["duration"] = _add(mine["duration"], values["duration"])
                mine["ttft"] = _add(mine["ttft"], values["ttft"])
    return [ticks[t] for t in sorted(ticks)][-POINTS:]


def _render(
    points: list[dict[str, Any]], latency_bounds: Sequence[float], ttft_bounds: Sequence[float]
) -> list[dict[str, Any]]:
    return [
        {
            "t": point["t"],
            "requests": point["requests"],
            "rps": point["rps"],
            "errors_per_s": point["errors_per_s"],
            "rate_limited_per_s": point["rate_limited_per_s"],
            "cache_hit_rate": point["hits"] / point["lookups"] if point["lookups"] > 0 else None,
            "models": {
                model: {
                    "rps": values["rps"],
                    "ttft_p50_ms": _ms(quantile(0.5, ttft_bounds, values["ttft"])),
                    "ttft_p99_ms": _ms(quantile(0.99, ttft_bounds, values["ttft"])),
                    "latency_p50_ms": _ms(quantile(0.5, latency_bounds, values["duration"])),
                    "latency_p99_ms": _ms(quantile(0.99, latency_bounds, values["duration"])),
                }
                for model, values in point["models"].items()
            },
        }
        for point in points
    ]


def _add(one: list[int], other: list[int]) -> list[int]:
    """Bucket counts added up (an empty list is no observations)."""
    if not one or not other:
        return list(one or other)
    return [a + b for a, b in zip(one, other, strict=True)]


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
