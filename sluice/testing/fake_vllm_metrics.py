"""The fake's `/metrics`: vLLM's metric names and labels, fed by the fake's own simulated load.

Every server gets its own `CollectorRegistry`, so several fakes can live in one process. Gauges are read
from the scheduler at scrape time. Counters and histograms are plain lock-free numbers updated on the
event loop (the fake observes one histogram sample per generated token, and prometheus_client's locked
instruments cost several microseconds each) and turned into metric families when Prometheus scrapes.
Bucket boundaries follow vLLM's.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

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


class FastCounter:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class FastHistogram:
    __slots__ = ("_bounds", "_counts", "_sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self._counts = [0] * (len(bounds) + 1)  # the last slot is +Inf
        self._sum = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self._bounds, value)] += 1  # bucket i holds value <= bounds[i]
        self._sum += value

    def family(self, name: str, doc: str, label_values: list[str]) -> HistogramMetricFamily:
        cumulative: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip([*self._bounds, float("inf")], self._counts, strict=True):
            total += count
            cumulative.append(("+Inf" if math.isinf(bound) else repr(bound), total))
        family = HistogramMetricFamily(name, doc, labels=LABELS)
        family.add_metric(label_values, cumulative, sum_value=self._sum)
        return family


class FakeMetrics(Collector):
    """The instruments of one fake server, for its `model_name` and `engine="0"`."""

    def __init__(self, settings: FakeVLLMSettings, scheduler: Scheduler, loras: LoraRegistry) -> None:
        self._settings = settings
        self._scheduler = scheduler
        self._loras = loras
        self.prompt_tokens = FastCounter()
        self.generation_tokens = FastCounter()
        self.request_success = {reason: FastCounter() for reason in FINISH_REASONS}
        self.prefix_queries = FastCounter()
        self.prefix_hits = FastCounter()
        self.ttft = FastHistogram(TTFT_BUCKETS)
        self.tpot = FastHistogram(TOKEN_LATENCY_BUCKETS)
        self.itl = FastHistogram(TOKEN_LATENCY_BUCKETS)
        self.e2e = FastHistogram(E2E_BUCKETS)
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def collect(self) -> Iterable[Metric]:
        values = [self._settings.model, ENGINE]
        yield from self._gauges(values)
        counters = (
            ("vllm:prompt_tokens", "Number of prefill tokens processed.", self.prompt_tokens),
            ("vllm:generation_tokens", "Number of generation tokens processed.", self.generation_tokens),
            ("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
             self.prefix_queries),
            ("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", self.prefix_hits),
        )  # fmt: skip
        for name, doc, counter in counters:
            family = CounterMetricFamily(name, doc, labels=LABELS)
            family.add_metric(values, counter.value)
            yield family
        success = CounterMetricFamily(
            "vllm:request_success", "Count of successfully processed requests.", labels=[*LABELS, "finished_reason"]
        )
        for reason, counter in self.request_success.items():
            success.add_metric([*values, reason], counter.value)
        yield success
        yield self.ttft.family(
            "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", values
        )
        yield self.tpot.family(
            "vllm:time_per_output_token_seconds", "Histogram of time per output token in seconds.", values
        )
        yield self.itl.family(
            "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", values
        )
        yield self.e2e.family(
            "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", values
        )

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
