"""The fake's `/metrics`: vLLM's metric names and labels, fed by the fake's own simulated load.

Every server gets its own `CollectorRegistry`, so several fakes can live in one process. Gauges are read
from the scheduler at scrape time. Counters and histograms are the gateway's lock-free instruments
(`sluice.instruments`): the fake observes one histogram sample per generated token, and
prometheus_client's locked instruments cost several microseconds each.
Bucket boundaries follow vLLM's.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sluice.instruments import Counter, Histogram, collect_all
from sluice.testing.fake_vllm_settings import FakeVLLMSettings
from sluice.testing.fake_vllm_state import LoraRegistry, Scheduler

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
FINISH_REASONS = ("stop", "length", "abort")
LABELS = ("model_name", "engine")
ENGINE = "0"

# fmt: off
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TOKEN_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                         10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)
# fmt: on


class FakeMetrics(Collector):
    """The instruments of one fake server, for its `model_name` and `engine="0"`."""

    def __init__(self, settings: FakeVLLMSettings, scheduler: Scheduler, loras: LoraRegistry) -> None:
        self._settings = settings
        self._scheduler = scheduler
        self._loras = loras
        values = (settings.model, ENGINE)
        self._counters = [
            Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", LABELS),
            Counter("vllm:generation_tokens", "Number of generation tokens processed.", LABELS),
            Counter("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.", LABELS),
            Counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", LABELS),
        ]
        success = Counter(
            "vllm:request_success", "Count of successfully processed requests.", [*LABELS, "finished_reason"]
        )
        self._histograms = [
            Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", LABELS,
                      TTFT_BUCKETS),
            Histogram("vllm:time_per_output_token_seconds", "Histogram of time per output token in seconds.", LABELS,
                      TOKEN_LATENCY_BUCKETS),
            Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", LABELS,
                      TOKEN_LATENCY_BUCKETS),
            Histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", LABELS,
                      E2E_BUCKETS),
        ]  # fmt: skip
        self._instruments: list[Counter | Histogram] = [*self._counters, success, *self._histograms]
        self.prompt_tokens, self.generation_tokens, self.prefix_queries, self.prefix_hits = (
            counter.child(*values) for counter in self._counters
        )
        self.request_success = {reason: success.child(*values, reason) for reason in FINISH_REASONS}
        self.ttft, self.tpot, self.itl, self.e2e = (histogram.child(*values) for histogram in self._histograms)
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def collect(self) -> Iterable[Metric]:
        yield from self._gauges([self._settings.model, ENGINE])
        yield from collect_all(self._instruments)

    def _gauges(self, values: list[str]) -> Iterable[Metric]:
        """Scheduler and adapter state, sampled when Prometheus scrapes."""
        scheduler = self._scheduler
        running = GaugeMetricFamily(
            "vllm:num_requests_running", "Number of requests in model execution batches.", labels=LABELS
        )
        running.add_metric(values, len(scheduler.running))
        waiting = GaugeMetricFamily(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed.", labels=LABELS
        )
        waiting.add_metric(values, len(scheduler.waiting))
        kv = GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", labels=LABELS)
        kv.add_metric(values, scheduler.kv_usage())
        lora = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "Running stats on lora requests.",
            labels=("max_lora", "waiting_lora_adapters", "running_lora_adapters"),
        )
        base = self._settings.model
        running_loras = ",".join(sorted({s.model for s in scheduler.running if s.model != base}))
        waiting_loras = ",".join(sorted({s.model for s in scheduler.waiting if s.model != base}))
        lora.add_metric([str(self._settings.max_loras), waiting_loras, running_loras], time.time())
        return [running, waiting, kv, lora]
