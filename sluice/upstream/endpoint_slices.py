"""Which backends a Service's EndpointSlices describe: one per ready pod, on the pool's port.

Pure functions over the API's JSON (`discovery.k8s.io/v1`), so recorded responses test them directly.
An endpoint counts while it is ready and not terminating (an absent `ready` means ready, as the API says);
a terminating pod leaves the pool at once and finishes what it has in flight. Only an endpoint's first
address is used: the API calls the others fungible. A pod listed by two slices (they overlap while the
controller moves endpoints) is one backend. The backend is named after its pod, which is also the
`pod` label Prometheus' Kubernetes discovery gives the engine's target.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

from sluice.config import NAME_PATTERN, BackendConfig, KubernetesPoolConfig

SERVICE_LABEL = "kubernetes.io/service-name"
_NAME = re.compile(NAME_PATTERN)


def label_selector(pool: KubernetesPoolConfig) -> str:
    return f"{SERVICE_LABEL}={pool.service}"


def pool_backends(pool: KubernetesPoolConfig, slices: Iterable[Mapping[str, Any]]) -> tuple[BackendConfig, ...]:
    """The backends of `pool` that `slices` (its EndpointSlices, as JSON) say can take requests now."""
    found: dict[str, BackendConfig] = {}
    for item in slices:
        port = slice_port(item, pool.port)
        if port is None:
            continue
        for endpoint in item.get("endpoints") or ():
            conditions = endpoint.get("conditions") or {}
            if conditions.get("ready") is False or conditions.get("terminating") is True:
                continue
            addresses = endpoint.get("addresses") or ()
            if not addresses:
                continue
            address = str(addresses[0])
            name = backend_name(pool.service, endpoint.get("targetRef") or {}, address)
            if name not in found:
                found[name] = BackendConfig(
                    name=name,
                    url=f"http://[{address}]:{port}" if ":" in address else f"http://{address}:{port}",
                    weight=pool.weight,
                    api_key=pool.api_key,
                    models=pool.models,
                    max_concurrency=pool.max_concurrency,
                    max_loras=pool.max_loras,
                )
    return tuple(found[name] for name in sorted(found))


def slice_port(item: Mapping[str, Any], wanted: str | int) -> int | None:
    """The port number of the pool's port in this slice: by Service port name, or by number."""
    for port in item.get("ports") or ():
        number = port.get("port")
        if not isinstance(number, int):
            continue
        if (isinstance(wanted, int) and number == wanted) or (isinstance(wanted, str) and port.get("name") == wanted):
            return number
    return None


def backend_name(service: str, target: Mapping[str, Any], address: str) -> str:
    """The pod's name when the endpoint points at a pod (a valid backend name), else service + address."""
    if target.get("kind") == "Pod" and isinstance(target.get("name"), str) and _NAME.match(target["name"]):
        return str(target["name"])
    readable = f"{service}-{re.sub(r'[^A-Za-z0-9]+', '-', address)}"
    if _NAME.match(readable):
        return readable
    return f"{service[:50]}-{hashlib.blake2b(address.encode(), digest_size=6).hexdigest()}"
