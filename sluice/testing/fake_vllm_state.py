"""Live state of a fake vLLM server: counters, the FIFO scheduler, the prefix cache and loaded adapters.

The scheduler mimics vLLM's: at most `max_num_seqs` sequences run at once and the rest wait, first come
first served. A running sequence holds `prompt + generated` tokens of KV cache, which is what
`vllm:kv_cache_usage_perc` reports against `kv_capacity_tokens`.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, field

from sluice.testing.fake_vllm_settings import FakeVLLMSettings, parse_lora

PREFIX_BLOCK_TOKENS = 16  # vLLM's default KV block size; only full blocks are cached


@dataclass
class FakeStats:
    """Counters readable live from Python (`FakeVLLM.stats`) or over HTTP (`GET /fake/stats`).

    `completed`: full responses delivered; `aborted`: the client went away before the response finished;
    `failed`: answered with an error status or cut by an injected `drop`/`close`.
    """

    requests_total: int = 0
    requests_by_model: dict[str, int] = field(default_factory=dict)
    running: int = 0
    waiting: int = 0
    completed: int = 0
    aborted: int = 0
    failed: int = 0
    last_request_headers: dict[str, str] = field(default_factory=dict)
    last_request_body: object = None

    def as_dict(self) -> dict[str, object]:
        return {
            "requests_total": self.requests_total,
            "requests_by_model": dict(self.requests_by_model),
            "running": self.running,
            "waiting": self.waiting,
            "completed": self.completed,
            "aborted": self.aborted,
            "failed": self.failed,
            "last_request_headers": dict(self.last_request_headers),
            "last_request_body": self.last_request_body,
        }

    def reset(self) -> None:
        """Zero the counters; `running` and `waiting` describe live requests and stay."""
        self.requests_total = self.completed = self.aborted = self.failed = 0
        self.requests_by_model = {}
        self.last_request_headers = {}
        self.last_request_body = None


@dataclass(eq=False, slots=True)
class Sequence:
    """One request inside the simulated engine (identity-hashed so it can sit in sets)."""

    model: str
    prompt_words: list[str]
    prompt_tokens: int
    arrival: float
    generated: int = 0
    scheduled_at: float = 0.0
    first_token_at: float = 0.0
    last_token_at: float = 0.0


class Scheduler:
    """FIFO admission with at most `settings.max_num_seqs` sequences running."""

    def __init__(self, settings: FakeVLLMSettings, stats: FakeStats) -> None:
        self._settings = settings
        self._stats = stats
        self.running: set[Sequence] = set()
        self._waiting: OrderedDict[Sequence, asyncio.Future[None]] = OrderedDict()

    @property
    def waiting(self) -> list[Sequence]:
        return list(self._waiting)

    async def admit(self, seq: Sequence) -> None:
        """Return once `seq` runs; cancellation while queued leaves the queue (call `release` anyway)."""
        if not self._waiting and len(self.running) < self._settings.max_num_seqs:
            self.running.add(seq)
            self._stats.running = len(self.running)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[seq] = future
        self._stats.waiting = len(self._waiting)
        await future

    def release(self, seq: Sequence) -> None:
        """Forget `seq` (running or still queued) and start the next queued sequences."""
        if seq in self.running:
            self.running.discard(seq)
        else:
            future = self._waiting.pop(seq, None)
            if future is not None and not future.done():
                future.cancel()
        self.wake()

    def wake(self) -> None:
        """Admit queued sequences while there is room (also after `max_num_seqs` grows at runtime)."""
        while self._waiting and len(self.running) < self._settings.max_num_seqs:
            seq, future = self._waiting.popitem(last=False)
            if future.done():
                continue
            self.running.add(seq)
            future.set_result(None)
        self._stats.running = len(self.running)
        self._stats.waiting = len(self._waiting)

    def kv_usage(self) -> float:
        used = sum(seq.prompt_tokens + seq.generated for seq in self.running)
        return min(1.0, used / self._settings.kv_capacity_tokens)


class PrefixCache:
    """LRU of hashed full prompt blocks, to report vLLM's prefix-cache query and hit counters.

    The block hash chains over the adapter name and every earlier block, as vLLM's does, so a block only
    hits when the whole prefix before it matches too.
    """

    def __init__(self, capacity_tokens: int) -> None:
        self._capacity = max(1, capacity_tokens // PREFIX_BLOCK_TOKENS)
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def lookup(self, model: str, words: list[str]) -> int:
        """Return how many prompt tokens were cached, then cache this prompt's full blocks."""
        chained = hash(model)
        hits = 0
        missed = False
        for start in range(0, len(words) - PREFIX_BLOCK_TOKENS + 1, PREFIX_BLOCK_TOKENS):
            chained = hash((chained, *words[start : start + PREFIX_BLOCK_TOKENS]))
            if not missed and chained in self._blocks:
                hits += PREFIX_BLOCK_TOKENS
                self._blocks.move_to_end(chained)
                continue
            missed = True
            self._blocks[chained] = None
            if len(self._blocks) > self._capacity:
                self._blocks.popitem(last=False)
        return hits


class LoraRegistry:
    """LoRA adapters loaded on the fake, as `name → path`, bounded by `settings.max_loras`."""

    def __init__(self, settings: FakeVLLMSettings) -> None:
        self._settings = settings
        self.adapters: dict[str, str] = dict(parse_lora(spec) for spec in settings.loras)

    def serves(self, model: str) -> bool:
        return model == self._settings.model or model in self.adapters

    def load(self, name: str, path: str) -> str | None:
        """Load an adapter; returns an error message (vLLM's wording) or None on success."""
        if not name or not path:
            return "Both 'lora_name' and 'lora_path' must be provided."
        if name in self.adapters or name == self._settings.model:
            return f"The lora adapter '{name}' has already been loaded."
        if len(self.adapters) >= self._settings.max_loras:
            return (
                f"Cannot load LoRA adapter '{name}': {len(self.adapters)} adapters are loaded "
                f"and max_loras is {self._settings.max_loras}."
            )
        self.adapters[name] = path
        return None

    def unload(self, name: str) -> bool:
        return self.adapters.pop(name, None) is not None
