"""The simulated engine behind the fake vLLM: admission, prefill, token timing and per-request accounting.

Handlers drive a `Sequence` through `admit` → `token_due` (once per token) → `finish`, and `finish` is
called exactly once whatever happens, so the scheduler slot, the metrics and the stats always settle.

Timing, as in vLLM: a request waits for a scheduler slot (`max_num_seqs`), looks its prompt up in the
prefix cache, then waits its turn in the prefill lane, which takes `uncached tokens × prefill_ms_per_token`
(skipped when that is 0, the default). Token `i` is then due at `prefilled_at + ttft + i * itl`
(absolute deadlines, so a busy loop does not make the fake drift slower than configured).
"""

from __future__ import annotations

import asyncio
import enum
import random

from sluice.testing.fake_vllm_metrics import FakeMetrics
from sluice.testing.fake_vllm_settings import FakeVLLMSettings, Knobs
from sluice.testing.fake_vllm_state import (
    FakeStats,
    LoraRegistry,
    PrefillLane,
    PrefixCache,
    Scheduler,
    Sequence,
)


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
        self.prefix_cache = PrefixCache(settings)
        self.prefill_lane = PrefillLane()
        self.rng = random.Random(settings.seed)

    def new_sequence(self, model: str, prompt_words: list[str]) -> Sequence:
        loop = asyncio.get_running_loop()
        return Sequence(model, prompt_words, max(1, len(prompt_words)), loop.time())

    async def admit(self, seq: Sequence) -> None:
        """Wait for a scheduler slot, then for the prefill of the prompt's uncached tokens."""
        await self.scheduler.admit(seq)
        seq.scheduled_at = seq.prefilled_at = asyncio.get_running_loop().time()
        # Looked up (and cached) on admission, as vLLM's scheduler does: a later request with the same
        # prefix hits even before this prefill ends, and the FIFO lane makes it wait for that end anyway.
        hits = self.prefix_cache.lookup(seq.model, seq.prompt_words)
        self._count_prefix(seq.prompt_tokens, hits)
        per_token_s = self.settings.prefill_ms_per_token / 1000.0
        if per_token_s > 0:
            seq.prefilled_at = await self.prefill_lane.run((seq.prompt_tokens - hits) * per_token_s)

    def _count_prefix(self, queried: int, hits: int) -> None:
        self.stats.prefix_queries += queried
        self.stats.prefix_hits += hits
        self.metrics.prefix_queries.inc(queried)
        if hits:
            self.metrics.prefix_hits.inc(hits)

    def _prefill_done(self, seq: Sequence) -> None:
        self.metrics.prompt_tokens.inc(seq.prompt_tokens)

    async def prefill(self, seq: Sequence, knobs: Knobs) -> None:
        """Wait out the TTFT of a request that generates nothing, e.g. embeddings (`admit` did its prefill)."""
        delay = seq.prefilled_at + knobs.ttft_s - asyncio.get_running_loop().time()
        if delay > 0:
            await asyncio.sleep(delay)
        self._prefill_done(seq)

    async def token_due(self, seq: Sequence, index: int, knobs: Knobs) -> None:
        """Wait until token `index` is due, then account for it."""
        loop = asyncio.get_running_loop()
        delay = seq.prefilled_at + knobs.ttft_s + index * knobs.itl_s - loop.time()
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
