"""Balancer and the pieces of dispatch that are pure logic."""

from __future__ import annotations

from collections import Counter

from sluice.config import BackendConfig
from sluice.deadlines import Deadlines
from sluice.pipeline.dispatch import _usage
from sluice.upstream.backends import Backend, Backends
from sluice.upstream.balancer import LeastOutstanding
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
    assert LeastOutstanding().pick((a, b)) is b
    assert LeastOutstanding().pick((a, b), exclude=[b]) is a
    assert LeastOutstanding().pick((a,), exclude=[a]) is None


def test_weights_shape_the_share_of_outstanding_requests() -> None:
    a, b = backend("a", weight=1), backend("b", weight=3)
    balancer = LeastOutstanding()
    picks = Counter()
    for _ in range(400):  # requests that never finish: the steady state reflects the weights
        chosen = balancer.pick((a, b))
        assert chosen is not None
        chosen.in_flight += 1
        picks[chosen.name] += 1
    assert picks["b"] == 300 and picks["a"] == 100


def test_ties_rotate_instead_of_piling_on_the_first() -> None:
    backends = (backend("a"), backend("b"), backend("c"))
    balancer = LeastOutstanding()
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
