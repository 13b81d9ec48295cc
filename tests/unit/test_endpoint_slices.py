"""Which backends a Service's EndpointSlices describe (recorded API responses, tests/fixtures/kubernetes)."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from sluice.config import KubernetesPoolConfig
from sluice.upstream.endpoint_slices import backend_name, pool_backends, slice_port
from tests.kubernetes_api import recorded, recorded_events

POOL = KubernetesPoolConfig(service="vllm-a", weight=2, max_concurrency=32, max_loras=4, models=("qwen2.5-32b-awq",))


def recorded_slices() -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = json.loads(recorded("endpointslices-vllm-a.json"))["items"]
    return items


def test_ready_pods_become_backends_with_the_pools_settings() -> None:
    backends = pool_backends(POOL, recorded_slices())
    assert [(b.name, b.url) for b in backends] == [
        ("vllm-a-6c9f7d8b54-2mq8x", "http://10.244.1.17:8000"),
        ("vllm-a-6c9f7d8b54-k7v4n", "http://10.244.2.31:8000"),
    ]  # the third pod is not ready yet (still loading its weights)
    for backend in backends:
        assert (backend.weight, backend.max_concurrency, backend.max_loras) == (2, 32, 4)
        assert backend.models == ("qwen2.5-32b-awq",)


def test_each_recorded_watch_event_changes_the_pool_as_the_cluster_did() -> None:
    slices = {item["metadata"]["name"]: item for item in recorded_slices()}
    seen = []
    for line in recorded_events("endpointslices-vllm-a.watch.jsonl"):
        event = json.loads(line)
        name = event["object"]["metadata"].get("name")
        if event["type"] in ("ADDED", "MODIFIED"):
            slices[name] = event["object"]
        elif event["type"] == "DELETED":
            del slices[name]
        seen.append([b.name.removeprefix("vllm-a-6c9f7d8b54-") for b in pool_backends(POOL, slices.values())])
    assert seen == [
        ["2mq8x", "k7v4n", "x9p2r"],  # x9p2r became ready
        ["2mq8x", "k7v4n", "x9p2r"],  # a bookmark changes nothing
        ["2mq8x", "x9p2r"],  # k7v4n is terminating (still serving what it has): no new requests
        ["2mq8x", "t5w3z", "x9p2r"],  # a second slice with a new pod
        ["t5w3z"],  # the first slice is gone
    ]


def test_absent_ready_means_ready_and_terminating_always_leaves() -> None:
    item = copy.deepcopy(recorded_slices()[0])
    item["endpoints"][0]["conditions"] = {}
    item["endpoints"][1]["conditions"] = {"ready": True, "terminating": True}
    item["endpoints"][2]["conditions"] = {"serving": True}
    names = [b.name for b in pool_backends(POOL, [item])]
    assert names == ["vllm-a-6c9f7d8b54-2mq8x", "vllm-a-6c9f7d8b54-x9p2r"]


def test_a_pod_in_two_overlapping_slices_is_one_backend() -> None:
    first = recorded_slices()[0]
    second = copy.deepcopy(first)
    second["metadata"]["name"] = "vllm-a-zz9zz"
    assert len(pool_backends(POOL, [first, second])) == 2


def test_the_port_is_found_by_name_or_number_and_a_slice_without_it_is_ignored() -> None:
    item = copy.deepcopy(recorded_slices()[0])
    item["ports"] = [{"name": "metrics", "port": 9000, "protocol": "TCP"}, {"name": "http", "port": 8001}]
    assert slice_port(item, "http") == 8001
    assert slice_port(item, 9000) == 9000
    assert slice_port(item, "grpc") is None
    assert pool_backends(KubernetesPoolConfig(service="vllm-a", port="grpc"), [item]) == ()
    assert {b.url for b in pool_backends(KubernetesPoolConfig(service="vllm-a", port=9000), [item])} == {
        "http://10.244.1.17:9000",
        "http://10.244.2.31:9000",
    }


def test_ipv6_addresses_are_bracketed_and_endpoints_without_pods_are_named_by_address() -> None:
    item = copy.deepcopy(recorded_slices()[0])
    item["addressType"] = "IPv6"
    item["endpoints"] = [{"addresses": ["fd00:10:244::17"], "conditions": {"ready": True}}]
    (backend,) = pool_backends(POOL, [item])
    assert backend.url == "http://[fd00:10:244::17]:8000"
    assert backend.name == "vllm-a-fd00-10-244-17"


@pytest.mark.parametrize(
    ("target", "address", "expected"),
    [
        ({"kind": "Pod", "name": "vllm-b-1"}, "10.0.0.1", "vllm-b-1"),
        ({"kind": "Node", "name": "gpu-1"}, "10.0.0.1", "vllm-b-10-0-0-1"),
        ({"kind": "Pod", "name": "x" * 80}, "10.0.0.1", "vllm-b-10-0-0-1"),
        ({}, "a" * 70 + ".example", None),
    ],
)
def test_backend_names_are_always_valid(target: dict[str, str], address: str, expected: str | None) -> None:
    name = backend_name("vllm-b", target, address)
    assert len(name) <= 64
    if expected is not None:
        assert name == expected
    else:
        assert name.startswith("vllm-b-") and name == backend_name("vllm-b", target, address)
