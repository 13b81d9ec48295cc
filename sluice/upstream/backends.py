"""The backends the gateway knows: their health, the models they serve and their in-flight load.

`Backends` keeps an index from model name (base model or LoRA adapter) to the backends that serve it,
rebuilt only when discovery or health changes something, so routing a request is one dict lookup.
Adapters of the registry (`adapters.registry`) are known models even while no backend has them loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from sluice.config import AdapterConfig, BackendConfig
from sluice.upstream.breaker import CircuitBreaker
from sluice.upstream.pool import ConnectionPool


class Backend:
    __slots__ = (
        "adapters_in_use",
        "adapters_used_at",
        "auth_header",
        "breaker",
        "config",
        "drained_by",
        "failures",
        "healthy",
        "host_header",
        "in_flight",
        "last_error",
        "max_concurrency",
        "model_breakers",
        "model_cards",
        "models",
        "name",
        "new_model_breaker",
        "pool",
        "reported_kv_usage",
        "reported_max_loras",
        "reported_running",
        "reported_waiting",
        "scraped_at",
        "stale_after",
        "weight",
    )

    def __init__(self, config: BackendConfig, pool: ConnectionPool) -> None:
        self.config = config
        self.name = config.name
        self.weight = config.weight
        self.max_concurrency = config.max_concurrency
        self.pool = pool
        self.breaker: CircuitBreaker | None = None  # counts failures of the backend itself (transport)
        self.model_breakers: dict[str, CircuitBreaker] = {}  # count error answers, per model (one adapter)
        self.new_model_breaker: Callable[[str], CircuitBreaker] | None = None
        self.healthy = False
        self.drained_by: frozenset[str] = frozenset()  # alerts that drained it (sluice/repair.py): no new requests
        self.in_flight = 0
        self.failures = 0
        self.last_error = ""
        self.models: frozenset[str] = frozenset(config.models)
        self.model_cards: dict[str, dict[str, Any]] = {}
        # What the engine itself reports on /metrics (see upstream/scraper.py); stale after `stale_after`.
        self.reported_running = 0.0
        self.reported_waiting = 0.0
        self.reported_kv_usage = 0.0
        self.reported_max_loras: int | None = None  # vllm:lora_requests_info{max_lora=...}
        self.scraped_at = 0.0
        self.stale_after = 0.0
        # Registered adapters (see upstream/adapters.py) sent here: requests in flight and last use.
        self.adapters_in_use: dict[str, int] = {}
        self.adapters_used_at: dict[str, float] = {}
        self.host_header = f"host: {config.host}:{config.port}\r\n".encode()
        self.auth_header = f"authorization: Bearer {config.api_key}\r\n".encode() if config.api_key else b""

    def load(self, now: float) -> float:
        """Outstanding work: our in-flight count, or the engine's running + waiting when it reports more.

        The engine's view includes requests from other gateway replicas; ours is exact but local. A stale
        or missing scrape leaves just our own count.
        """
        if now < self.stale_after:
            reported = self.reported_running + self.reported_waiting
            if reported > self.in_flight:
                return reported
        return self.in_flight

    def model_breaker(self, model: str) -> CircuitBreaker | None:
        """The circuit of `model` on this backend, made on first use (None with breakers disabled)."""
        breaker = self.model_breakers.get(model)
        if breaker is None and self.new_model_breaker is not None:
            breaker = self.model_breakers[model] = self.new_model_breaker(model)
        return breaker

    def available_for(self, model: str) -> bool:
        """Whether both the backend's circuit and the model's circuit on it let a request through now."""
        if self.breaker is not None and not self.breaker.available():
            return False
        breaker = self.model_breakers.get(model)
        return breaker is None or breaker.available()

    @property
    def max_loras(self) -> int | None:
        """How many adapters may be resident: the configured `max_loras`, else what the engine reports."""
        return self.config.max_loras or self.reported_max_loras

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "url": self.config.url,
            "healthy": self.healthy,
            "drained_by": sorted(self.drained_by),
            "models": sorted(self.models),
            "in_flight": self.in_flight,
            "circuit": self.breaker.state.name.lower() if self.breaker else "disabled",
            "model_circuits": {m: b.state.name.lower() for m, b in sorted(self.model_breakers.items()) if b.state},
            "last_error": self.last_error,
        }


class Backends:
    def __init__(self, backends: Iterable[Backend], registry: Iterable[AdapterConfig] = ()) -> None:
        self.all: tuple[Backend, ...] = tuple(backends)
        self.registry = {adapter.name: adapter for adapter in registry}
        self.by_name = {b.name: b for b in self.all}
        self._serving: dict[str, tuple[Backend, ...]] = {}
        self._known: frozenset[str] = frozenset()
        self.circuits_not_closed = 0  # kept by `circuit_changed`; 0 lets routing skip the breakers
        self.rebuild()

    def replace(self, backends: Iterable[Backend], registry: Iterable[AdapterConfig]) -> None:
        """Swap in another set of backends (a configuration reload); everything holding this index sees it."""
        self.all = tuple(backends)
        self.by_name = {b.name: b for b in self.all}
        self.registry = {adapter.name: adapter for adapter in registry}
        self.rebuild()
        self.circuit_changed()

    def circuit_changed(self) -> None:
        self.circuits_not_closed = sum(
            1
            for b in self.all
            for breaker in (b.breaker, *b.model_breakers.values())
            if breaker is not None and breaker.state
        )

    def rebuild(self) -> None:
        serving: dict[str, list[Backend]] = {}
        for backend in self.all:
            if backend.healthy and not backend.drained_by:
                for model in backend.models:
                    serving.setdefault(model, []).append(backend)
        self._serving = {model: tuple(bs) for model, bs in serving.items()}
        self._known = frozenset(m for b in self.all for m in b.models) | frozenset(self.registry)

    def serving(self, model: str) -> tuple[Backend, ...]:
        """Healthy backends that serve `model` (empty when none)."""
        return self._serving.get(model, ())

    def knows(self, model: str) -> bool:
        """Whether any backend, healthy or not, has ever listed `model`, or it is a registered adapter."""
        return model in self._known

    def healthy_count(self, model: str) -> int:
        """How many healthy backends can answer `model` now (a registered adapter: wherever its base runs)."""
        serving = self._serving.get(model)
        if serving is None and model in self.registry:
            serving = self._serving.get(self.registry[model].base_model)
        return len(serving or ())

    @property
    def known(self) -> frozenset[str]:
        return self._known

    @property
    def any_healthy(self) -> bool:
        return any(b.healthy for b in self.all)

    def healthy_models(self) -> list[dict[str, Any]]:
        """The OpenAI model cards of every model a healthy backend serves, first card per id."""
        cards: dict[str, dict[str, Any]] = {}
        for backend in self.all:
            if not backend.healthy:
                continue
            for model in sorted(backend.models):
                if model not in cards:
                    cards[model] = backend.model_cards.get(model) or {
                        "id": model, "object": "model", "created": 0, "owned_by": "sluice",
                    }
        for name, adapter in self.registry.items():  # loadable on demand wherever its base model runs
            if name not in cards and adapter.base_model in self._serving:
                cards[name] = {
                    "id": name, "object": "model", "created": 0, "owned_by": "sluice",
                    "root": name, "parent": adapter.base_model,
                }
        return list(cards.values())
