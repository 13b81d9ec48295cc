"""A real Prometheus scraping an in-process gateway and two fake vLLM engines with deploy/prometheus's
configuration and rules: the series arrive, and a backend that goes away raises SluiceBackendDown.

The configuration is derived from deploy/prometheus/prometheus.yml (job names, paths, labels) with the
targets replaced and every interval at 1 s; the rules are the real ones with each alert's `for` cut to a few
seconds. Prometheus comes from the Debian package `prometheus` (`make system-deps`).
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from sluice.testing.fake_vllm import FakeVLLM
from tests.component.test_prometheus_rules import PROMETHEUS_CONFIG, RULE_FILES, tool
from tests.conftest import API_KEY, StartFake, StartGateway, free_port

ALERT_FOR = "3s"  # every alert's `for`: long enough to see it pending at 1 s evaluations, short for a test


def host_port(url: str) -> str:
    return url.removeprefix("http://").rstrip("/")


def shortened_rules(directory: Path) -> list[str]:
    """The real rules, each alert's `for` shortened; recording rules and expressions untouched."""
    paths = []
    for source in RULE_FILES:
        document = yaml.safe_load(source.read_text())
        for group in document["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    rule["for"] = ALERT_FOR
        path = directory / source.name
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        paths.append(str(path))
    return paths


def scrape_config(directory: Path, gateway_url: str, engines: dict[str, FakeVLLM]) -> Path:
    """deploy/prometheus/prometheus.yml with this test's targets and 1 s intervals."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config.pop("alerting")  # no Alertmanager here: the alerts are read from Prometheus's API
    config["rule_files"] = shortened_rules(directory)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    jobs["sluice"]["static_configs"] = [{"targets": [host_port(gateway_url)]}]
    jobs["vllm"]["static_configs"] = [
        {"targets": [host_port(engine.url)], "labels": {"backend": name}} for name, engine in engines.items()
    ]
    for job in jobs.values():
        job.update(scrape_interval="1s", scrape_timeout="1s")
    config["scrape_configs"] = [jobs["sluice"], jobs["vllm"]]
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


async def launch(argv: list[str], url: str, log: Path, processes: list[subprocess.Popen[bytes]]) -> str:
    """Start a Prometheus-style server and return `url` once its /-/ready answers 200 (15 s at most)."""
    process = subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    processes.append(process)
    async with aiohttp.ClientSession() as session:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()
            try:
                async with session.get(url + "/-/ready") as response:
                    if response.status == 200:
                        return url
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)
    pytest.fail(f"{argv[0]} did not become ready: " + log.read_text())


def stop_all(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
async def prometheus(tmp_path: Path) -> AsyncIterator[Callable[[Path], Awaitable[str]]]:
    """Start a real Prometheus on a free port with a configuration file; returns its URL once ready."""
    processes: list[subprocess.Popen[bytes]] = []

    async def start(config: Path) -> str:
        port = free_port()
        argv = [
            tool("prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ]
        return await launch(argv, f"http://127.0.0.1:{port}", tmp_path / "prometheus.log", processes)

    yield start
    stop_all(processes)


async def api(session: aiohttp.ClientSession, url: str, path: str, **params: str) -> Any:
    async with session.get(url + path, params=params) as response:
        payload = await response.json()
        assert payload["status"] == "success", payload
        return payload["data"]


async def eventually(check: Callable[[], Awaitable[Any]], what: str, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


async def test_prometheus_scrapes_the_gateway_and_engines_and_fires_backend_down(
    tmp_path: Path, fake: StartFake, gateway: StartGateway, prometheus: Callable[[Path], Awaitable[str]]
) -> None:
    engines = {"b0": await fake("base"), "b1": await fake("base")}
    gw = await gateway(list(engines.values()))  # the fixture names them b0, b1 in this order
    body = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_KEY}"}) as client,
        client.post(gw.url + "/v1/chat/completions", json=body) as response,
    ):
        assert response.status == 200, await response.text()

    url = await prometheus(scrape_config(tmp_path, gw.url, engines))
    async with aiohttp.ClientSession() as session:

        async def query(expr: str) -> list[dict[str, Any]]:
            data = await api(session, url, "/api/v1/query", query=expr)
            result: list[dict[str, Any]] = data["result"]
            return result

        requests = await eventually(lambda: query('sluice_requests_total{route="chat"}'), "the gateway's series")
        assert requests[0]["metric"]["job"] == "sluice"
        running = await eventually(lambda: query("vllm:num_requests_running"), "both engines' series")
        await eventually(lambda: query('count(up{job="vllm"} == 1) == 2'), "both engines scraped")
        running = await query("vllm:num_requests_running")
        assert {series["metric"]["backend"] for series in running} == {"b0", "b1"}
        assert await query("max by (backend) (sluice_backend_up) == 1")

        await engines["b1"].close()
        states: list[str] = []

        async def backend_down_state() -> bool:
            data = await api(session, url, "/api/v1/alerts")
            for alert in data["alerts"]:
                labels = alert["labels"]
                if labels["alertname"] == "SluiceBackendDown":
                    assert labels["backend"] == "b1", alert
                    assert labels["severity"] == "warning"
                    if not states or states[-1] != alert["state"]:
                        states.append(alert["state"])
            return bool(states) and states[-1] == "firing"

        await eventually(backend_down_state, "SluiceBackendDown to fire", timeout=20)
        assert states == ["pending", "firing"]
        assert await query('sluice_backend_up{backend="b0"} == 1'), "the other backend stays up"
