"""Builds the gateway from its configuration and owns everything it opens.

`Gateway` wires the pipeline (one list, in order), the backends with their connection pools and
monitor, the metrics registry and the listening server, and closes all of them on shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from sluice.admin import AdminKeys
from sluice.admin_backends import AdminBackends
from sluice.admin_cache import AdminCache
from sluice.admin_usage import AdminUsage
from sluice.audit.capture import RecordBuilder
from sluice.audit.writer import AuditWriter
from sluice.cache.embedders import LocalEmbedder, make_embedder
from sluice.cache.service import ResponseCache
from sluice.cache.stores import make_store
from sluice.config import BackendConfig, SluiceConfig
from sluice.console.logouts import Logouts
from sluice.console.pages import ConsolePages
from sluice.console.session import ConsoleSessions
from sluice.console.state import ConsoleState
from sluice.console.traffic import TrafficSampler
from sluice.context import Handler, RequestContext
from sluice.deadlines import Deadlines
from sluice.drains import Drains
from sluice.http.request import HttpRequest
from sluice.http.response import ResponseWriter
from sluice.http.server import HttpServerProtocol, RequestIds, ServerSettings
from sluice.identity.jwt import JwtVerifier
from sluice.identity.keys import KeyStore
from sluice.identity.managed import ManagedKeys
from sluice.identity.revocations import REVOKED_TOPIC, RevocationFeed
from sluice.logs import AccessLog, access_log_enabled
from sluice.metrics import GatewayMetrics
from sluice.metrics_workers import WorkerMetrics
from sluice.openapi import OpenApiDocument
from sluice.pipeline.audit_gate import AuditGate
from sluice.pipeline.auth import AuthStage
from sluice.pipeline.cache import CacheStage
from sluice.pipeline.chain import build_chain
from sluice.pipeline.client_address import ClientAddress
from sluice.pipeline.cors import CorsStage
from sluice.pipeline.dispatch import Dispatcher
from sluice.pipeline.errors import ErrorsStage
from sluice.pipeline.ingress import IngressStage
from sluice.pipeline.limits import LimitsCheck
from sluice.pipeline.media import MediaPolicyCheck
from sluice.pipeline.parse import ParseStage
from sluice.pipeline.rag import RagStage
from sluice.rag.retrieval import Retriever
from sluice.ratelimit import RateLimiter
from sluice.reload import plan_reload, read_config
from sluice.repair import Repair, repair_off
from sluice.routes import PATHS, PREFIXES, LocalRoutes
from sluice.siblings import Siblings, sibling_directory
from sluice.store.database import Database
from sluice.store.migrations import upgrade
from sluice.upstream.adapters import AdapterPlacer
from sluice.upstream.admission import Admission
from sluice.upstream.backends import Backend, Backends
from sluice.upstream.breaker import CircuitBreaker
from sluice.upstream.monitor import BackendMonitor
from sluice.upstream.pool import ConnectionPool
from sluice.upstream.scraper import LoadScraper

log = logging.getLogger("sluice.app")


class Gateway:
    def __init__(
        self, config: SluiceConfig, config_path: Path | None = None, on_reload: Callable[[], None] | None = None
    ) -> None:
        """`config_path` is re-read by `POST /admin/reload`; `on_reload` then tells sibling workers."""
        self.config = config
        self.config_path = config_path
        self._on_reload = on_reload
        self._reloading = asyncio.Lock()
        self.metrics = GatewayMetrics()
        self.openapi = OpenApiDocument()  # built once: GET /openapi.json sends its bytes
        timeouts, limits = config.timeouts, config.limits
        shortest = min(timeouts.model_dump().values())
        self._deadlines = Deadlines(resolution=min(1.0, shortest / 4))
        self.backends = Backends(map(self._new_backend, config.backends), config.adapters.registry)
        self.metrics.watch_backends(self.backends)
        directory = sibling_directory()
        self.siblings = Siblings(directory) if directory is not None else None  # the other workers, if any
        self.worker_metrics = WorkerMetrics(self.metrics, self.siblings) if self.siblings is not None else None
        self.monitor = BackendMonitor(self.backends, config.health)
        self.scraper = LoadScraper(self.backends, config.health.scrape_interval, config.health.timeout)
        self.access_log = AccessLog(config.logging) if access_log_enabled(config.logging) else None
        self.admission = Admission(limits.queue_size, limits.queue_timeout, config.routing.retry_after)
        self.metrics.queue_depth = lambda: self.admission.waiting
        self.placer = AdapterPlacer(
            self.backends, config.adapters, self.metrics.adapter_operations, config.routing.retry_after
        )
        self.limiter = RateLimiter(
            config.redis.url,
            on_failure=config.rate_limits.on_redis_failure,
            timeout=config.redis.timeout,
            key_prefix=config.redis.key_prefix + "rl:",
        )
        self.metrics.rate_limiter = self.limiter
        self.jwt = JwtVerifier(config.auth.jwt) if config.auth.jwt is not None else None
        self.database: Database | None = None
        self._opening_database = asyncio.Lock()
        self.audit = AuditWriter(config.audit, self._open_database) if config.audit.enabled else None
        self.metrics.audit = self.audit
        # The cache and RAG share one in-process embedding model when both run it (each user closes its share).
        self._local_embedder = LocalEmbedder()
        self.cache = self._new_cache(config)
        self.metrics.cache = self.cache
        self.metrics.dependencies = self._dependencies
        self.tracing: Any = None
        if config.tracing.otlp_endpoint is not None:
            from sluice.tracing import Tracing  # OpenTelemetry is loaded only when tracing is on

            self.tracing = Tracing(config.tracing)
        repair = config.repair  # drains reach sibling workers, and other replicas through Redis (sluice/drains.py)
        self.drains = Drains(
            self.backends, config.redis.url, config.redis.key_prefix, repair.sync_interval, self.siblings
        )
        self.repair = Repair(repair, self.drains, self.backends, self.metrics) if repair.enabled else None
        self.traffic = TrafficSampler(self.metrics, self.siblings)  # the console's series; runs while it is on
        redis_config = config.redis  # console logouts reach every worker, and every replica through Redis
        self.logouts = Logouts(redis_config.url, redis_config.key_prefix, redis_config.timeout, self.siblings)
        self.managed: ManagedKeys | None = None  # managed keys, once the database is open (`start`)
        self.revocations: RevocationFeed | None = None
        self.retriever = self._new_retriever(config)
        self._discovered: dict[str, tuple[BackendConfig, ...]] = {}  # per Kubernetes Service (`discovery`)
        self._swap_pending = False
        self._swaps: set[asyncio.Task[None]] = set()
        self.discovery: Any = None
        if config.discovery.kubernetes is not None:
            from sluice.upstream.kubernetes_discovery import KubernetesDiscovery  # extra sluice[kubernetes]

            self.discovery = KubernetesDiscovery(config.discovery.kubernetes, self._discovered_backends)
        self._limits = self._limits_check(config)
        self._chain, self._admin_chain = self._build_chains(config)
        self._settings = ServerSettings(
            max_body_bytes=limits.max_body_bytes,
            max_header_bytes=limits.max_header_bytes,
            header_timeout=timeouts.client_header,
            body_timeout=timeouts.client_body,
            keepalive_timeout=timeouts.client_keepalive,
        )
        self._ids = RequestIds()
        self._connections: set[HttpServerProtocol] = set()
        self.draining = False
        self.port = 0  # the bound port, once started
        self.admin_port = 0  # the admin listener's bound port, when `server.admin_port` is set
        self._server: asyncio.Server | None = None
        self._admin_server: asyncio.Server | None = None

    def _new_cache(self, config: SluiceConfig) -> ResponseCache | None:
        settings = config.cache
        if not settings.enabled:
            return None

        semantic = settings.semantic.enabled and (
            settings.default.semantic or any(model.semantic for model in settings.models.values())
        )
        embedder = make_embedder(settings.embedder, self._local_embedder) if semantic else None
        return ResponseCache(settings, make_store(settings, config.redis), embedder, self.metrics)

    def _new_retriever(self, config: SluiceConfig) -> Retriever | None:
        """RAG routes' retrieval (docs/rag.md), when any are configured at start-up."""
        rag = config.rag
        if not rag.routes:
            return None
        from sluice.rag.chroma import make_chunk_store  # chromadb is an optional dependency (sluice[rag])

        embedder = make_embedder(rag.embedder, self._local_embedder)
        return Retriever(make_chunk_store(rag.chroma, rag.timeout), embedder, rag.timeout)

    def _dependencies(self) -> dict[str, bool]:
        """Which shared services answer now, as the parts that use them last saw (`sluice_dependency_up`)."""
        up: dict[str, bool] = {}
        if self.config.redis.url is not None:
            up["redis"] = not self.limiter.degraded and (self.cache is None or self.cache.store_up)
        if self.audit is not None and self.config.database.url.startswith("postgres"):
            up["postgres"] = self.audit.database_up
        if self.retriever is not None:
            up["chroma"] = self.retriever.chroma_up
        if self.discovery is not None:
            up["kubernetes"] = self.discovery.api_up
        return up

    def _limits_check(self, config: SluiceConfig) -> LimitsCheck:
        lease_ttl = config.timeouts.stream_read + config.timeouts.connect  # a crashed replica's slots come back
        return LimitsCheck(self.limiter, config.rate_limits, lease_ttl, self.metrics)

    def _build_chains(self, config: SluiceConfig) -> tuple[Handler, Handler | None]:
        """The pipeline for `config`'s live sections (built again on every reload): the main listener's, and
        the admin listener's when `server.admin_port` gives the admin routes one of their own."""
        dispatcher = Dispatcher(
            self.backends,
            self.monitor,
            self.metrics,
            config.timeouts,
            config.routing,
            self.admission,
            self.placer,
            config.audit.body_max_bytes if self.audit is not None else 0,
        )
        local = LocalRoutes(
            self.backends,
            self.metrics,
            config.routing.retry_after,
            lambda: self.draining,
            self.reload_from_file,
            self.worker_metrics.render if self.worker_metrics is not None else None,
            {route.model: route.base_model for route in config.rag.routes} if self.retriever is not None else None,
        )
        admin = AdminKeys(self.managed, self._announce_revocation)
        local.handlers.update(admin_keys=admin.collection, admin_key=admin.item)
        usage = AdminUsage(lambda: self.database)
        local.handlers.update(admin_usage=usage.report, usage=usage.own)
        cache_admin = AdminCache(self.cache, self.siblings)
        local.handlers.update(admin_cache=cache_admin.status, admin_cache_purge=cache_admin.purge)
        local.handlers["admin_alerts"] = self.repair.receive if self.repair is not None else repair_off
        local.handlers["openapi"] = self.openapi.serve
        local.handlers["admin_backend"] = AdminBackends(self.backends, self.drains).item
        sessions = self._console_sessions(config)
        pages = ConsolePages(sessions, self.metrics, self.logouts)
        state = ConsoleState(sessions is not None, self.backends, self.traffic, local.aliases, self.siblings)
        local.handlers.update(
            console=pages.shell,
            console_static=pages.static,
            console_login=pages.login,
            console_logout=pages.logout,
            console_state=state.serve,
        )

        def terminal(ctx: RequestContext) -> Awaitable[None]:
            route = ctx.route
            assert route is not None
            return dispatcher(ctx) if route.proxied else local.handlers[route.name](ctx)

        rag: RagStage | None = None
        if self.retriever is not None:
            if config.rag.routes:
                rag = RagStage(config.rag.routes, self.retriever, self.metrics)
            else:
                self.retriever.watch(())
        corpus = rag.corpus_version if rag is not None else lambda _model: ""
        audit = (self.audit, RecordBuilder(self.backends, config.audit.body_max_bytes)) if self.audit else None
        gate = [AuditGate(self.audit, config.routing.retry_after)] if self.audit is not None else []
        tracing: list[Any] = []
        if self.tracing is not None:
            from sluice.tracing import TracingStage

            tracing.append(TracingStage(self.tracing))
        cors = config.cors if config.cors.allow_origins else None
        media = [MediaPolicyCheck(config.media)] if config.media.remote_urls != "allow" else []

        def chain(ingress: IngressStage) -> Handler:
            return build_chain(
                [
                    *tracing,
                    ErrorsStage(self.metrics, self.backends, self.access_log, self._limits.finish, audit),
                    ClientAddress(config.rate_limits.trusted_proxies),  # before anything can answer
                    *([CorsStage(cors, ingress.route_for)] if cors is not None else []),  # marks 404s too
                    ingress,
                    *gate,
                    AuthStage(
                        config.auth,
                        self.metrics,
                        self.managed,
                        self.jwt,
                        sessions,
                        self.logouts,
                        console_only=ingress.admin is True,  # the admin listener: the playground's calls only
                    ),
                    ParseStage(),
                    self._limits,
                    *media,  # after the limits: the host lookups it may make are paid for like requests
                    *([CacheStage(self.cache, self.metrics, corpus)] if self.cache is not None else []),
                    *([rag] if rag is not None else []),
                ],
                terminal,
            )

        if config.server.admin_port is None:
            return chain(IngressStage(PATHS, PREFIXES)), None
        return chain(IngressStage(PATHS, PREFIXES, admin=False)), chain(IngressStage(PATHS, PREFIXES, admin=True))

    @staticmethod
    def _console_sessions(config: SluiceConfig) -> ConsoleSessions | None:
        """The console's sessions, signed with the admin key (a new key ends them); None while it is off."""
        if not config.console.enabled or not config.auth.admin_key:
            return None
        return ConsoleSessions(config.auth.admin_key, config.console.session_ttl)

    async def _follow_console(self, config: SluiceConfig) -> None:
        """Run the console's traffic sampler exactly while the console is on (an admin key may come or go)."""
        if self._console_sessions(config) is not None:
            await self.traffic.start()
        elif self.traffic.running:
            await self.traffic.close()

    async def reload(self, new: SluiceConfig) -> dict[str, object]:
        """Apply a new configuration's live sections without dropping a connection (see sluice/reload.py).

        New and changed backends are probed before they take traffic; requests in flight finish on the
        backends they started on.
        """
        async with self._reloading:
            plan = plan_reload(self.config, new)
            previous, self.config = self.config, plan.config
            config = plan.config
            if config.auth.jwt != previous.auth.jwt:
                await self._replace_jwt(config)
            await self._swap_backends()
            retry_after = (("retry-after", str(config.routing.retry_after)),)
            self.admission.retry_after = self.placer.retry_after = retry_after
            self.placer.load_timeout = config.adapters.load_timeout
            self._limits = self._limits_check(config)
            self._chain, self._admin_chain = self._build_chains(config)
            await self._follow_console(config)
            summary = plan.summary()
            log.info("configuration reloaded", extra=summary)
            if plan.restart_required:
                log.warning("reload: restart needed to apply", extra={"sections": list(plan.restart_required)})
            return summary

    async def _swap_backends(self) -> None:
        """Make the live backends what the configuration and discovery list (callers hold `_reloading`).

        An unchanged backend keeps its connections, health, load and circuits; a new or changed one is
        health-checked before it takes traffic; a removed or replaced one finishes what it has in flight.
        """
        wanted = self._wanted_backends()
        current = self.backends.by_name
        fresh = [self._new_backend(b) for b in wanted if b.name not in current or current[b.name].config != b]
        await asyncio.gather(*(self.monitor.check(b, discover=True) for b in fresh))
        made = {b.name: b for b in fresh}
        names = {b.name for b in wanted}
        retired = [b for b in current.values() if b.name not in names or b.name in made]
        self.backends.replace((made.get(b.name) or current[b.name] for b in wanted), self.config.adapters.registry)
        self.drains.apply()  # replaced backends start undrained
        for backend in fresh:
            self._deadlines.add(backend.pool)
        for backend in retired:
            self._deadlines.discard(backend.pool)
            backend.pool.close()  # idle connections now; busy ones when their exchange ends

    def _wanted_backends(self) -> list[BackendConfig]:
        """Configured backends, then discovered ones; a configured name wins over a discovered pod's."""
        wanted = list(self.config.backends)
        taken = {b.name for b in wanted}
        for service in sorted(self._discovered):
            for backend in self._discovered[service]:
                if backend.name in taken:
                    log.warning("discovered backend skipped: name taken", extra={"backend": backend.name})
                    continue
                taken.add(backend.name)
                wanted.append(backend)
        return wanted

    def _discovered_backends(self, service: str, backends: tuple[BackendConfig, ...]) -> None:
        """Discovery's news about one Service: swap the backends soon (one swap for a burst of changes)."""
        if self._discovered.get(service) == backends:
            return
        self._discovered[service] = backends
        log.info("kubernetes discovery", extra={"service": service, "backends": [b.name for b in backends]})
        if not self._swap_pending:
            self._swap_pending = True
            task = asyncio.create_task(self._apply_discovered(), name="discovery-swap")
            self._swaps.add(task)
            task.add_done_callback(self._swaps.discard)

    async def _apply_discovered(self) -> None:
        async with self._reloading:
            self._swap_pending = False  # news from here on needs another swap
            await self._swap_backends()

    async def _replace_jwt(self, config: SluiceConfig) -> None:
        retired, self.jwt = self.jwt, JwtVerifier(config.auth.jwt) if config.auth.jwt is not None else None
        if self.jwt is not None:
            await self.jwt.start()
        if retired is not None:
            await retired.close()

    async def reload_from_file(self) -> dict[str, object]:
        """Re-read `config_path` and apply it here, then tell sibling workers (`POST /admin/reload`, SIGHUP)."""
        summary = await self.reload(read_config(self.config_path))
        if self._on_reload is not None:
            self._on_reload()
        return {**summary, "pid": os.getpid()}

    def _new_backend(self, backend: BackendConfig) -> Backend:
        timeouts, limits = self.config.timeouts, self.config.limits
        pool = ConnectionPool(
            backend.host,
            backend.port,
            connect_timeout=timeouts.connect,
            idle_timeout=timeouts.upstream_keepalive,
            max_idle=limits.max_idle_upstream_connections,
            deadlines=self._deadlines,
        )
        made = Backend(backend, pool)
        if self.config.breaker.enabled:
            settings, changed = self.config.breaker, self._circuit_changed
            made.breaker = CircuitBreaker(made.name, settings, time.monotonic, changed)
            made.new_model_breaker = lambda model: CircuitBreaker(made.name, settings, time.monotonic, changed, model)
        return made

    def _circuit_changed(self, breaker: CircuitBreaker) -> None:
        self.backends.circuit_changed()
        self.metrics.circuit_transitions.child(breaker.name, breaker.model, breaker.state.name.lower()).inc()

    def handle(self, request: HttpRequest, writer: ResponseWriter) -> Awaitable[None]:
        return self._chain(RequestContext(request, writer, time.perf_counter()))

    def handle_admin(self, request: HttpRequest, writer: ResponseWriter) -> Awaitable[None]:
        """A request on the admin listener (`server.admin_port`), which serves the admin routes only."""
        assert self._admin_chain is not None
        return self._admin_chain(RequestContext(request, writer, time.perf_counter()))

    async def start(self, sock: socket.socket | None = None, reuse_port: bool = False) -> None:
        """Probe the backends once, then listen (on `sock` if given, else on server.host:port)."""
        await self.monitor.start()
        if self.discovery is not None:
            await self.discovery.start()  # its first lists are being swapped in (health-checked) meanwhile
            await asyncio.gather(*self._swaps)
        await self.scraper.start()
        await self.placer.start()
        await self.limiter.start()
        if self.jwt is not None:
            await self.jwt.start()
        await self._open_key_store()
        if self.audit is not None:
            await self.audit.start()
        if self.cache is not None:
            await self.cache.start()
        if self.siblings is not None:
            await self.siblings.start()
        await self.drains.start()
        await self.logouts.start()
        await self._follow_console(self.config)
        if self.retriever is not None:
            await self.retriever.start()
        self._chain, self._admin_chain = self._build_chains(self.config)
        for backend in self.backends.all:
            self._deadlines.add(backend.pool)  # idle keep-alive connections are closed when they expire
        loop = asyncio.get_running_loop()

        def protocol() -> HttpServerProtocol:
            return HttpServerProtocol(self.handle, self._settings, self._ids, self._deadlines, self._connections)

        server_config = self.config.server
        if sock is not None:
            self._server = await loop.create_server(protocol, sock=sock, backlog=server_config.backlog)
        else:
            self._server = await loop.create_server(
                protocol,
                server_config.host,
                server_config.port,
                backlog=server_config.backlog,
                reuse_port=reuse_port or None,
            )
        self.port = int(self._server.sockets[0].getsockname()[1])
        if server_config.admin_port is not None:  # every worker listens here too, sharing it like the main port

            def admin_protocol() -> HttpServerProtocol:
                settings, ids, deadlines = self._settings, self._ids, self._deadlines
                return HttpServerProtocol(self.handle_admin, settings, ids, deadlines, self._connections)

            self._admin_server = await loop.create_server(
                admin_protocol,
                server_config.admin_host,
                server_config.admin_port,
                backlog=server_config.backlog,
                reuse_port=reuse_port or None,
            )
            self.admin_port = int(self._admin_server.sockets[0].getsockname()[1])

    async def _open_key_store(self) -> None:
        """Managed keys need `auth.key_secret`: open the database (applying migrations) and the feed."""
        secret = self.config.auth.key_secret
        if secret is None:
            return
        self.database = await self._open_database()
        managed = self.managed = ManagedKeys(KeyStore(self.database, secret.encode()), self.config.auth.key_cache_ttl)
        if self.siblings is not None:
            self.siblings.answers[REVOKED_TOPIC] = lambda key_id: _evicted(managed, key_id)
        if self.config.redis.url is not None:
            self.revocations = RevocationFeed(self.config.redis.url, self.managed.evict)
            await self.revocations.start()

    async def _announce_revocation(self, key_id: str) -> None:
        """A revoked or rotated key leaves every worker's key cache at once, and every replica's through Redis."""
        if self.siblings is not None:
            await self.siblings.ask(REVOKED_TOPIC, key_id)
        if self.revocations is not None:
            await self.revocations.publish(key_id)

    async def _open_database(self) -> Database:
        """`database.url`, connected and migrated, once (managed keys and the audit log share it)."""
        async with self._opening_database:
            if self.database is None:
                database = await Database.connect(self.config.database)
                try:
                    await upgrade(database)
                except BaseException:
                    await database.close()
                    raise
                self.database = database
            return self.database

    @property
    def url(self) -> str:
        return f"http://{self.config.server.host}:{self.port}"

    @property
    def admin_url(self) -> str:
        """Where the admin API answers: the admin listener when there is one, else the main one."""
        if self._admin_server is None:
            return self.url
        return f"http://{self.config.server.admin_host}:{self.admin_port}"

    async def drain(self, timeout: float | None = None) -> bool:
        """Stop accepting, let requests in flight finish (up to `timeout`), close idle connections.

        `/ready` answers 503 from the start, so a load balancer stops sending; True when everything in
        flight finished in time.
        """
        self.draining = True
        for server in (self._server, self._admin_server):
            if server is not None:
                server.close()
        serving = [task for conn in list(self._connections) if (task := conn.drain()) is not None]
        if not serving:
            return True
        _, pending = await asyncio.wait(
            serving, timeout=self.config.server.drain_timeout if timeout is None else timeout
        )
        return not pending

    async def close(self) -> None:
        for server in (self._server, self._admin_server):
            if server is not None:
                server.close()
        self._deadlines.close()
        if self.access_log is not None:
            self.access_log.flush()
        if self.discovery is not None:
            await self.discovery.close()
        for task in list(self._swaps):
            task.cancel()
        await asyncio.gather(*self._swaps, return_exceptions=True)
        await self.monitor.close()
        await self.scraper.close()
        await self.placer.close()
        await self._limits.close()
        await self.limiter.close()
        if self.jwt is not None:
            await self.jwt.close()
        if self.revocations is not None:
            await self.revocations.close()
        if self.siblings is not None:
            await self.siblings.close()
        await self.drains.close()
        await self.traffic.close()
        await self.logouts.close()
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.close)  # flushes the spans still queued
        if self.cache is not None:
            await self.cache.close()
        if self.retriever is not None:
            await self.retriever.close()
        await self._local_embedder.close()  # the gateway's own share: the thread stops once no user is left
        if self.audit is not None:
            await self.audit.close()
        if self.database is not None:
            await self.database.close()
        for backend in self.backends.all:
            backend.pool.close()
        for server in (self._server, self._admin_server):
            if server is not None:
                await server.wait_closed()


def _evicted(managed: ManagedKeys, key_id: str) -> bytes:
    """A sibling worker's revocation: forget the key here too."""
    managed.evict(key_id)
    return b"ok"
