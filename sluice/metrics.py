"""Every Prometheus instrument of the gateway, declared once, on a registry owned by the app.

Labels are bounded: routes are a fixed set, models are those the backends list (anything else is
counted as "unknown"), backends come from config. Keys and users are never labels. Backend state is
collected at scrape time rather than updated on the request path.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sluice.instruments import Counter, Histogram, collect_all
from sluice.upstream.backends import Backends

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 300)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 1.5, 2, 3, 5, 10, 20, 60)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.5, 1)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "sluice_requests", "Requests answered, by route, model, backend and HTTP status.",
            ["route", "model", "backend", "status"],
        )
        self.duration = Histogram(
            "sluice_request_duration_seconds", "Time from request received to response finished.",
            ["route"], LATENCY_BUCKETS,
        )
        self.ttft = Histogram(
            "sluice_time_to_first_token_seconds", "Time from request received to the first streamed token.",
            ["model"], TTFT_BUCKETS,
        )
        self.tpot = Histogram(
            "sluice_time_per_output_token_seconds", "Mean time between streamed tokens of one response.",
            ["model"], TPOT_BUCKETS,
        )
        self.tokens = Counter(
            "sluice_tokens", "Tokens reported by the backends, by model and kind (prompt, completion).",
            ["model", "kind"],
        )
        self.retries = Counter(
            "sluice_upstream_retries", "Requests retried on another backend, by the backend that failed and why.",
            ["backend", "reason"],
        )
        self.circuit_transitions = Counter(
            "sluice_circuit_transitions", "Circuit breaker state changes, by backend and new state.",
            ["backend", "state"],
        )
        self.stream_errors = Counter(
            "sluice_stream_errors", "Streams cut after they started (answered with an SSE error event).",
            ["backend"],
        )
        self.in_flight = 0  # requests being handled now; exported at scrape time
        self.queue_depth: Callable[[], int] = lambda: 0  # requests waiting for backend capacity

    def watch_backends(self, backends: Backends) -> None:
        self.registry.register(_StateCollector(self, backends))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector(Collector):
    """Gauges read from live state when Prometheus scrapes, so the request path updates nothing."""

    def __init__(self, metrics: GatewayMetrics, backends: Backends) -> None:
        self._metrics = metrics
        self._backends = backends

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        yield from collect_all(
            [m.requests, m.duration, m.ttft, m.tpot, m.tokens, m.retries, m.stream_errors, m.circuit_transitions]
        )
        yield GaugeMetricFamily("sluice_requests_in_flight", "Requests being handled now.", m.in_flight)
        yield GaugeMetricFamily(
            "sluice_queue_depth", "Requests waiting for a backend under its max_concurrency.", m.queue_depth()
        )
        up = GaugeMetricFamily("sluice_backend_up", "1 if the backend passes health checks.", labels=["backend"])
        load = GaugeMetricFamily(
            "sluice_backend_in_flight", "Requests the gateway has outstanding on the backend.", labels=["backend"]
        )
        models = GaugeMetricFamily(
            "sluice_backend_models", "Models (base and LoRA) the backend lists.", labels=["backend"]
        )
        running = GaugeMetricFamily(
            "sluice_backend_requests_running", "Requests the engine reports running (vllm:num_requests_running).",
            labels=["backend"],
        )
        waiting = GaugeMetricFamily(
            "sluice_backend_requests_waiting", "Requests the engine reports queued (vllm:num_requests_waiting).",
            labels=["backend"],
        )
        kv = GaugeMetricFamily(
            "sluice_backend_kv_cache_usage", "KV-cache use the engine reports, 0 to 1 (vllm:kv_cache_usage_perc).",
            labels=["backend"],
        )
        age = GaugeMetricFamily(
            "sluice_backend_scrape_age_seconds", "Seconds since the engine's /metrics were last read.",
            labels=["backend"],
        )
        circuit = GaugeMetricFamily(
            "sluice_backend_circuit_state", "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
            labels=["backend"],
        )
        now = time.monotonic()
        for backend in self._backends.all:
            up.add_metric([backend.name], 1.0 if backend.healthy else 0.0)
            if backend.breaker is not None:
                circuit.add_metric([backend.name], int(backend.breaker.state))
            if backend.scraped_at:
                running.add_metric([backend.name], backend.reported_running)
                waiting.add_metric([backend.name], backend.reported_waiting)
                kv.add_metric([backend.name], backend.reported_kv_usage)
                age.add_metric([backend.name], now - backend.scraped_at)
            load.add_metric([backend.name], backend.in_flight)
            models.add_metric([backend.name], len(backend.models))
        yield from (up, load, models, running, waiting, kv, age, circuit)
