"""Every Prometheus instrument of the gateway, declared once, on a registry owned by the app.

Labels are bounded: routes are a fixed set, models are those the backends list (anything else is
counted as "unknown"), backends come from config. Keys and users are never labels. Backend state is
collected at scrape time rather than updated on the request path.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sluice.errors import NoHealthyBackend, UpstreamError, UpstreamTimeout
from sluice.instruments import Counter, Histogram, collect_all
from sluice.upstream.backends import Backend, Backends

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 300)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 1.5, 2, 3, 5, 10, 20, 60)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.5, 1)
RAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5)
# Why an attempt is retried elsewhere (the failure's error code): every backend has these series from the
# first scrape, at 0, because rate() cannot see an increase in a series that is born with it, and a
# backend's first burst of failures would otherwise be invisible to SluiceBackendErrorRateHigh.
RETRY_REASONS = (NoHealthyBackend.code, UpstreamError.code, UpstreamTimeout.code)
CACHE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


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
        # Kept for the console's per-model latency (sluice/console/traffic.py), not exported: Prometheus has
        # the per-route duration, and a per-model one would multiply its series by the models' count.
        self.model_duration_on = False  # set while the console's sampler runs: no cost on the hot path otherwise
        self.model_duration = Histogram(
            "sluice_model_request_duration_seconds", "Time from request received to response finished, by model.",
            ["model"], LATENCY_BUCKETS,
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
            "sluice_circuit_transitions",
            "Circuit breaker state changes, by backend, model (empty for the backend's own circuit) and new state.",
            ["backend", "model", "state"],
        )
        self.stream_errors = Counter(
            "sluice_stream_errors", "Streams cut after they started (answered with an SSE error event).",
            ["backend"],
        )
        self.adapter_operations = Counter(
            "sluice_adapter_operations",
            "Runtime LoRA loads and unloads the gateway made, by backend, adapter, operation and outcome.",
            ["backend", "adapter", "operation", "outcome"],
        )
        self.rate_limited = Counter(
            "sluice_rate_limited",
            "Requests refused by rate limits, by reason (ip, requests, tokens, concurrency, unavailable).",
            ["reason"],
        )
        self.auth_failures = Counter(
            "sluice_auth_failures", "Requests refused for their credentials, by reason.", ["reason"]
        )
        self.cache_lookups = Counter(
            "sluice_cache_lookups",
            "Response cache outcomes, by route and result (hit_exact, hit_semantic, miss, bypass: not consulted).",
            ["route", "result"],
        )
        self.cache_lookup_duration = Histogram(
            "sluice_cache_lookup_duration_seconds",
            "Time to look a request up in the response cache, by level (exact; semantic: excluding the embedding).",
            ["level"], CACHE_BUCKETS,
        )
        self.cache_embedding_duration = Histogram(
            "sluice_cache_embedding_duration_seconds", "Time to embed a request for the semantic cache.",
            [], CACHE_BUCKETS,
        )
        self.cache_errors = Counter(
            "sluice_cache_errors",
            "Response cache operations that failed and were skipped, by part (store: Redis; embedder).",
            ["part"],
        )
        self.cache_stores = Counter(
            "sluice_cache_stores",
            "Answers offered to the response cache, by outcome (stored, incomplete, too_large, failed).",
            ["outcome"],
        )
        self.fallbacks = Counter(
            "sluice_fallbacks",
            "Requests answered by a fallback model because none of the requested model's backends could, by "
            "requested model and the fallback that answered.",
            ["model", "fallback"],
        )
        self.repair_actions = Counter(
            "sluice_repair_actions",
            "Alertmanager notifications acted on (POST /admin/alerts), by action (drain, undrain), alert (other: "
            "not one repair acts on) and outcome (done, already, refused_last_backend, unknown_backend, ignored).",
            ["action", "alert", "outcome"],
        )
        self.rag_retrievals = Counter(
            "sluice_rag_retrievals",
            "Retrievals for RAG routes, by route (the model name clients use) and outcome (grounded: context "
            "injected; no_match: nothing passed min_score; unavailable: the store or embedder failed or timed out).",
            ["route", "outcome"],
        )
        self.rag_retrieval_duration = Histogram(
            "sluice_rag_retrieval_duration_seconds",
            "Time to retrieve the context of a RAG request (embedding and query), by route.",
            ["route"], RAG_BUCKETS,
        )
        self.in_flight = 0  # requests being handled now; exported at scrape time
        self.queue_depth: Callable[[], int] = lambda: 0  # requests waiting for backend capacity
        self.rate_limiter: Any = None  # sluice.ratelimit.RateLimiter: degraded, redis_errors
        self.audit: Any = None  # sluice.audit.writer.AuditWriter: counts, queue, journal, database_up
        self.cache: Any = None  # sluice.cache.service.ResponseCache: store health
        self.dependencies: Callable[[], dict[str, bool]] = dict  # dependency name -> reachable now

    def watch_backends(self, backends: Backends) -> None:
        self.registry.register(_StateCollector(self, backends))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _scraped(read: Callable[[Backend], float]) -> Callable[[Backend, float], float | None]:
    """A gauge that only exists once the engine's /metrics have been read."""
    return lambda backend, _now: read(backend) if backend.scraped_at else None


