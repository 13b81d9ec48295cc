"""The Prometheus and Alertmanager configuration in deploy/: valid for the real tools, unit-tested, documented,
and written against metrics the gateway and vLLM really expose.

promtool and amtool come from the Debian packages `prometheus` and `prometheus-alertmanager`, which
`make test` installs (`make system-deps`); without them these tests fail rather than skip.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import API_KEY, StartFake, StartGateway

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS / "prometheus.yml"
KUBERNETES_CONFIG = PROMETHEUS / "kubernetes-scrape.yml"
K8S_BASE = ROOT / "deploy" / "k8s" / "base"
RULE_FILES = sorted((PROMETHEUS / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROMETHEUS / "tests").glob("*.yml"))
ALERTMANAGER_CONFIG = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
RUNBOOK = ROOT / "docs" / "operations.md"
RUNBOOK_URL = "https://git.example.com/sluice/blob/main/docs/operations.md#"
SEVERITIES = {"critical", "warning"}
# The alerts the gateway's automatic repair (POST /admin/alerts) acts on, by these names and a `backend` label.
AUTO_REPAIR_ALERTS = {"VLLMKVCacheSaturated", "SluiceBackendErrorRateHigh"}

# Metrics the rules use before the gateway exposes them (a rule may be written ahead of its metric). Remove
# a name once the gateway exports it: the test below fails when a name here appears, so the set cannot go
# stale. (sluice_model_backends_healthy and sluice_dependency_up were here until the gateway got them.)
GATEWAY_METRICS_TO_BE_ADDED: set[str] = set()

# Real vLLM metrics the rules use that the fake (sluice/testing/fake_vllm_metrics.py) does not expose.
REAL_VLLM_ONLY = {
    "vllm:gpu_cache_usage_perc",  # the KV-cache gauge's name before vLLM renamed it vllm:kv_cache_usage_perc
}

METRIC_NAME = re.compile(r"(?<![\w:])(sluice_[a-z0-9_]+|vllm:[a-z0-9_:]+)")


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is not installed: run `make system-deps` (Debian packages prometheus and "
            "prometheus-alertmanager) or `apt-get install -y prometheus prometheus-alertmanager`"
        )
    return path


def run(*command: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{output}"
    return output


def rules() -> Iterator[dict[str, Any]]:
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            yield from group["rules"]


def alerts() -> list[dict[str, Any]]:
    return [rule for rule in rules() if "alert" in rule]


def used_metrics(prefix: str) -> set[str]:
    return {name for rule in rules() for name in METRIC_NAME.findall(rule["expr"]) if name.startswith(prefix)}


def exposed_names(text: str) -> set[str]:
    """Every series name a scrape of this exposition yields, families without samples yet included."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("", "_sum", "_count")}
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def runbook_anchors() -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+\s+(.+?)\s*$", RUNBOOK.read_text(), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading).strip().lower().replace(" ", "-") for heading in headings}


def test_the_prometheus_configuration_is_valid() -> None:
    output = run(tool("promtool"), "check", "config", str(PROMETHEUS_CONFIG))
    assert f"{len(RULE_FILES)} rule files found" in output


def test_the_kubernetes_scrape_configuration_is_valid_and_labels_engines_by_pod(tmp_path: Path) -> None:
    """Debian's Prometheus is built without Kubernetes service discovery, so promtool checks the file with
    each job's kubernetes_sd_configs swapped for a static target: everything else (relabelling, rules,
    alerting) is checked as written. The discovery part is checked against the manifests' labels."""
    config = yaml.safe_load(KUBERNETES_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"sluice", "vllm"}  # the job names the rules select on
    pods: dict[str, dict[str, Any]] = {}
    for path in K8S_BASE.glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] in ("Deployment", "StatefulSet"):
                pods[doc["metadata"]["name"]] = doc["spec"]["template"]["metadata"]["labels"]
    for name, job in jobs.items():
        (sd,) = job.pop("kubernetes_sd_configs")
        assert sd["role"] == "pod" and sd["namespaces"]["names"] == ["sluice"]
        component_label = ["__meta_kubernetes_pod_label_app_kubernetes_io_component"]
        keeps = [r for r in job["relabel_configs"] if r.get("action") == "keep"]
        (component,) = [r["regex"] for r in keeps if r["source_labels"] == component_label]
        kept = sorted(n for n, labels in pods.items() if labels.get("app.kubernetes.io/component") == component)
        assert kept == (["sluice"] if name == "sluice" else ["vllm-a", "vllm-b", "vllm-c"]), (name, kept)
        job["static_configs"] = [{"targets": ["placeholder:8000"]}]
    (backend,) = [r for r in jobs["vllm"]["relabel_configs"] if r.get("target_label") == "backend"]
    assert backend["source_labels"] == ["__meta_kubernetes_pod_name"]  # = the discovered backend's name
    config["rule_files"] = [str(PROMETHEUS / "rules" / "*.yml")]
    copy = tmp_path / "kubernetes-scrape.yml"
    copy.write_text(yaml.safe_dump(config))
    output = run(tool("promtool"), "check", "config", str(copy))
    assert f"{len(RULE_FILES)} rule files found" in output


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_the_rules_are_valid(path: Path) -> None:
    run(tool("promtool"), "check", "rules", str(path))


