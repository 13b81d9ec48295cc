"""Backends found through the Kubernetes API: the ready pods behind each configured vLLM Service.

For each pool of `discovery.kubernetes` a thread lists the Service's EndpointSlices with the official
client, then watches them from the list's resourceVersion, renewing the watch every `watch_timeout`
seconds. Every change hands the pool's backends (`endpoint_slices.pool_backends`) to `on_change` on the
event loop; the gateway feeds them to the same backend pool as configured ones (`Gateway`), health-checked
before they take traffic. A watch that expired (410 Gone) lists again; an API that fails keeps the last
known backends and is retried after `retry` seconds, doubling up to a minute. The client is synchronous,
hence the threads; it is imported only when discovery is configured (extra `sluice[kubernetes]`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from sluice.config import BackendConfig, KubernetesDiscoveryConfig, KubernetesPoolConfig
from sluice.upstream.endpoint_slices import label_selector, pool_backends

log = logging.getLogger("sluice.discovery")

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
MAX_RETRY = 60.0
FIRST_LIST_WAIT = 10.0  # start-up waits this long for every pool's first list
OnChange = Callable[[str, tuple[BackendConfig, ...]], None]


class KubernetesDiscovery:
    def __init__(self, settings: KubernetesDiscoveryConfig, on_change: OnChange) -> None:
        self.settings = settings
        self._on_change = on_change
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._listed: dict[str, asyncio.Event] = {}
        self._failing: set[str] = set()  # pools whose last API call failed
        self.namespace = ""

    @property
    def api_up(self) -> bool:
        return not self._failing

    async def start(self) -> None:
        """Connect with the pod's service account (or `kubeconfig`), start watching, and wait (up to 10 s)
        for each pool's first list or first failure, so the gateway starts knowing its backends."""
        api_client, self.namespace = await asyncio.to_thread(self._connect)
        loop = asyncio.get_running_loop()
        api = client.DiscoveryV1Api(api_client)
        for pool in self.settings.pools:
            listed = self._listed[pool.service] = asyncio.Event()
            thread = threading.Thread(
                target=self._follow, args=(api, pool, loop, listed), name=f"k8s-{pool.service}", daemon=True
            )
            self._threads.append(thread)
            thread.start()
        waiting = [asyncio.create_task(event.wait()) for event in self._listed.values()]
        _, pending = await asyncio.wait(waiting, timeout=FIRST_LIST_WAIT)
        for task in pending:
            task.cancel()
        if pending:
            log.warning("kubernetes discovery: starting before every pool was listed; they join when listed")

    def _connect(self) -> tuple[client.ApiClient, str]:
        configuration = client.Configuration()
        namespace = self.settings.namespace
        if self.settings.kubeconfig is not None:
            config.load_kube_config(config_file=self.settings.kubeconfig, client_configuration=configuration)
            if namespace is None:
                _, active = config.list_kube_config_contexts(self.settings.kubeconfig)
                namespace = (active.get("context") or {}).get("namespace") or "default"
        else:
            config.load_incluster_config(client_configuration=configuration)
            if namespace is None:
                namespace = SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
        return client.ApiClient(configuration), namespace

    async def close(self) -> None:
        """Stop the watches; a thread blocked on the API notices within its next event or timeout."""
        self._stop.set()

        def join() -> None:
            for thread in self._threads:
                thread.join(0.5)

        await asyncio.to_thread(join)

    def _follow(
        self, api: client.DiscoveryV1Api, pool: KubernetesPoolConfig, loop: asyncio.AbstractEventLoop,
        listed: asyncio.Event,
    ) -> None:  # fmt: skip
        """The pool's list-then-watch loop (its own thread), until `close`."""
        pause = self.settings.retry
        while not self._stop.is_set():
            try:
                slices, version = self._list(api, pool)
                self._publish(loop, pool, slices, listed)
                self._failing.discard(pool.service)
                pause = self.settings.retry
                while not self._stop.is_set():  # renewed watches continue from the last version seen
                    version = self._watch(api, pool, slices, version, loop, listed)
            except ApiException as exc:
                if exc.status == 410:  # the version we watch from is too old: list again
                    log.info("kubernetes discovery: watch expired, listing again", extra={"service": pool.service})
                    continue
                self._failed(pool, f"HTTP {exc.status} {exc.reason}", pause, loop, listed)
            except Exception as exc:  # connection refused, timeouts, bad JSON: keep the last backends
                self._failed(pool, f"{type(exc).__name__}: {exc}", pause, loop, listed)
            if self._stop.wait(pause):
                return
            pause = min(pause * 2, MAX_RETRY)

    def _failed(self, pool: KubernetesPoolConfig, reason: str, pause: float, loop: asyncio.AbstractEventLoop,
        settled: asyncio.Event,
    ) -> None:  # fmt: skip
        if self._stop.is_set():  # closing cut the watch
            return
        self._failing.add(pool.service)
        with contextlib.suppress(RuntimeError):  # start-up need not wait for an API that fails
            loop.call_soon_threadsafe(settled.set)
        log.warning(
            "kubernetes discovery: API call failed; keeping the last known backends",
            extra={"service": pool.service, "error": reason, "retry_in": pause},
        )

    def _list(self, api: client.DiscoveryV1Api, pool: KubernetesPoolConfig) -> tuple[dict[str, Any], str]:
        response: Any = api.list_namespaced_endpoint_slice(  # the raw HTTP response (no preload)
            self.namespace,
            label_selector=label_selector(pool),
            _preload_content=False,
            _request_timeout=(10, 30),
        )
        try:
            body = json.loads(response.data)
        finally:
            response.release_conn()
        slices = {item["metadata"]["name"]: item for item in body.get("items") or ()}
        return slices, str(body["metadata"]["resourceVersion"])

    def _watch(
        self, api: client.DiscoveryV1Api, pool: KubernetesPoolConfig, slices: dict[str, Any], version: str,
        loop: asyncio.AbstractEventLoop, listed: asyncio.Event,
    ) -> str:  # fmt: skip
        """Apply events from `version` until the watch ends; the version to continue from."""
        watcher = watch.Watch()
        timeout = int(self.settings.watch_timeout)
        events = watcher.stream(
            api.list_namespaced_endpoint_slice,
            self.namespace,
            label_selector=label_selector(pool),
            resource_version=version,
            allow_watch_bookmarks=True,
            timeout_seconds=timeout,
            _request_timeout=(10, timeout + 15),
        )
        for event in events:
            if self._stop.is_set():
                watcher.stop()
                break
            kind, item = event["type"], event["raw_object"]
            version = str((item.get("metadata") or {}).get("resourceVersion") or version)
            name = (item.get("metadata") or {}).get("name")
            if kind in ("ADDED", "MODIFIED") and name:
                slices[name] = item
            elif kind == "DELETED" and name:
                slices.pop(name, None)
            else:  # BOOKMARK: only the version moves
                continue
            self._publish(loop, pool, slices, listed)
        return version

    def _publish(
        self, loop: asyncio.AbstractEventLoop, pool: KubernetesPoolConfig, slices: dict[str, Any],
        listed: asyncio.Event,
    ) -> None:  # fmt: skip
        backends = pool_backends(pool, slices.values())

        def deliver() -> None:
            self._on_change(pool.service, backends)
            listed.set()

        try:
            loop.call_soon_threadsafe(deliver)
        except RuntimeError:  # the loop is closed: the gateway is gone
            self._stop.set()