# Per-backend gauges read from live state at scrape time: (name, help, value or None to omit).
BACKEND_GAUGES: tuple[tuple[str, str, Callable[[Backend, float], float | None]], ...] = (
    ("sluice_backend_up", "1 if the backend passes health checks.", lambda b, _now: 1.0 if b.healthy else 0.0),
    ("sluice_backend_drained", "1 while a drain (automatic repair or the console) keeps new requests off the backend.",
     lambda b, _now: 1.0 if b.drained_by else 0.0),
    ("sluice_backend_in_flight", "Requests the gateway has outstanding on the backend.",
     lambda b, _now: b.in_flight),
    ("sluice_backend_models", "Models (base and LoRA) the backend lists.", lambda b, _now: len(b.models)),
    ("sluice_backend_requests_running", "Requests the engine reports running (vllm:num_requests_running).",
     _scraped(lambda b: b.reported_running)),
    ("sluice_backend_requests_waiting", "Requests the engine reports queued (vllm:num_requests_waiting).",
     _scraped(lambda b: b.reported_waiting)),
    ("sluice_backend_kv_cache_usage", "KV-cache use the engine reports, 0 to 1 (vllm:kv_cache_usage_perc).",
     _scraped(lambda b: b.reported_kv_usage)),
    ("sluice_backend_scrape_age_seconds", "Seconds since the engine's /metrics were last read.",
     lambda b, now: now - b.scraped_at if b.scraped_at else None),
    ("sluice_backend_circuit_state", "Circuit of the backend (connect errors, timeouts, cut streams): "
     "0 closed, 1 half-open, 2 open.",
     lambda b, _now: int(b.breaker.state) if b.breaker is not None else None),
)  # fmt: skip


class _StateCollector(Collector):
    """Gauges read from live state when Prometheus scrapes, so the request path updates nothing."""

    def __init__(self, metrics: GatewayMetrics, backends: Backends) -> None:
        self._metrics = metrics
        self._backends = backends

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        for backend in self._backends.all:  # also those added since (reload, discovery)
            m.stream_errors.child(backend.name)
            for reason in RETRY_REASONS:
                m.retries.child(backend.name, reason)
        yield from collect_all(
            [m.requests, m.duration, m.ttft, m.tpot, m.tokens, m.retries, m.stream_errors, m.circuit_transitions,
             m.adapter_operations, m.rate_limited, m.auth_failures, m.cache_lookups, m.cache_lookup_duration,
             m.cache_embedding_duration, m.cache_errors, m.cache_stores, m.fallbacks, m.repair_actions,
             m.rag_retrievals, m.rag_retrieval_duration]
        )
        yield GaugeMetricFamily("sluice_requests_in_flight", "Requests being handled now.", m.in_flight)
        yield GaugeMetricFamily(
            "sluice_queue_depth", "Requests waiting for a backend under its max_concurrency.", m.queue_depth()
        )
        limiter = m.rate_limiter
        if limiter is not None:
            yield GaugeMetricFamily(
                "sluice_rate_limit_degraded",
                "1 while Redis is unreachable and rate limits are kept per replica (fail_open).",
                1.0 if limiter.degraded else 0.0,
            )
            yield CounterMetricFamily(
                "sluice_rate_limit_redis_errors", "Rate-limit calls to Redis that failed.", limiter.redis_errors
            )
        if m.audit is not None:
            yield from _audit_metrics(m.audit)
        dependencies = GaugeMetricFamily(
            "sluice_dependency_up",
            "1 while a service the gateway uses answers (redis: rate limits and cache; postgres: the audit log).",
            labels=["dependency"],
        )
        for name, up in sorted(m.dependencies().items()):
            dependencies.add_metric([name], 1.0 if up else 0.0)
        yield dependencies
        healthy = GaugeMetricFamily(
            "sluice_model_backends_healthy",
            "Healthy backends that can answer a model now (a registered adapter: where its base model runs).",
            labels=["model"],
        )
        for model in sorted(self._backends.known):
            healthy.add_metric([model], self._backends.healthy_count(model))
        yield healthy
        if m.cache is not None:
            yield GaugeMetricFamily("sluice_cache_store_up", "1 while the response cache's store (Redis) answers.",
                                    1.0 if m.cache.store_up else 0.0)  # fmt: skip
        now = time.monotonic()
        for name, documentation, value in BACKEND_GAUGES:
            family = GaugeMetricFamily(name, documentation, labels=["backend"])
            for backend in self._backends.all:
                sample = value(backend, now)
                if sample is not None:
                    family.add_metric([backend.name], sample)
            yield family
        family = GaugeMetricFamily(
            "sluice_model_circuit_state",
            "Circuit of one model on one backend (5xx answers): 0 closed, 1 half-open, 2 open.",
            labels=["backend", "model"],
        )
        for backend in self._backends.all:
            for model, breaker in backend.model_breakers.items():
                family.add_metric([backend.name, model], int(breaker.state))
        yield family


def _audit_metrics(writer: Any) -> Iterator[Metric]:
    records = CounterMetricFamily(
        "sluice_audit_records",
        "Audit records by what became of them: written (to the database), journaled (to disk while the database "
        "was away), replayed (from the journal), dropped (no room, audit.on_full: drop), rejected (requests "
        "refused for want of room, audit.on_full: reject), invalid (refused by the database for their data, kept in "
        "the dead-letter file).",
        labels=["outcome"],
    )
    for outcome, count in writer.counts.items():
        records.add_metric([outcome], count)
    yield records
    yield GaugeMetricFamily("sluice_audit_queue_depth", "Audit records waiting in memory for the writer.",
                            len(writer.queue))  # fmt: skip
    yield GaugeMetricFamily("sluice_audit_journal_bytes", "Bytes of audit records waiting in the on-disk journal.",
                            writer.journal.pending_bytes)  # fmt: skip
    yield GaugeMetricFamily("sluice_audit_database_up", "1 while audit records go straight to the database.",
                            1.0 if writer.database_up else 0.0)  # fmt: skip
