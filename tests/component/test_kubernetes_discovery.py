"""Backends discovered through the Kubernetes API: the official client against recorded API responses.

The API server replays recorded EndpointSlice lists and watch events (tests/kubernetes_api.py); the pods'
addresses are mapped onto fake vLLM servers listening on 127.0.0.2–5 with one port, as pods of a
Deployment share their container port.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sluice.app import Gateway
from sluice.config import BackendConfig, KubernetesDiscoveryConfig
from sluice.testing.fake_vllm import FakeVLLM
from sluice.upstream.kubernetes_discovery import KubernetesDiscovery
from tests.conftest import API_KEY, StartFake, StartGateway, eventually
from tests.kubernetes_api import TOKEN, FakeKubernetesApi, recorded, recorded_events

PODS = {  # recorded pod address → where its fake engine listens here
    "10.244.1.17": "127.0.0.2",  # vllm-a-6c9f7d8b54-2mq8x
    "10.244.2.31": "127.0.0.3",  # k7v4n
    "10.244.3.12": "127.0.0.4",  # x9p2r (not ready in the recorded list)
    "10.244.4.8": "127.0.0.5",  # t5w3z (added by a watch event)
}


@pytest.fixture
async def api() -> AsyncIterator[FakeKubernetesApi]:
    server = await FakeKubernetesApi(list_body=recorded("endpointslices-vllm-a.json")).start()
    yield server
    await server.close()


class Seen:
    """What discovery handed to the gateway, in order."""

    def __init__(self) -> None:
        self.changes: list[list[str]] = []

    def __call__(self, service: str, backends: tuple[BackendConfig, ...]) -> None:
        assert service == "vllm-a"
        self.changes.append([b.name.removeprefix("vllm-a-6c9f7d8b54-") for b in backends])


def discovery(api: FakeKubernetesApi, folder: Path, seen: Seen, **settings: Any) -> KubernetesDiscovery:
    config = KubernetesDiscoveryConfig.model_validate(
        {"kubeconfig": str(api.kubeconfig(folder)), "pools": [{"service": "vllm-a"}], "retry": 0.1, **settings}
    )
    return KubernetesDiscovery(config, seen)


@pytest.fixture
async def followed(api: FakeKubernetesApi, tmp_path: Path) -> AsyncIterator[tuple[KubernetesDiscovery, Seen]]:
    """Discovery of `vllm-a` started against the recorded API, and what it has handed over so far."""
    seen = Seen()
    watcher = discovery(api, tmp_path, seen)
    await watcher.start()
    yield watcher, seen
    await watcher.close()


async def test_lists_then_follows_the_watch_with_the_service_account_token(
    api: FakeKubernetesApi, followed: tuple[KubernetesDiscovery, Seen]
) -> None:
    watcher, seen = followed
    assert seen.changes == [["2mq8x", "k7v4n"]]  # start() returned with the first list applied
    assert watcher.namespace == "sluice"  # the kubeconfig context's namespace
    await asyncio.wait_for(api.watching.wait(), 5)
    api.send(*recorded_events("endpointslices-vllm-a.watch.jsonl"))
    await eventually(lambda: len(seen.changes) == 5)
    assert seen.changes[1:] == [
        ["2mq8x", "k7v4n", "x9p2r"],
        ["2mq8x", "x9p2r"],  # (a bookmark between these changed nothing)
        ["2mq8x", "t5w3z", "x9p2r"],
        ["t5w3z"],
    ]
    listing, watching = api.calls[0], api.watches()[0]
    assert listing.path == "/apis/discovery.k8s.io/v1/namespaces/sluice/endpointslices"
    assert listing.query == {"labelSelector": "kubernetes.io/service-name=vllm-a"}
    assert watching.query["resourceVersion"] == "48213"  # from the list, so nothing is missed
    assert watching.query["allowWatchBookmarks"] == "true"
    assert {call.authorization for call in api.calls} == {f"Bearer {TOKEN}"}
    assert watcher.api_up


async def test_a_renewed_watch_continues_from_the_last_version_and_an_expired_one_lists_again(
    api: FakeKubernetesApi, followed: tuple[KubernetesDiscovery, Seen]
) -> None:
    _, seen = followed
    await asyncio.wait_for(api.watching.wait(), 5)
    api.send(*recorded_events("endpointslices-vllm-a.watch.jsonl")[:3])
    await eventually(lambda: len(seen.changes) == 3)  # the list, then two changes around a bookmark
    api.end_watch()  # the API server's timeout passed
    await eventually(lambda: len(api.watches()) == 2)
    assert api.watches()[1].query["resourceVersion"] == "48502"  # the last event's version
    lists_before = len(api.calls) - len(api.watches())
    await asyncio.wait_for(api.watching.wait(), 5)
    api.send(recorded("watch-expired.json").strip())  # 410 Gone: that version was compacted away
    await eventually(lambda: len(api.calls) - len(api.watches()) == lists_before + 1)
    await eventually(lambda: len(api.watches()) == 3)
    assert api.watches()[2].query["resourceVersion"] == "48213"  # from the new list
    assert seen.changes[-1] == ["2mq8x", "k7v4n"]  # the list is the truth again


async def test_an_api_outage_keeps_the_last_backends_and_recovers(
    api: FakeKubernetesApi, followed: tuple[KubernetesDiscovery, Seen]
) -> None:
    watcher, seen = followed
    await asyncio.wait_for(api.watching.wait(), 5)
    api.fail_with = 503
    api.end_watch()
    await eventually(lambda: not watcher.api_up)
    assert seen.changes == [["2mq8x", "k7v4n"]]  # nothing was withdrawn because the API failed
    api.fail_with = None
    await eventually(lambda: watcher.api_up)
    await asyncio.wait_for(api.watching.wait(), 5)


async def test_start_does_not_wait_long_for_an_api_that_fails(api: FakeKubernetesApi, tmp_path: Path) -> None:
    api.fail_with = 403  # e.g. the Role is missing
    seen = Seen()
    watcher = discovery(api, tmp_path, seen)
    began = time.monotonic()
    await watcher.start()
    try:
        assert time.monotonic() - began < 5
        assert not watcher.api_up and seen.changes == []
    finally:
        await watcher.close()


@pytest.fixture
async def pods(fake: StartFake) -> dict[str, FakeVLLM]:
    """One fake engine per recorded pod, all on one port, as the pods of a Deployment."""
    first = await fake("qwen2.5-32b-awq", host="127.0.0.2")
    engines = {"10.244.1.17": first}
    for recorded_address, here in list(PODS.items())[1:]:
        engines[recorded_address] = await fake("qwen2.5-32b-awq", host=here, port=first.port)
    return engines


async def test_the_gateway_routes_to_the_discovered_pods_as_they_come_and_go(
    api: FakeKubernetesApi, pods: dict[str, FakeVLLM], gateway: StartGateway, tmp_path: Path
) -> None:
    port = pods["10.244.1.17"].port
    api.list_body = recorded("endpointslices-vllm-a.json", PODS, port)
    events = recorded_events("endpointslices-vllm-a.watch.jsonl", PODS, port)
    settings = {"kubeconfig": str(api.kubeconfig(tmp_path)), "pools": [{"service": "vllm-a", "weight": 2}]}
    gw = await gateway(discovery={"kubernetes": settings})
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": "qwen2.5-32b-awq", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

    def served() -> dict[str, int]:
        return {address: engine.engine.stats.requests_total for address, engine in pods.items()}

    async with aiohttp.ClientSession(headers=headers) as client:

        async def send(n: int) -> dict[str, int]:
            before = served()
            for _ in range(n):
                async with client.post(f"{gw.url}/v1/chat/completions", json=body) as response:
                    assert response.status == 200, await response.text()
            return {address: count - before[address] for address, count in served().items()}

        assert sorted(b.name for b in gw.backends.all) == ["vllm-a-6c9f7d8b54-2mq8x", "vllm-a-6c9f7d8b54-k7v4n"]
        assert all(b.healthy and b.weight == 2 for b in gw.backends.all)
        async with client.get(f"{gw.url}/v1/models") as r:
            assert [m["id"] for m in (await r.json())["data"]] == ["qwen2.5-32b-awq"]  # discovered from the pods
        spread = await send(12)
        assert spread["10.244.1.17"] > 0 and spread["10.244.2.31"] > 0
        assert spread["10.244.3.12"] == spread["10.244.4.8"] == 0  # not ready, not yet a pod

        # A stream in flight on the pod that is about to terminate finishes there.
        stream_body = {**body, "stream": True, "max_tokens": 40}
        await asyncio.wait_for(api.watching.wait(), 5)
        api.send(events[0])  # x9p2r ready
        await eventually(lambda: len(gw.backends.serving("qwen2.5-32b-awq")) == 3)
        assert (await send(12))["10.244.3.12"] > 0

        terminating = gw.backends.by_name["vllm-a-6c9f7d8b54-k7v4n"]
        pods["10.244.2.31"].settings.itl_ms = 20
        streams = [asyncio.create_task(client.post(f"{gw.url}/v1/chat/completions", json=stream_body))
                   for _ in range(6)]  # fmt: skip
        await eventually(lambda: terminating.in_flight > 0)
        api.send(events[1], events[2])  # a bookmark, then k7v4n terminating
        await eventually(lambda: "vllm-a-6c9f7d8b54-k7v4n" not in gw.backends.by_name)
        for task in streams:
            async with await task as response:
                text = await response.text()
                assert response.status == 200 and text.rstrip().endswith("data: [DONE]"), text[-200:]
        assert (await send(12))["10.244.2.31"] == 0  # no new request for a terminating pod

        api.send(events[3], events[4])  # a new slice with t5w3z, then the first slice deleted
        last = ["vllm-a-6c9f7d8b54-t5w3z"]
        await eventually(lambda: [b.name for b in gw.backends.serving("qwen2.5-32b-awq")] == last)
        spread = await send(6)
        assert spread == {"10.244.1.17": 0, "10.244.2.31": 0, "10.244.3.12": 0, "10.244.4.8": 6}

        async with client.get(f"{gw.url}/metrics") as r:
            text = await r.text()
        assert 'sluice_dependency_up{dependency="kubernetes"} 1.0' in text
        assert 'backend="vllm-a-6c9f7d8b54-t5w3z"' in text


async def test_discovered_and_configured_backends_share_one_pool_and_a_reload_keeps_the_discovered(
    api: FakeKubernetesApi, pods: dict[str, FakeVLLM], fake: StartFake, gateway: StartGateway, tmp_path: Path
) -> None:
    port = pods["10.244.1.17"].port
    api.list_body = recorded("endpointslices-vllm-a.json", PODS, port)
    static = await fake("qwen2.5-7b")
    config = tmp_path / "sluice.yaml"
    config.write_text(
        json.dumps(
            {
                "server": {"host": "127.0.0.1", "port": 0},
                "database": {"url": f"sqlite:///{tmp_path}/sluice.db"},
                "audit": {"journal_dir": str(tmp_path / "journal")},
                "auth": {"api_keys": [{"name": "test", "key": API_KEY}]},
                "backends": [{"name": "vllm-c", "url": static.url}],
                "discovery": {
                    "kubernetes": {"kubeconfig": str(api.kubeconfig(tmp_path)), "pools": [{"service": "vllm-a"}]}
                },
                "logging": {"level": "warning"},
            }
        )
    )
    gw: Gateway = await gateway(config_path=config)
    assert sorted(b.name for b in gw.backends.all) == [
        "vllm-a-6c9f7d8b54-2mq8x", "vllm-a-6c9f7d8b54-k7v4n", "vllm-c",
    ]  # fmt: skip
    discovered = gw.backends.by_name["vllm-a-6c9f7d8b54-2mq8x"]
    summary = await gw.reload_from_file()
    assert summary["backends"] == {"kept": ["vllm-c"], "added": [], "changed": [], "removed": []}
    assert gw.backends.by_name["vllm-a-6c9f7d8b54-2mq8x"] is discovered  # its connections and state stay
    assert gw.backends.serving("qwen2.5-7b") and len(gw.backends.serving("qwen2.5-32b-awq")) == 2
