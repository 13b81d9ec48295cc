"""Balancer and the pieces of dispatch that are pure logic."""

from __future__ import annotations

from collections import Counter

from sluice.config import BackendConfig
from sluice.context import RequestContext
from sluice.deadlines import Deadlines
from sluice.http.request import HttpRequest
from sluice.http.response import ResponseWriter
from sluice.pipeline.dispatch import _usage
from sluice.upstream.backends import Backend, Backends
from sluice.upstream.balancer import Affinity, LeastLoaded, RoundRobin
from sluice.upstream.pool import ConnectionPool


def backend(name: str, weight: float = 1.0, models: tuple[str, ...] = ("m",)) -> Backend:
    config = BackendConfig(name=name, url="http://127.0.0.1:1", weight=weight, models=models)
    pool = ConnectionPool("127.0.0.1", 1, connect_timeout=1, idle_timeout=1, max_idle=1, deadlines=Deadlines(1))
    b = Backend(config, pool)
    b.healthy = True
    return b


def test_least_outstanding_prefers_the_idle_backend() -> None:
    a, b = backend("a"), backend("b")
    a.in_flight = 3
    assert LeastLoaded().pick((a, b)) is b
    assert LeastLoaded().pick((a, b), exclude=[b]) is a
    assert LeastLoaded().pick((a,), exclude=[a]) is None


def test_weights_shape_the_share_of_outstanding_requests() -> None:
    a, b = backend("a", weight=1), backend("b", weight=3)
    balancer = LeastLoaded()
    picks = Counter()
    for _ in range(400):  # requests that never finish: the steady state reflects the weights
        chosen = balancer.pick((a, b))
        assert chosen is not None
        chosen.in_flight += 1
        picks[chosen.name] += 1
    assert picks["b"] == 300 and picks["a"] == 100


def test_ties_rotate_instead_of_piling_on_the_first() -> None:
    backends = (backend("a"), backend("b"), backend("c"))
    balancer = LeastLoaded()
    chosen = Counter(balancer.pick(backends).name for _ in range(300))  # type: ignore[union-attr]
    assert set(chosen.values()) == {100}


def test_model_index_follows_health_and_models() -> None:
    a, b = backend("a", models=("base", "lora-x")), backend("b", models=("base",))
    backends = Backends([a, b])
    assert backends.serving("lora-x") == (a,)
    assert set(backends.serving("base")) == {a, b}
    a.healthy = False
    backends.rebuild()
    assert backends.serving("lora-x") == () and backends.knows("lora-x")
    assert not backends.knows("other")


def test_usage_is_found_without_decoding_the_body() -> None:
    body = b'{"id":"x","choices":[{"message":{"content":"usage: {"}}],"usage":{"prompt_tokens":3,' \
           b'"completion_tokens":2,"total_tokens":5,"prompt_tokens_details":{"cached_tokens":1}},"kv":null}'
    assert _usage(body) == {
        "prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5, "prompt_tokens_details": {"cached_tokens": 1},
    }
    assert _usage(b'{"id":"x"}') is None
    assert _usage(b'{"usage":{"prompt_tokens":') is None


def ctx_for(body: dict[str, object], headers: list[tuple[bytes, bytes]] | None = None) -> RequestContext:
    request = HttpRequest("POST", "/v1/chat/completions", "", headers or [], b"", True, True, "127.0.0.1")
    ctx = RequestContext(request, ResponseWriter(None, b"id", True, True), 0.0)  # type: ignore[arg-type]
    ctx.body = body
    return ctx


def chat(system: str, question: str = "hi", **extra: object) -> dict[str, object]:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    return {"model": "m", "messages": messages, **extra}


def test_round_robin_ignores_load() -> None:
    backends = (backend("a"), backend("b"))
    backends[0].in_flight = 50
    balancer = RoundRobin()
    picks = [balancer.pick(backends, (), ctx_for({})).name for _ in range(4)]  # type: ignore[union-attr]
    assert sorted(picks) == ["a", "a", "b", "b"]


def test_affinity_keeps_a_prefix_on_one_backend_and_spreads_prefixes() -> None:
    backends = tuple(backend(n) for n in "abcd")
    balancer = Affinity("x-session-id", 1024)
    homes = {}
    for i in range(40):
        system = f"system prompt number {i} " * 50
        picks = {balancer.pick(backends, (), ctx_for(chat(system, question=f"q{j}"))).name for j in range(5)}  # type: ignore[union-attr]
        assert len(picks) == 1  # every question under the same system prompt lands together
        homes[i] = picks.pop()
    assert len(set(homes.values())) == 4  # and different prompts spread over all backends
    # Remove one backend: only the prompts that lived there move.
    remaining = backends[:3]
    for i, home in homes.items():
        moved = balancer.pick(remaining, (), ctx_for(chat(f"system prompt number {i} " * 50))).name  # type: ignore[union-attr]
        if home != "d":
            assert moved == home


def test_affinity_key_order_and_bounded_load() -> None:
    balancer = Affinity("x-session-id", 1024)
    by_session = ctx_for(chat("s", user="alice"), [(b"x-session-id", b"abc")])
    assert balancer.key(by_session) == b"s:abc"
    assert balancer.key(ctx_for(chat("s", user="alice"))) == b"u:alice"
    assert balancer.key(ctx_for({"model": "m", "prompt": "p" * 5000})) == b"p:" + b"p" * 1024
    a, b = backend("a"), backend("b")
    ctx = ctx_for(chat("shared"))
    home = balancer.pick((a, b), (), ctx)
    assert home is not None
    other = b if home is a else a
    home.in_flight = 20  # far past 1.5 × the average load + 2
    assert balancer.pick((a, b), (), ctx) is other
    assert balancer.pick((a, b), (other,), ctx) is home  # excluded after a failure: the home is all there is
