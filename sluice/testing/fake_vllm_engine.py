"""The simulated engine behind the fake vLLM: admission, token timing and per-request accounting.

Handlers drive a `Sequence` through `admit` → `token_due` (once per token) → `finish`, and `finish` is
called exactly once whatever happens, so the scheduler slot, the metrics and the stats always settle.
Token `i` is due at `scheduled_at + ttft + i * itl` (absolute deadlines, so a busy loop does not make
the fake drift slower than configured).
"""

from __future__ import annotations

import asyncio
import enum
import random

from sluice.testing.fake_vllm_metrics import FakeMetrics
from sluice.testing.fake_vllm_settings import FakeVLLMSettings, Knobs
from sluice.testing.fake_vllm_state import FakeStats, LoraRegistry, PrefixCache, Scheduler, Sequence


class Outcome(enum.Enum):
    COMPLETED = "completed"
    ABORTED = "aborted"  # the client went away
    FAILED = "failed"  # the fake cut or failed it on purpose


class FakeEngine:
    """Everything one fake server shares between its handlers."""

    def __init__(self, settings: FakeVLLMSettings) -> None:
        self.settings = settings
        self.stats = FakeStats()
        self.scheduler = Scheduler(settings, self.stats)
        self.loras = LoraRegistry(settings)
        self.metrics = FakeMetrics(settings, self.scheduler, self.loras)
        self.prefix_cache = PrefixCache(settings.kv_capacity_tokens)
        self.rng = random.Random(settings.seed)

    def new_sequence(self, model: str, prompt_words: list[str]) -> Sequence:
        loop = asyncio.get_running_loop()
        return Sequence(model, prompt_words, max(1, len(prompt_words)), loop.time())

    async def admit(self, seq: Sequence) -> None:
        await self.scheduler.admit(seq)
        seq.scheduled_at = asyncio.get_running_loop().time()

    def _prefill_done(self, seq: Sequence) -> None:
        metrics = self.metrics
        metrics.prompt_tokens.inc(seq.prompt_tokens)
        metrics.prefix_queries.inc(seq.prompt_tokens)
        hits = self.prefix_cache.lookup(seq.model, seq.prompt_words)
        if hits:
            metrics.prefix_hits.inc(hits)

    async def prefill(self, seq: Sequence, knobs: Knobs) -> None:
        """Wait out the prefill (TTFT) of a request that generates nothing, e.g. embeddings."""
        if knobs.ttft_s > 0:
            await asyncio.sleep(knobs.ttft_s)
        self._prefill_done(seq)

    async def token_due(self, seq: Sequence, index: int, knobs: Knobs) -> None:
        """Wait until token `index` is due, then account for it."""
        loop = asyncio.get_running_loop()
        delay = seq.scheduled_at + knobs.ttft_s + index * knobs.itl_s - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        now = loop.time()
        if index == 0:
            seq.first_token_at = now
            self.metrics.ttft.observe(now - seq.arrival)
            self._prefill_done(seq)
        else:
            self.metrics.itl.observe(now - seq.last_token_at)
        seq.last_token_at = now
        seq.generated = index + 1

    def finish(self, seq: Sequence, outcome: Outcome, reason: str) -> None:
        """Free the slot and settle metrics and stats; `reason` is the finish reason if COMPLETED."""
        self.scheduler.release(seq)
        metrics = self.metrics
        if seq.generated:
            metrics.generation_tokens.inc(seq.generated)
        if outcome is Outcome.COMPLETED:
            now = asyncio.get_running_loop().time()
            metrics.e2e.observe(now - seq.arrival)
            if seq.generated > 1:
                metrics.tpot.observe((now - seq.first_token_at) / (seq.generated - 1))
            metrics.request_success[reason].inc()
            self.stats.completed += 1
            return
        metrics.request_success["abort"].inc()
        if outcome is Outcome.ABORTED:
            self.stats.aborted += 1
        else:
            self.stats.failed += 1
