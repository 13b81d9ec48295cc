"""Reads the load each vLLM backend reports on its `/metrics`, for balancing and for our own metrics.

Every `health.scrape_interval` seconds each healthy backend's Prometheus page is fetched and four gauges
are picked out: `vllm:num_requests_running`, `vllm:num_requests_waiting` and `vllm:kv_cache_usage_perc`
(or the older `vllm:gpu_cache_usage_perc`), plus the engine's `--max-loras` (for adapter placement) from
`vllm:lora_requests_info`. The page is large (every histogram of the engine), so it is scanned with one
regular expression rather than parsed whole by prometheus-client's parser, which would hold the event
loop for milliseconds per scrape. Values are summed over the engine's label sets (one per
model name and engine index). A scrape older than three intervals is stale and ignored by the balancer.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time

import aiohttp

from sluice.upstream.backends import Backend, Backends

log = logging.getLogger("sluice.scraper")
GAUGE_LINE = re.compile(
    rb"^vllm:(num_requests_running|num_requests_waiting|kv_cache_usage_perc|gpu_cache_usage_perc)"
    rb"(?:\{[^}]*\})? ([0-9.eE+-]+|NaN)\s*$",
    re.MULTILINE,
)
MAX_LORA = re.compile(rb'vllm:lora_requests_info\{[^}]*\bmax_lora="([0-9]+)"')


def parse_max_loras(page: bytes) -> int | None:
    """The engine's `--max-loras` from `vllm:lora_requests_info` (absent without `--enable-lora`)."""
    start = page.find(b"\nvllm:lora_requests_info{")
    match = MAX_LORA.match(page, start + 1) if start >= 0 else None
    return int(match.group(1)) if match else None


def parse_load(page: bytes) -> tuple[float, float, float] | None:
    """(running, waiting, kv_cache_usage) from a vLLM metrics page, or None if it has none of them."""
    totals = {b"num_requests_running": 0.0, b"num_requests_waiting": 0.0}
    kv: list[float] = []
    found = False
    for match in GAUGE_LINE.finditer(page):
        name, raw = match.group(1), match.group(2)
        try:
            value = float(raw)
        except ValueError:
            continue
        if value != value:  # NaN
            continue
        found = True
        if name in totals:
            totals[name] += value
        else:
            kv.append(value)
    if not found:
        return None
    return totals[b"num_requests_running"], totals[b"num_requests_waiting"], max(kv, default=0.0)


class LoadScraper:
    def __init__(self, backends: Backends, interval: float, timeout: float) -> None:
        self._backends = backends
        self._interval = interval
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._timeout), connector=aiohttp.TCPConnector(limit=16)
        )
        await self.scrape_all()
        self._task = asyncio.create_task(self._run(), name="load-scraper")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.scrape_all()

    async def scrape_all(self) -> None:
        await asyncio.gather(*(self.scrape(b) for b in self._backends.all if b.healthy))

    async def scrape(self, backend: Backend) -> None:
        assert self._session is not None
        try:
            async with self._session.get(backend.config.url + "/metrics") as response:
                if response.status != 200:
                    return
                page = await response.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.debug("metrics scrape failed", extra={"backend": backend.name, "error": str(exc)})
            return
        load = parse_load(page)
        if load is None:
            return
        backend.reported_running, backend.reported_waiting, backend.reported_kv_usage = load
        backend.reported_max_loras = parse_max_loras(page)
        backend.scraped_at = time.monotonic()
        backend.stale_after = backend.scraped_at + 3 * self._interval
