"""The whole operating loop with real tools: Prometheus scrapes the gateway, its rules fire, Alertmanager
calls the gateway's webhook, the gateway drains the failing backend, and undrains it when the alert resolves.

Prometheus and Alertmanager run the project's own files (deploy/prometheus, deploy/alertmanager), adapted
for a test: this test's targets and URLs, 1 s intervals, every alert's `for` and every rate window cut to
seconds, Alertmanager's grouping waits cut to a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
import yaml

from tests.component.test_prometheus_e2e import (  # noqa: F401 (prometheus is a fixture)
    eventually,
    launch,
    prometheus,
    scrape_config,
    stop_all,
)
from tests.component.test_prometheus_rules import ALERTMANAGER_CONFIG, tool
from tests.conftest import API_KEY, StartFake, StartGateway, free_port

ADMIN = "admin-key-0123456789"
WINDOW = "[6s]"  # every rate window of the rules: the alert resolves seconds after the failures stop


def quick_rules(directory: Path) -> None:
    """Cut the rate windows of the rule copies scrape_config wrote (their `for` is already short)."""
    for path in directory.glob("*.yml"):
        if path.name != "prometheus.yml":
            path.write_text(re.sub(r"\[\d+[smhd]\]", WINDOW, path.read_text()))


def alertmanager_config(directory: Path, gateway_url: str) -> Path:
    """deploy/alertmanager/alertmanager.yml with the gateway's webhook and waits of a second."""
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    directory.mkdir(parents=True, exist_ok=True)
    key = directory / "admin-key"
    key.write_text(ADMIN)
    for route in [config["route"], *config["route"].get("routes", [])]:
        route.update(group_wait="1s", group_interval="1s")
    for receiver in config["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            if receiver["name"] == "sluice-auto-repair":
                hook["url"] = gateway_url + "/admin/alerts"
                hook["http_config"]["authorization"]["credentials_file"] = str(key)
            else:
                hook["url"] = "http://127.0.0.1:9/people"  # nobody listens: people are not part of this test
    path = directory / "alertmanager.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture
async def alertmanager(tmp_path: Path) -> AsyncIterator[Callable[[Path], Awaitable[str]]]:
    """Start a real Alertmanager (no clustering) on a free port; returns its URL once ready."""
    processes: list[subprocess.Popen[bytes]] = []

    async def start(config: Path) -> str:
        port = free_port()
        argv = [tool("prometheus-alertmanager"), f"--config.file={config}", f"--storage.path={tmp_path / 'am'}",
                f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address=", "--log.level=warn"]  # fmt: skip
        return await launch(argv, f"http://127.0.0.1:{port}", tmp_path / "alertmanager.log", processes)

    yield start
    stop_all(processes)


async def test_a_failing_backend_is_drained_by_its_alert_and_undrained_when_it_resolves(
    tmp_path: Path,
    fake: StartFake,
    gateway: StartGateway,
    prometheus: Callable[[Path], Awaitable[str]],  # noqa: F811
    alertmanager: Callable[[Path], Awaitable[str]],
) -> None:
    engines = {"b0": await fake("base"), "b1": await fake("base")}
    gw = await gateway(
        list(engines.values()),
        auth={"admin_key": ADMIN, "api_keys": [{"name": "test", "key": API_KEY}]},
        repair={"enabled": True},
        routing={"strategy": "round_robin"},
        # No circuit breaker: it would stop b1's attempts after the first burst of failures, and that burst
        # alone can fall before Prometheus's first scrape of the retry counter's new series (rate() sees a
        # series born at 5 as no increase). With every other request failing on b1 and retried on b0, the
        # error rate holds for as long as the test needs it.
        breaker={"enabled": False},
    )
    am_url = await alertmanager(alertmanager_config(tmp_path / "am-config", gw.url))
    config_path = scrape_config(tmp_path, gw.url, engines)
    quick_rules(tmp_path)
    config = yaml.safe_load(config_path.read_text())
    config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [am_url.removeprefix("http://")]}]}]}
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    await prometheus(config_path)

    answered: list[int] = []

    async def traffic() -> None:
        body = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_KEY}"}) as client:
            while True:
                async with client.post(gw.url + "/v1/chat/completions", json=body) as response:
                    answered.append(response.status)
                await asyncio.sleep(0.05)

    sender = asyncio.create_task(traffic())
    try:
        engines["b1"].settings.fail = "500"  # every answer of b1 fails; the gateway retries them on b0
        drained = gw.backends.by_name["b1"]

        async def is_drained() -> bool:
            return bool(drained.drained_by)

        await eventually(is_drained, "the alert to drain b1", timeout=40)
        assert drained.drained_by == frozenset({"SluiceBackendErrorRateHigh"})
        assert not gw.backends.by_name["b0"].drained_by
        before = engines["b1"].stats.requests_total
        await asyncio.sleep(1)
        assert engines["b1"].stats.requests_total == before, "a drained backend gets no requests"
        engines["b1"].settings.fail = None

        async def is_undrained() -> bool:
            return not drained.drained_by

        await eventually(is_undrained, "the resolved alert to undrain b1", timeout=40)
        assert drained in gw.backends.serving("base")  # takes new requests (once its circuit lets them)
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
    assert set(answered) == {200}, "retries and the drain kept every request answered"
    page = gw.metrics.render().decode()
    assert 'sluice_repair_actions_total{action="drain",alert="SluiceBackendErrorRateHigh",outcome="done"} 1.0' in page
    assert 'sluice_repair_actions_total{action="undrain",alert="SluiceBackendErrorRateHigh",outcome="done"} 1.0' in page
