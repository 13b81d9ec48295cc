"""Automatic repair: Alertmanager's webhook drains a backend, resolves undrain it, never the last one."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
import redis

from sluice.app import Gateway
from sluice.testing.fake_vllm import FakeVLLM
from tests.conftest import API_KEY, StartFake, StartGateway

ADMIN = "admin-key-0123456789"
REDIS = "redis://127.0.0.1:6379/0"
CHAT = {"model": "base", "messages": [{"role": "user", "content": "hi"}]}


def notification(status: str, *alerts: dict[str, str]) -> dict[str, Any]:
    """What Alertmanager posts (webhook version 4), with the fields it always sends."""
    return {
        "version": "4",
        "status": status,
        "receiver": "sluice-repair",
        "groupKey": "{}:{}",
        "groupLabels": {},
        "commonLabels": {},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093",
        "truncatedAlerts": 0,
        "alerts": [
            {
                "status": status,
                "labels": labels,
                "annotations": {},
                "startsAt": "2026-11-26T05:00:00Z",
                "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "",
                "fingerprint": uuid.uuid4().hex[:16],
            }
            for labels in alerts
        ],
    }


async def alert(gw: Gateway, body: Any, key: str = ADMIN) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(gw.url + "/admin/alerts", json=body, headers={"authorization": f"Bearer {key}"}) as response,
    ):
        return response.status, await response.json()


async def spread(gw: Gateway, backends: list[FakeVLLM], requests: int = 10) -> list[int]:
    """How many of `requests` chat requests each backend served."""
    before = [b.stats.requests_total for b in backends]
    async with aiohttp.ClientSession(headers={"authorization": f"Bearer {API_KEY}"}) as session:
        for _ in range(requests):
            async with session.post(gw.url + "/v1/chat/completions", json=CHAT) as response:
                assert response.status == 200
    return [b.stats.requests_total - n for b, n in zip(backends, before, strict=True)]


def sections(**repair: Any) -> dict[str, Any]:
    return {
        "auth": {"admin_key": ADMIN, "api_keys": [{"name": "test", "key": API_KEY}]},
        "repair": {"enabled": True, **repair},
        "routing": {"strategy": "round_robin"},
    }


@pytest.fixture
def prefix() -> Iterator[str]:
    name = f"sluice-test-{uuid.uuid4().hex[:12]}:"
    yield name
    client = redis.Redis.from_url(REDIS)
    client.delete(name + "drained")
    client.close()


async def test_a_firing_alert_drains_and_its_resolution_undrains(fake: StartFake, gateway: StartGateway) -> None:
    backends = [await fake("base"), await fake("base")]
    gw = await gateway(backends, **sections())
    assert min(await spread(gw, backends)) > 0
    saturated = {"alertname": "VLLMKVCacheSaturated", "backend": "b0", "severity": "warning"}
    status, answer = await alert(gw, notification("firing", saturated))
    assert status == 200
    assert answer["actions"] == [
        {"alert": "VLLMKVCacheSaturated", "backend": "b0", "action": "drain", "outcome": "done"}
    ]
    assert await spread(gw, backends) == [0, 10]
    page = gw.metrics.render().decode()
    assert 'sluice_backend_drained{backend="b0"} 1.0' in page
    assert 'sluice_repair_actions_total{action="drain",alert="VLLMKVCacheSaturated",outcome="done"} 1.0' in page
    # a second alert on the same backend; it stays drained until both resolve
    errors = {"alertname": "SluiceBackendErrorRateHigh", "backend": "b0"}
    assert (await alert(gw, notification("firing", errors)))[1]["actions"][0]["outcome"] == "done"
    assert (await alert(gw, notification("firing", saturated)))[1]["actions"][0]["outcome"] == "already"
    assert (await alert(gw, notification("resolved", saturated)))[1]["actions"][0]["outcome"] == "done"
    assert await spread(gw, backends) == [0, 10]
    assert (await alert(gw, notification("resolved", errors)))[1]["actions"][0]["outcome"] == "done"
    assert min(await spread(gw, backends)) > 0
    assert 'sluice_backend_drained{backend="b0"} 0.0' in gw.metrics.render().decode()


async def test_the_last_backend_of_a_model_is_never_drained(fake: StartFake, gateway: StartGateway) -> None:
    backends = [await fake("base"), await fake("base", loras=["legal"])]
    gw = await gateway(backends, **sections())
    # b1 is the only backend with the adapter: draining it would take "legal" away
    (action,) = (await alert(gw, notification("firing", {"alertname": "VLLMKVCacheSaturated", "backend": "b1"})))[1][
        "actions"
    ]
    assert action["outcome"] == "refused_last_backend"
    assert (await alert(gw, notification("firing", {"alertname": "VLLMKVCacheSaturated", "backend": "b0"})))[1][
        "actions"
    ][0]["outcome"] == "done"
    # with b0 drained, b1 is now the last backend of "base" too
    by_instance = {"alertname": "SluiceBackendErrorRateHigh", "instance": backends[1].url.removeprefix("http://")}
    (action,) = (await alert(gw, notification("firing", by_instance)))[1]["actions"]
    assert (action["backend"], action["outcome"]) == ("b1", "refused_last_backend")
    assert await spread(gw, backends) == [0, 10]


async def test_other_alerts_unknown_backends_and_bad_requests(fake: StartFake, gateway: StartGateway) -> None:
    backends = [await fake("base"), await fake("base")]
    gw = await gateway(backends, **sections())
    status, answer = await alert(
        gw,
        notification(
            "firing",
            {"alertname": "SluiceRedisDown", "backend": "b0"},
            {"alertname": "VLLMKVCacheSaturated", "backend": "nope", "instance": "10.0.0.1:1"},
        ),
    )
    assert status == 200
    assert [a["outcome"] for a in answer["actions"]] == ["ignored", "unknown_backend"]
    assert min(await spread(gw, backends)) > 0
    assert (await alert(gw, {"alerts": "not a list"}))[0] == 400
    assert (await alert(gw, notification("firing"), key=API_KEY))[0] in (401, 403)
    page = gw.metrics.render().decode()
    assert 'sluice_repair_actions_total{action="drain",alert="other",outcome="ignored"} 1.0' in page


async def test_repair_off_answers_404(fake: StartFake, gateway: StartGateway) -> None:
    gw = await gateway([await fake("base")], auth={"admin_key": ADMIN, "api_keys": []})
    status, answer = await alert(gw, notification("firing"))
    assert status == 404 and "repair.enabled" in answer["error"]["message"]


async def test_every_replica_follows_a_drain_through_redis(fake: StartFake, gateway: StartGateway, prefix: str) -> None:
    backends = [await fake("base"), await fake("base")]
    shared = {**sections(sync_interval=0.1), "redis": {"url": REDIS, "key_prefix": prefix}}
    receiver, other = await gateway(backends, **shared), await gateway(backends, **shared)
    saturated = {"alertname": "VLLMKVCacheSaturated", "backend": "b1"}
    assert (await alert(receiver, notification("firing", saturated)))[1]["actions"][0]["outcome"] == "done"
    for _ in range(50):
        if other.backends.by_name["b1"].drained_by:
            break
        await asyncio.sleep(0.05)
    assert await spread(other, backends) == [10, 0]
    await alert(receiver, notification("resolved", saturated))
    for _ in range(50):
        if not other.backends.by_name["b1"].drained_by:
            break
        await asyncio.sleep(0.05)
    assert min(await spread(other, backends)) > 0
