"""Configuration as frozen, strictly validated data (unknown keys are rejected).

The models here describe every key of the YAML file; `docs/configuration.md` documents each one.
Loading, `${ENV}` substitution and error messages that name the key and line live in `config_loader`.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PositiveSeconds = Annotated[float, Field(gt=0)]
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=256)
    backlog: int = Field(2048, ge=16)
    drain_timeout: PositiveSeconds = 30.0
    admin_host: str = "127.0.0.1"  # the admin listener's address, when admin_port is set
    admin_port: int | None = Field(None, ge=0, le=65535)  # None: /admin/* is served on `port` with the API

    @model_validator(mode="after")
    def _admin_port_differs(self) -> ServerConfig:
        if self.admin_port and self.admin_port == self.port:
            raise ValueError("admin_port must differ from port (the admin API gets a listener of its own)")
        return self


class BackendConfig(Section):
    name: str = Field(pattern=NAME_PATTERN)
    url: str
    weight: float = Field(1.0, gt=0, le=1000)
    api_key: str | None = None
    models: tuple[str, ...] = ()
    max_concurrency: int | None = Field(None, ge=1)
    max_loras: int | None = Field(None, ge=1)

    @field_validator("url")
    @classmethod
    def _plain_http_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError("must be an http:// URL with a host, such as http://127.0.0.1:8000")
        if parts.path.rstrip("/") or parts.query or parts.fragment:
            raise ValueError("must not have a path, query or fragment (the gateway adds /v1/...)")
        return url.rstrip("/")

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or 80


DNS_LABEL = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"


class KubernetesPoolConfig(Section):
    """The ready pods of one Service become backends; the other keys are what each of them gets."""

    service: str = Field(pattern=DNS_LABEL)  # its EndpointSlices carry kubernetes.io/service-name=<service>
    port: str | int = "http"  # the Service port's name, or its number
    weight: float = Field(1.0, gt=0, le=1000)
    api_key: str | None = None
    models: tuple[str, ...] = ()
    max_concurrency: int | None = Field(None, ge=1)
    max_loras: int | None = Field(None, ge=1)


class KubernetesDiscoveryConfig(Section):
    namespace: str | None = Field(None, pattern=DNS_LABEL)  # None: the gateway pod's own namespace
    kubeconfig: str | None = None  # None: the pod's service account (in-cluster)
    watch_timeout: PositiveSeconds = 300.0  # a watch is renewed after this long (from where it left off)
    retry: PositiveSeconds = 5.0  # first pause after the API failed; doubles up to 60 s
    pools: tuple[KubernetesPoolConfig, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_services(self) -> KubernetesDiscoveryConfig:
        services = [pool.service for pool in self.pools]
        if len(set(services)) != len(services):
            raise ValueError("discovery.kubernetes.pools: each service may appear once")
        return self


class DiscoveryConfig(Section):
    kubernetes: KubernetesDiscoveryConfig | None = None


class KeyLimitsConfig(Section):
    """Limits of one caller (an API key or a JWT subject); None means unlimited."""

    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)
    max_concurrency: int | None = Field(None, ge=1)


class ApiKeyConfig(KeyLimitsConfig):
    name: str = Field(pattern=NAME_PATTERN)
    key: str = Field(min_length=8)
    models: tuple[str, ...] | None = None
    tenant: str | None = None
    log_bodies: bool = False  # store this key's prompts and responses in the audit log (audit.body_max_bytes)
    cache: bool = True  # answers for this key may come from and go to the response cache


JwtAlgorithm = Literal["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"]


class JwtConfig(Section):
    """OAuth2 / OIDC bearer tokens, checked against the provider's public keys (never HS*: no shared secret)."""

    issuer: str = Field(min_length=1)
    audience: tuple[str, ...] = Field(min_length=1)
    jwks_url: str | None = None
    jwks_file: str | None = None
    algorithms: tuple[JwtAlgorithm, ...] = Field(("RS256", "ES256"), min_length=1)
    leeway: float = Field(30.0, ge=0, le=300)
    jwks_cache_ttl: PositiveSeconds = 300.0
    jwks_refresh_interval: PositiveSeconds = 30.0  # at most one refetch this often for an unknown `kid`
    tenant_claim: str = "tenant"
    user_claim: str = "sub"
    scopes_claim: str = "scope"
    required_scope: str | None = None
    models_claim: str | None = None  # a claim listing the models the token may use
    limits: KeyLimitsConfig = KeyLimitsConfig()  # per subject (`user_claim`)

    @field_validator("audience", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return (value,) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_key_source(self) -> JwtConfig:
        if (self.jwks_url is None) == (self.jwks_file is None):
            raise ValueError("set exactly one of jwks_url and jwks_file")
        return self


class AuthConfig(Section):
    api_keys: tuple[ApiKeyConfig, ...] = ()
    admin_key: str | None = Field(None, min_length=16)
    key_secret: str | None = Field(None, min_length=32)  # HMAC secret for managed keys
    key_cache_ttl: PositiveSeconds = 5.0
    jwt: JwtConfig | None = None

    @field_validator("admin_key", "key_secret", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value  # so `${SLUICE_ADMIN_KEY:-}` turns the admin API off

    @model_validator(mode="after")
    def _unique(self) -> AuthConfig:
        names = [k.name for k in self.api_keys]
        if len(set(names)) != len(names):
            raise ValueError("api_keys names must be unique")
        keys = [k.key for k in self.api_keys]
        if len(set(keys)) != len(keys):
            raise ValueError("two api_keys entries have the same key")
        if self.admin_key is not None and self.admin_key in keys:
            raise ValueError("admin_key must differ from every API key")
        return self


class TimeoutsConfig(Section):
    connect: PositiveSeconds = 10.0
    read: PositiveSeconds = 300.0
    stream_read: PositiveSeconds = 600.0
    client_header: PositiveSeconds = 60.0
    client_body: PositiveSeconds = 60.0
    client_keepalive: PositiveSeconds = 75.0
    upstream_keepalive: PositiveSeconds = 4.0


class LimitsConfig(Section):
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_header_bytes: int = Field(32 * 1024, ge=1024)
    max_idle_upstream_connections: int = Field(512, ge=0)
    queue_size: int = Field(1024, ge=0)
    queue_timeout: PositiveSeconds = 10.0


class HealthConfig(Section):
    interval: PositiveSeconds = 5.0
    timeout: PositiveSeconds = 2.0
    discovery_interval: PositiveSeconds = 30.0
    scrape_interval: PositiveSeconds = 1.0


class RoutingConfig(Section):
    strategy: Literal["least_loaded", "round_robin", "affinity"] = "least_loaded"
    affinity_header: str = Field("x-session-id", pattern=r"^[A-Za-z0-9-]+$")
    affinity_prefix_chars: int = Field(1024, ge=16, le=1_000_000)
    retries: int = Field(1, ge=0, le=5)
    retry_after: int = Field(5, ge=1, le=3600)
    fallbacks: dict[str, tuple[str, ...]] = Field(default_factory=dict)

    @field_validator("fallbacks")
    @classmethod
    def _no_self_fallback(cls, fallbacks: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        for model, chain in fallbacks.items():
            if model in chain:
                raise ValueError(f"model {model!r} lists itself as its own fallback")
        return fallbacks


class BreakerConfig(Section):
    enabled: bool = True
    failure_threshold: int = Field(5, ge=1)
    recovery_timeout: PositiveSeconds = 30.0
    half_open_max_tries: int = Field(3, ge=1)
    failure_rate: float = Field(0.5, gt=0, le=1)
    window: PositiveSeconds = 30.0
    min_requests: int = Field(20, ge=1)


class AdapterConfig(Section):
    name: str = Field(pattern=NAME_PATTERN)
    path: str = Field(min_length=1)
    base_model: str = Field(min_length=1)


class AdaptersConfig(Section):
    load_timeout: PositiveSeconds = 60.0
    registry: tuple[AdapterConfig, ...] = ()

    @model_validator(mode="after")
    def _unique(self) -> AdaptersConfig:
        names = [a.name for a in self.registry]
        if len(set(names)) != len(names):
            raise ValueError("adapters.registry names must be unique")
        clash = {a.name for a in self.registry} & {a.base_model for a in self.registry}
        if clash:
            raise ValueError(f"{sorted(clash)[0]!r} is both an adapter and a base model")
        return self


class DatabaseConfig(Section):
    url: str = "sqlite:///data/sluice/sluice.db"
    pool_size: int = Field(10, ge=1, le=200)
    connect_timeout: PositiveSeconds = 5.0

    @field_validator("url")
    @classmethod
    def _supported(cls, url: str) -> str:
        if not url.startswith(("postgresql://", "postgres://", "sqlite:///")):
            raise ValueError("must be postgresql://user@host:port/db or sqlite:///path/to/file.db")
        return url


class RedisConfig(Section):
    url: str | None = None  # None: state in process (one replica only)
    timeout: PositiveSeconds = 0.25
    key_prefix: str = Field("sluice:", max_length=64)  # lets several deployments share one Redis

    @field_validator("url")
    @classmethod
    def _redis_url(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be redis://host:port/db, rediss://… or unix:///path")
        return url


class RateConfig(Section):
    rate: float = Field(gt=0)  # requests per second
    burst: int = Field(ge=1)


class IpLimitsConfig(Section):
    requests: RateConfig | None = None  # non-streaming requests
    stream_requests: RateConfig | None = None


class RateLimitsConfig(Section):
    on_redis_failure: Literal["fail_open", "fail_closed"] = "fail_open"
    trusted_proxies: tuple[str, ...] = ("127.0.0.1/32", "::1/128")
    per_ip: IpLimitsConfig = IpLimitsConfig()
    per_key: KeyLimitsConfig = KeyLimitsConfig()  # defaults for keys that set none of their own
    default_max_tokens: int = Field(1024, ge=1)  # reserved when a request sets no max_tokens

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, proxies: tuple[str, ...]) -> tuple[str, ...]:
        for proxy in proxies:
            ipaddress.ip_network(proxy, strict=False)  # ValueError names the bad entry
        return proxies


class AuditConfig(Section):
    """The audit and usage log (sluice/audit/): a row per request in `database.url`, never on the request path."""

    enabled: bool = True
    batch_size: int = Field(500, ge=1, le=10_000)  # rows per insert
    flush_interval: PositiveSeconds = 0.2  # at most this long between a request's end and its insert
    queue_size: int = Field(20_000, ge=100)  # records waiting in memory for the writer
    write_timeout: PositiveSeconds = 5.0  # an insert slower than this counts as a database outage
    retry_interval: PositiveSeconds = 2.0  # how often an unreachable database is tried again
    journal_dir: str = "data/sluice/audit-journal"  # where records wait on disk while the database is away
    journal_max_bytes: int = Field(1024**3, ge=1024 * 1024)
    on_full: Literal["reject", "drop"] = "reject"  # queue and journal both full: 503 new requests, or drop
    retention_days: int = Field(30, ge=0)  # 0: keep every day
    partitions_ahead: int = Field(3, ge=1, le=60)  # daily partitions created in advance (PostgreSQL)
    body_max_bytes: int = Field(16 * 1024, ge=0)  # cap on stored prompt and response, for keys that log bodies


LOCAL_EMBEDDING_MODELS = frozenset({"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"})


LOCAL_EMBEDDER_TOKENS = 254  # all-MiniLM-L6-v2: 256 word pieces with its start and end markers


class EmbedderConfig(Section):
    """What turns text into vectors for the semantic cache (sluice/cache/embedders.py)."""

    kind: Literal["local", "openai"] = "local"  # local: all-MiniLM-L6-v2 in process; openai: a /v1/embeddings server
    model: str = "all-MiniLM-L6-v2"  # the model name (sent to the server for kind: openai)
    url: str | None = None  # kind openai: base URL, e.g. http://127.0.0.1:8001 (a vLLM serving BAAI/bge-m3)
    api_key: str | None = None  # kind openai: the server's key, from the environment ("${EMBEDDER_KEY}")
    timeout: PositiveSeconds = 2.0  # an embedding slower than this skips the semantic level for the request
    max_batch: int = Field(64, ge=1, le=2048)  # texts per embedding call (concurrent requests are batched)

    @model_validator(mode="after")
    def _usable(self) -> EmbedderConfig:
        if self.kind == "openai" and not self.url:
            raise ValueError("url is required when kind is openai")
        if self.kind == "local" and self.model not in LOCAL_EMBEDDING_MODELS:
            raise ValueError(f"kind local runs only all-MiniLM-L6-v2 (bundled), not {self.model!r}; use kind openai")
        return self


class SemanticCacheConfig(Section):
    enabled: bool = True
    threshold: float = Field(0.98, gt=0, le=1)  # cosine similarity of the last user messages (make cache-eval)
    guard: bool = True  # also require the same numbers, negations and names (sluice/cache/guard.py)


class CacheModelConfig(Section):
    """Caching for one model (or the default for every model)."""

    enabled: bool = True
    max_temperature: float = Field(0.0, ge=0)  # requests sampling hotter than this are not cached
    semantic: bool = True  # the semantic level for this model (the exact level always applies)


class CacheConfig(Section):
    """The response cache (sluice/cache/, docs/cache.md)."""

    enabled: bool = False
    store: Literal["auto", "memory", "redis"] = "auto"  # auto: Redis when redis.url is set, else in process
    ttl: PositiveSeconds = 3600.0  # seconds an answer stays servable after it was stored
    max_entries: int = Field(10_000, ge=1)  # least recently used entries are evicted past this
    max_entry_bytes: int = Field(256 * 1024, ge=1024)  # larger answers are not stored
    semantic: SemanticCacheConfig = SemanticCacheConfig()
    embedder: EmbedderConfig = EmbedderConfig()
    default: CacheModelConfig = CacheModelConfig()
    models: dict[str, CacheModelConfig] = {}  # per model name (base or adapter), replacing `default`

    def for_model(self, model: str) -> CacheModelConfig:
        return self.models.get(model, self.default)


class ChromaConfig(Section):
    """Where RAG collections live: an embedded ChromaDB in a folder, or a Chroma server."""

    mode: Literal["embedded", "http"] = "embedded"
    path: str = "data/sluice/chroma"  # embedded: the PersistentClient's folder
    url: str | None = None  # http: the server, e.g. http://chroma:8000

    @model_validator(mode="after")
    def _url_for_http(self) -> ChromaConfig:
        if self.mode == "http" and not self.url:
            raise ValueError("url is required when mode is http")
        return self


DEFAULT_RAG_TEMPLATE = (
    "Answer the question using the context below. If the context does not contain the answer, say so.\n\n"
    "{context}"
)


class RagRouteConfig(Section):
    """A model name that answers with retrieved context: `model` = `base_model` + `collection`."""

    model: str = Field(min_length=1)  # the name clients use, e.g. docs-assistant
    base_model: str = Field(min_length=1)  # the model (or adapter) that answers
    collection: str = Field(min_length=3, max_length=63)
    top_k: int = Field(4, ge=1, le=50)
    min_score: float = Field(0.3, ge=-1, le=1)  # chunks less similar than this are left out
    template: str = DEFAULT_RAG_TEMPLATE  # the instructions; `{context}` is replaced by the chunks

    @field_validator("template")
    @classmethod
    def _has_context(cls, template: str) -> str:
        if "{context}" not in template:
            raise ValueError("must contain {context}, where the retrieved chunks go")
        return template


class RagConfig(Section):
    """Retrieval-augmented generation (sluice/rag/, docs/rag.md)."""

    chroma: ChromaConfig = ChromaConfig()
    embedder: EmbedderConfig = EmbedderConfig()  # must be the one the collections were ingested with
    chunk_tokens: int = Field(250, ge=16, le=8192)  # chunk size for `sluice ingest`, in embedder tokens
    overlap_tokens: int = Field(32, ge=0)  # tokens repeated at the start of the next chunk
    timeout: PositiveSeconds = 2.0  # retrieval (embedding + query) slower than this: answer without context
    routes: tuple[RagRouteConfig, ...] = ()

    @model_validator(mode="after")
    def _sane(self) -> RagConfig:
        if self.overlap_tokens >= self.chunk_tokens:
            raise ValueError("overlap_tokens must be smaller than chunk_tokens")
        if self.embedder.kind == "local" and self.chunk_tokens > LOCAL_EMBEDDER_TOKENS:
            raise ValueError(
                f"chunk_tokens: all-MiniLM-L6-v2 reads at most {LOCAL_EMBEDDER_TOKENS} tokens of a chunk; "
                "larger chunks would be embedded by their beginning only"
            )
        names = [route.model for route in self.routes]
        if len(set(names)) != len(names):
            raise ValueError("routes[].model must be unique")
        return self


class RepairConfig(Section):
    """Automatic repair: Alertmanager's webhook at POST /admin/alerts drains backends (sluice/repair.py)."""

    enabled: bool = False
    drain_on: tuple[str, ...] = ("VLLMKVCacheSaturated", "SluiceBackendErrorRateHigh")  # alert names
    sync_interval: PositiveSeconds = 1.0  # how often each replica reads the drains shared in Redis


class ConsoleConfig(Section):
    """The operator console at /console (sluice/console/), behind the admin credential (docs/console.md)."""

    enabled: bool = True  # also needs auth.admin_key; without one the console answers 404
    session_ttl: int = Field(28800, ge=60, le=7 * 86400)  # seconds a console login lasts


class TracingConfig(Section):
    """OpenTelemetry traces over OTLP/HTTP (sluice/tracing.py); off while `otlp_endpoint` is unset."""

    otlp_endpoint: str | None = None  # e.g. http://otel-collector:4318/v1/traces
    service_name: str = "sluice"
    sample_ratio: float = Field(1.0, ge=0, le=1)  # share of new traces kept (a caller's sampled flag wins)
    export_timeout: PositiveSeconds = 5.0


class MediaConfig(Section):
    """Remote media URLs in chat content parts, which the backend would fetch itself (sluice/pipeline/media.py)."""

    remote_urls: Literal["allow", "public_only", "deny"] = "public_only"
    resolve_timeout: PositiveSeconds = 1.0  # public_only: a host name must resolve within this
    max_remote_hosts: int = Field(8, ge=1, le=256)  # public_only: distinct host names looked up per request


CORS_EXPOSED = (
    "x-request-id", "x-sluice-model", "x-sluice-cache", "retry-after",
    "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens",
)  # fmt: skip
HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
DEFAULT_PORTS = {"http": 80, "https": 443}


class CorsConfig(Section):
    """Cross-origin access for browser clients (sluice/pipeline/cors.py); off while `allow_origins` is empty."""

    allow_origins: tuple[str, ...] = ()  # exact origins (scheme://host[:port]), or "*" for any
    allow_headers: tuple[str, ...] = ("authorization", "content-type", "x-request-id")  # "*": what is asked for
    expose_headers: tuple[str, ...] = CORS_EXPOSED  # response headers the page's script may read
    allow_credentials: bool = False  # cookies and TLS client certificates; never with "*"
    max_age: int = Field(600, ge=0, le=86400)  # seconds a browser may reuse a preflight answer

    @field_validator("allow_origins")
    @classmethod
    def _origins(cls, origins: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(origin if origin == "*" else _serialized_origin(origin) for origin in origins)

    @field_validator("allow_headers", "expose_headers")
    @classmethod
    def _header_names(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        for name in names:
            if name != "*" and not HEADER_NAME.match(name):
                raise ValueError(f"{name!r} is not a header name")
        return tuple(name.lower() for name in names)

    @model_validator(mode="after")
    def _no_wildcard_with_credentials(self) -> CorsConfig:
        if self.allow_credentials and "*" in self.allow_origins:
            raise ValueError("allow_origins may not contain '*' when allow_credentials is true; list the origins")
        return self


def _serialized_origin(origin: str) -> str:
    """`origin` as browsers send it in the Origin header: lower case, no default port, no path."""
    parts = urlsplit(origin.strip())
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname or port == -1 or parts.username is not None:
        raise ValueError(f"{origin!r} must be an origin such as https://app.example.com (or '*')")
    if parts.path.rstrip("/") or parts.query or parts.fragment:
        raise ValueError(f"{origin!r} must not have a path, query or fragment: an origin is scheme://host[:port]")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    shown_port = "" if port is None or port == DEFAULT_PORTS[parts.scheme] else f":{port}"
    return f"{parts.scheme}://{host}{shown_port}"


class LoggingConfig(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "text"] = "json"
    access_log: bool = True


class SluiceConfig(Section):
    server: ServerConfig = ServerConfig()
    backends: tuple[BackendConfig, ...] = ()
    discovery: DiscoveryConfig = DiscoveryConfig()
    auth: AuthConfig = AuthConfig()
    timeouts: TimeoutsConfig = TimeoutsConfig()
    limits: LimitsConfig = LimitsConfig()
    health: HealthConfig = HealthConfig()
    routing: RoutingConfig = RoutingConfig()
    breaker: BreakerConfig = BreakerConfig()
    adapters: AdaptersConfig = AdaptersConfig()
    database: DatabaseConfig = DatabaseConfig()
    redis: RedisConfig = RedisConfig()
    rate_limits: RateLimitsConfig = RateLimitsConfig()
    audit: AuditConfig = AuditConfig()
    cache: CacheConfig = CacheConfig()
    repair: RepairConfig = RepairConfig()
    console: ConsoleConfig = ConsoleConfig()
    rag: RagConfig = RagConfig()
    tracing: TracingConfig = TracingConfig()
    logging: LoggingConfig = LoggingConfig()
    media: MediaConfig = MediaConfig()
    cors: CorsConfig = CorsConfig()

    @model_validator(mode="after")
    def _unique_backends(self) -> SluiceConfig:
        if not self.backends and self.discovery.kubernetes is None:
            raise ValueError("backends: list at least one, or discover them (discovery.kubernetes)")
        names = [b.name for b in self.backends]
        if len(set(names)) != len(names):
            raise ValueError("backends names must be unique")
        if self.cache.enabled and self.cache.store == "redis" and self.redis.url is None:
            raise ValueError("cache.store is redis but redis.url is not set (set it, or use cache.store: auto)")
        return self


ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