def test_the_rule_unit_tests_pass() -> None:
    assert RULE_TESTS
    run(tool("promtool"), "test", "rules", *map(str, RULE_TESTS))


def test_the_alertmanager_configuration_is_valid() -> None:
    run(tool("amtool"), "check-config", str(ALERTMANAGER_CONFIG))


def test_every_alert_has_a_severity_a_summary_and_a_runbook_section() -> None:
    anchors = runbook_anchors()
    names = [alert["alert"] for alert in alerts()]
    assert len(names) == len(set(names)), "an alert name is used twice"
    for alert in alerts():
        name = alert["alert"]
        assert alert.get("labels", {}).get("severity") in SEVERITIES, f"{name}: severity not one of {SEVERITIES}"
        annotations = alert.get("annotations", {})
        assert annotations.get("summary"), f"{name}: no summary"
        assert annotations.get("runbook_url") == RUNBOOK_URL + name.lower(), f"{name}: runbook_url"
        assert name.lower() in anchors, f"{name}: no section `{name}` in docs/operations.md"
        assert "for" in alert, f"{name}: no `for` (write `for: 0m` to fire at once on purpose)"


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {alert["alert"] for alert in alerts()}
    assert names - firing == set(), "alerts without a test where they fire"
    assert names - quiet == set(), "alerts without a test where they do not fire"
    assert firing | quiet <= names, "tests of alerts that do not exist"


def test_the_auto_repair_alerts_exist_with_a_backend_label_and_are_routed_to_the_gateway() -> None:
    by_name = {alert["alert"]: alert for alert in alerts()}
    for name in AUTO_REPAIR_ALERTS:
        assert name in by_name
        assert "backend" in by_name[name]["expr"], f"{name} must keep the `backend` label"
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    receivers = {receiver["name"]: receiver for receiver in config["receivers"]}
    repair = next(route for route in config["route"]["routes"] if route["receiver"] == "sluice-auto-repair")
    assert all(name in repair["matchers"][0] for name in AUTO_REPAIR_ALERTS)
    assert repair["continue"] is True, "the repair route must not stop the alerts from reaching people"
    (webhook,) = receivers["sluice-auto-repair"]["webhook_configs"]
    assert webhook["url"].endswith("/admin/alerts")
    assert webhook["http_config"]["authorization"]["credentials_file"]


def test_every_vllm_metric_the_rules_use_is_exposed_by_the_fake_or_a_known_real_name() -> None:
    used = used_metrics("vllm:")
    assert used, "no vllm: metric found in the rules (the name pattern is broken?)"
    assert used >= REAL_VLLM_ONLY, "REAL_VLLM_ONLY lists a name the rules no longer use"


async def test_every_sluice_metric_the_rules_use_is_one_the_gateway_exposes(
    fake: StartFake, gateway: StartGateway
) -> None:
    backend = await fake("base")
    embedder = await fake("embedder")
    gw = await gateway(
        [backend],
        cache={"enabled": True, "embedder": {"kind": "openai", "url": embedder.url, "model": "embedder"}},
        rate_limits={"per_ip": {"requests": {"rate": 1000, "burst": 1000}}},
    )
    assert gw.audit is not None and gw.cache is not None
    body = {"model": "base", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "temperature": 0}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_KEY}"}) as session:
        async with session.post(gw.url + "/v1/chat/completions", json=body) as response:
            assert response.status == 200, await response.text()
        async with session.get(gw.url + "/metrics") as response:
            gateway_names = exposed_names(await response.text())
        async with session.get(backend.url + "/metrics") as response:
            vllm_names = exposed_names(await response.text())

    appeared = GATEWAY_METRICS_TO_BE_ADDED & {name.removesuffix("_total") for name in gateway_names}
    assert not appeared, f"the gateway now exposes {appeared}: remove them from GATEWAY_METRICS_TO_BE_ADDED"
    missing = used_metrics("sluice_") - gateway_names - GATEWAY_METRICS_TO_BE_ADDED
    assert not missing, f"the rules use sluice metrics the gateway does not expose: {sorted(missing)}"

    missing = used_metrics("vllm:") - vllm_names - REAL_VLLM_ONLY
    assert not missing, f"the rules use vllm metrics the fake does not expose: {sorted(missing)}"
    assert not REAL_VLLM_ONLY & vllm_names, "the fake now exposes a name listed in REAL_VLLM_ONLY: remove it there"
