"""Settings of the fake vLLM server and the per-request knobs derived from them.

`FakeVLLMSettings` is the server's mutable configuration (CLI flags, the Python API and `POST /fake/config`
all write it). `Knobs` is what one request actually runs with: the settings overridden by `X-Fake-*`
headers, resolved once when the request arrives. `FailMode` is the parsed form of `--fail` /
`X-Fake-Fail`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

FailKind = Literal["status", "hang", "drop", "close", "sse_error"]

# Settings that `POST /fake/config` may change at runtime, with the type each accepts.
RUNTIME_KEYS: dict[str, tuple[type, ...]] = {
    "ttft_ms": (int, float),
    "itl_ms": (int, float),
    "tokens": (int,),
    "error_rate": (int, float),
    "fail": (str, type(None)),
    "max_num_seqs": (int,),
    "kv_capacity_tokens": (int,),
    "prefill_ms_per_token": (int, float),
}


@dataclass(frozen=True, slots=True)
class FailMode:
    """An injected failure.

    `status`: answer `status` with vLLM-style error JSON; `hang`: never answer; `drop`: cut the connection
    after `after` content tokens; `close`: cut the connection before answering; `sse_error`: after `after`
    content chunks send vLLM's in-stream error event and `[DONE]`.
    """

    kind: FailKind
    status: int = 500
    after: int = 0


def parse_fail(text: str | None) -> FailMode | None:
    """Parse `500` (any 4xx/5xx), `hang`, `close`, `drop:N`, `sse-error:N`; empty or `none` means off."""
    if text is None:
        return None
    value = text.strip().lower()
    if value in ("", "none", "off"):
        return None
    if value in ("hang", "close"):
        return FailMode(kind=value)  # type: ignore[arg-type]
    if value.isdigit():
        status = int(value)
        if 400 <= status <= 599:
            return FailMode(kind="status", status=status)
    head, sep, tail = value.partition(":")
    if sep and tail.isdigit() and head in ("drop", "sse-error"):
        return FailMode(kind="drop" if head == "drop" else "sse_error", after=int(tail))
    raise ValueError(
        f"invalid fail mode {text!r}: expected a 4xx/5xx status, 'hang', 'close', 'drop:N' or 'sse-error:N'"
    )


@dataclass
class FakeVLLMSettings:
    """Configuration of one fake vLLM server; see `sluice fake-vllm --help` for each field."""

    model: str
    loras: list[str] = field(default_factory=list)  # "name" or "name=path"
    host: str = "127.0.0.1"
    port: int = 0
    ttft_ms: float = 0.0
    itl_ms: float = 0.0
    tokens: int = 16
    error_rate: float = 0.0
    fail: str | None = None
    max_num_seqs: int = 256
    kv_capacity_tokens: int = 65536
    prefill_ms_per_token: float = 0.0  # prefill cost of each uncached prompt token; 0 = prefill is free
    embedding_dim: int = 32
    max_loras: int = 4
    max_model_len: int = 2048
    seed: int | None = None  # seeds the error-rate dice, for reproducible runs

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        if not self.model:
            raise ValueError("model: must not be empty")
        checks: list[tuple[str, bool]] = [
            ("ttft_ms", self.ttft_ms >= 0),
            ("itl_ms", self.itl_ms >= 0),
            ("tokens", self.tokens >= 1),
            ("error_rate", 0.0 <= self.error_rate <= 1.0),
            ("max_num_seqs", self.max_num_seqs >= 1),
            ("kv_capacity_tokens", self.kv_capacity_tokens >= 1),
            ("prefill_ms_per_token", 0.0 <= self.prefill_ms_per_token <= 60_000.0),
            ("embedding_dim", self.embedding_dim >= 1),
            ("max_loras", self.max_loras >= 0),
            ("max_model_len", self.max_model_len >= 2),
            ("port", 0 <= self.port <= 65535),
        ]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"{name}: invalid value {getattr(self, name)!r}")
        parse_fail(self.fail)
        if len(self.loras) > self.max_loras:
            raise ValueError(f"loras: {len(self.loras)} adapters given but max_loras is {self.max_loras}")

    def apply(self, changes: Mapping[str, object]) -> None:
        """Apply a `POST /fake/config` object atomically; unknown keys or bad values raise ValueError."""
        updates: dict[str, object] = {}
        for key, value in changes.items():
            allowed = RUNTIME_KEYS.get(key)
            if allowed is None:
                raise ValueError(f"{key}: unknown setting (allowed: {', '.join(RUNTIME_KEYS)})")
            if isinstance(value, bool) or not isinstance(value, allowed):
                raise ValueError(f"{key}: invalid value {value!r}")
            updates[key] = float(value) if float in allowed and isinstance(value, int) else value
        candidate = dataclasses.replace(self, **updates)  # type: ignore[arg-type]
        candidate.validate()
        for key, value in updates.items():
            setattr(self, key, value)


@dataclass(frozen=True, slots=True)
class Knobs:
    """What one request runs with: server settings overridden by its `X-Fake-*` headers."""

    ttft_s: float
    itl_s: float
    tokens: int
    tokens_forced: bool  # X-Fake-Tokens given: generate exactly this many (capped by max_tokens)
    error_rate: float
    fail: FailMode | None


def _header_float(headers: Mapping[str, str], name: str, default: float, upper: float) -> float:
    raw = headers.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"header {name}: not a number: {raw!r}") from None
    if not 0.0 <= value <= upper:
        raise ValueError(f"header {name}: out of range: {raw!r}")
    return value


def resolve_knobs(settings: FakeVLLMSettings, headers: Mapping[str, str]) -> Knobs:
    """Combine settings and headers; a malformed header raises ValueError (answered with 400)."""
    ttft_ms = _header_float(headers, "X-Fake-TTFT-Ms", settings.ttft_ms, 3_600_000.0)
    itl_ms = _header_float(headers, "X-Fake-ITL-Ms", settings.itl_ms, 3_600_000.0)
    error_rate = _header_float(headers, "X-Fake-Error-Rate", settings.error_rate, 1.0)
    raw_tokens = headers.get("X-Fake-Tokens")
    tokens = settings.tokens
    if raw_tokens is not None:
        if not raw_tokens.strip().isdigit() or int(raw_tokens) < 1:
            raise ValueError(f"header X-Fake-Tokens: expected a positive integer: {raw_tokens!r}")
        tokens = int(raw_tokens)
    raw_fail = headers.get("X-Fake-Fail")
    fail = parse_fail(raw_fail if raw_fail is not None else settings.fail)
    return Knobs(
        ttft_s=ttft_ms / 1000.0,
        itl_s=itl_ms / 1000.0,
        tokens=tokens,
        tokens_forced=raw_tokens is not None,
        error_rate=error_rate,
        fail=fail,
    )


def parse_lora(spec: str) -> tuple[str, str]:
    """`name` or `name=path` → (name, path); a bare name gets a made-up path."""
    name, sep, path = spec.partition("=")
    name = name.strip()
    if not name:
        raise ValueError(f"loras: empty adapter name in {spec!r}")
    return name, (path.strip() if sep and path.strip() else f"/fake-adapters/{name}")
