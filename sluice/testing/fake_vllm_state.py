"""Live state of a fake vLLM server: counters, the FIFO scheduler, the prefill lane, the prefix cache and
loaded adapters.

The scheduler mimics vLLM's: at most `max_num_seqs` sequences run at once and the rest wait, first come
first served. A running sequence holds `prompt + generated` tokens of KV cache, which is what
`vllm:kv_cache_usage_perc` reports against `kv_capacity_tokens`. The prefill lane stands for the engine's
compute: one prefill at a time, in admission order, so long uncached prompts delay each other.
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
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hits: int = 0  # of those, tokens found cached
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
            "prefix_queries": self.prefix_queries,
            "prefix_hits": self.prefix_hits,
            "last_request_headers": dict(self.last_request_headers),
            "last_request_body": self.last_request_body,
        }

    def reset(self) -> None:
        """Zero the counters; `running` and `waiting` describe live requests and stay."""
        self.requests_total = self.completed = self.aborted = self.failed = 0
        self.prefix_queries = self.prefix_hits = 0
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
    scheduled_at: float = 0.0  # admitted by the scheduler
    prefilled_at: float = 0.0  # its prefill finished; the first token follows `ttft` later
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


class PrefillLane:
    """The engine's prefill compute: one prefill at a time, first come first served.

    vLLM runs one engine step at a time and a step's cost grows with the prompt tokens it prefills, so
    prefills queue behind each other whatever `max_num_seqs` allows. Deadlines are absolute: a prefill
    that queued starts when the one before it was due to end, so timer lateness does not pile up along
    the queue. A prefill cancelled half-way (the client left) frees the lane at once.
    """

    def __init__(self) -> None:
        self._lock = asyncio.Lock()  # FIFO: a new caller never overtakes a waiting one
        self._free_at = 0.0

    async def run(self, seconds: float) -> float:
        """Queue for the lane, hold it for `seconds`; returns the loop time the prefill ended."""
        loop = asyncio.get_running_loop()
        arrived = loop.time()
        async with self._lock:
            end = max(arrived, self._free_at) + seconds
            self._free_at = end
            try:
                await asyncio.sleep(max(0.0, end - loop.time()))
            except asyncio.CancelledError:
                self._free_at = loop.time()
                raise
        return end


class PrefixCache:
    """LRU of hashed full prompt blocks, at most `settings.kv_capacity_tokens` worth (read live).

    The block hash chains over the model or adapter name and every earlier block, as vLLM's does, so a
    block only hits when the whole prefix before it matches too, and an adapter never shares the base
    model's blocks. As in vLLM, the last prompt token is always computed, so a block ending there never
    counts as a hit. Unlike vLLM, the cache does not shrink while running sequences hold KV blocks.
    """

    def __init__(self, settings: FakeVLLMSettings) -> None:
        self._settings = settings
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def lookup(self, model: str, words: list[str]) -> int:
        """Return how many prompt tokens were cached, then cache this prompt's full blocks."""
        capacity = max(1, self._settings.kv_capacity_tokens // PREFIX_BLOCK_TOKENS)
        chained = hash(model)
        hits = 0
        missed = False
        for start in range(0, len(words) - PREFIX_BLOCK_TOKENS + 1, PREFIX_BLOCK_TOKENS):
            end = start + PREFIX_BLOCK_TOKENS
            chained = hash((chained, *words[start:end]))
            if not missed and end < len(words) and chained in self._blocks:
                hits += PREFIX_BLOCK_TOKENS
                self._blocks.move_to_end(chained)
                continue
            missed = True
            self._blocks[chained] = None
            self._blocks.move_to_end(chained)
            while len(self._blocks) > capacity:
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
