"""LoRA placement: registered adapters are loaded on demand through vLLM's runtime LoRA API."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson

from sluice.app import Gateway
from tests.component.test_failover import HEADERS, SLOW_HEALTH, post
from tests.conftest import StartFake, StartGateway

REGISTRY = {
    "registry": [
        {"name": "medical", "path": "/adapters/medical", "base_model": "base"},
        {"name": "legal", "path": "/adapters/legal", "base_model": "base"},
        {"name": "code", "path": "/adapters/code", "base_model": "base"},
        {"name": "poetry", "path": "/adapters/poetry", "base_model": "other-base"},
    ]
}


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def operations(gw: Gateway, backend: str, adapter: str, operation: str, outcome: str = "ok") -> float:
    return gw.metrics.adapter_operations.child(backend, adapter, operation, outcome).value


async def test_registered_adapter_is_listed_then_loaded_on_the_least_loaded_base_backend(
    fake: StartFake, gateway: StartGateway
) -> None:
    first, second, unrelated = await fake("base"), await fake("base"), await fake("other")
    gw = await gateway([first, second, unrelated], health=SLOW_HEALTH, adapters=REGISTRY)
    async with aiohttp.ClientSession() as session:
        async with session.get(gw.url + "/v1/models", headers=HEADERS) as response:
            cards = {card["id"]: card for card in (await response.json())["data"]}
        assert cards["medical"]["parent"] == "base"
        assert "poetry" not in cards  # its base model runs nowhere
        hold = asyncio.ensure_future(post(gw.url, chat("base"), headers={"X-Fake-TTFT-Ms": "800"}))
        await asyncio.sleep(0.2)
        busy, idle = (first, second) if gw.backends.by_name["b0"].in_flight else (second, first)
        status, headers, body = await post(gw.url, chat("medical"))
        await hold
    assert status == 200, body
    assert orjson.loads(body)["model"] == "medical" and headers["X-Sluice-Model"] == "medical"
    assert idle.engine.loras.adapters == {"medical": "/adapters/medical"}
    assert busy.engine.loras.adapters == {} and unrelated.engine.loras.adapters == {}
    assert "medical" in gw.backends.by_name["b1" if idle is second else "b0"].models


async def test_concurrent_requests_share_one_load(fake: StartFake, gateway: StartGateway) -> None:
    backend = await fake("base")
    gw = await gateway([backend], health=SLOW_HEALTH, adapters=REGISTRY)
    results = await asyncio.gather(*(post(gw.url, chat("legal")) for _ in range(20)))
    assert [status for status, _, _ in results] == [200] * 20
    assert operations(gw, "b0", "legal", "load") == 1
    assert backend.stats.requests_by_model == {"legal": 20}


async def test_least_recently_used_idle_adapter_makes_room(fake: StartFake, gateway: StartGateway) -> None:
    backend = await fake("base", max_loras=2)
    gw = await gateway([backend], health=SLOW_HEALTH, adapters=REGISTRY)
    for model in ("medical", "legal", "medical", "code"):  # legal is least recently used when code arrives
        status, _, body = await post(gw.url, chat(model))
        assert status == 200, body
    assert set(backend.engine.loras.adapters) == {"medical", "code"}
    assert operations(gw, "b0", "legal", "unload") == 1
    assert gw.backends.by_name["b0"].models == {"base", "medical", "code"}
    status, _, body = await post(gw.url, chat("legal"))  # and it comes back on demand
    assert status == 200, body
    assert set(backend.engine.loras.adapters) == {"legal", "code"}


async def test_adapter_in_use_is_never_unloaded(fake: StartFake, gateway: StartGateway) -> None:
    backend = await fake("base", max_loras=1)
    gw = await gateway([backend], health=SLOW_HEALTH, adapters=REGISTRY)
    assert (await post(gw.url, chat("medical")))[0] == 200
    slow = asyncio.ensure_future(post(gw.url, chat("medical"), headers={"X-Fake-TTFT-Ms": "1000"}))
    await asyncio.sleep(0.3)
    status, headers, body = await post(gw.url, chat("legal"))
    assert status == 503 and "retry-after" in headers, body
    message = orjson.loads(body)["error"]["message"]
    assert "Could not load adapter 'legal'" in message and "max_loras" in message
    assert (await slow)[0] == 200
    assert set(backend.engine.loras.adapters) == {"medical"}
    status, _, body = await post(gw.url, chat("legal"))  # idle now: medical makes room
    assert status == 200, body
    assert set(backend.engine.loras.adapters) == {"legal"}


async def test_adapter_moves_when_its_backend_dies(fake: StartFake, gateway: StartGateway) -> None:
    first, second = await fake("base"), await fake("base", ttft_ms=300)  # `first` is the least loaded
    gw = await gateway([first, second], health=SLOW_HEALTH, adapters=REGISTRY)
    assert (await post(gw.url, chat("medical")))[0] == 200
    assert "medical" in first.engine.loras.adapters and not second.engine.loras.adapters
    await first.close()
    status, _, body = await post(gw.url, chat("medical"))
    assert status == 200, body
    assert "medical" in second.engine.loras.adapters


async def test_adapter_unloaded_behind_the_gateways_back_is_loaded_again(
    fake: StartFake, gateway: StartGateway
) -> None:
    backend = await fake("base")
    gw = await gateway([backend], health=SLOW_HEALTH, adapters=REGISTRY)
    assert (await post(gw.url, chat("code")))[0] == 200
    backend.engine.loras.unload("code")  # another replica or an operator unloaded it
    status, _, body = await post(gw.url, chat("code"))
    assert status == 200, body
    assert operations(gw, "b0", "code", "load") == 2
    breaker = gw.backends.by_name["b0"].breaker
    assert breaker is not None and breaker.state == 0  # a vanished adapter is not the backend's fault


async def test_failed_load_names_the_reason_or_falls_back(fake: StartFake, gateway: StartGateway) -> None:
    full = await fake("base", loras=["static"], max_loras=1)  # a slot taken by an adapter we do not own
    gw = await gateway([full], health=SLOW_HEALTH, adapters=REGISTRY)
    status, headers, body = await post(gw.url, chat("medical"))
    assert status == 503 and "retry-after" in headers
    assert "b0: load answered 400" in orjson.loads(body)["error"]["message"]
    assert set(full.engine.loras.adapters) == {"static"}  # never unloaded: it is not in the registry
    assert operations(gw, "b0", "medical", "load", "failed") == 1

    with_fallback = await gateway(
        [full], health=SLOW_HEALTH, adapters=REGISTRY, routing={"fallbacks": {"medical": ["base"]}}
    )
    status, headers, body = await post(with_fallback.url, chat("medical"))
    assert status == 200, body
    assert headers["X-Sluice-Model"] == "base" and orjson.loads(body)["model"] == "base"


async def test_adapter_whose_base_model_runs_nowhere(fake: StartFake, gateway: StartGateway) -> None:
    gw = await gateway([await fake("base")], health=SLOW_HEALTH, adapters=REGISTRY)
    status, _, body = await post(gw.url, chat("poetry"))
    assert status == 503
    assert "No healthy backend runs 'other-base', the base model of adapter 'poetry'" in body.decode()
