"""The Grafana dashboards and the log-shipping configuration agree with what the gateway really exposes.

Each dashboard parses and is well formed; every query goes to a provisioned data source; every metric a
PromQL expression names is on the /metrics page of a real in-process gateway or of the fake vLLM (or on a
short, commented list of real-vLLM names the fake lacks); promtool, where installed, parses every
expression. Promtail's configuration gives Loki only low-cardinality labels, and the dashboards' LogQL
selectors use only those.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.conftest import API_KEY, StartFake, StartGateway

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
GRAFANA = DEPLOY / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
EXPECTED_DASHBOARDS = {"overview", "backends", "cache-and-limits", "data-layer"}
PROMTAIL = DEPLOY / "promtail" / "promtail.yml"
LOKI = DEPLOY / "loki" / "loki.yml"

# Real vLLM series the fake does not produce (their panels are empty against the fake, filled on real vLLM).
VLLM_NOT_IN_FAKE = {
    "vllm:gpu_cache_usage_perc",  # vLLM before the rename to kv_cache_usage_perc; queried after an `or`
    "vllm:num_preemptions_total",  # the fake never preempts a request
    "vllm:request_queue_time_seconds_bucket",  # the fake does not time its scheduler queue
}
# Series Prometheus itself writes for every scrape target.
PROMETHEUS_OWN = {"up"}

# Labels Loki may index: each distinct combination is a stream, so only bounded values.
ALLOWED_LOG_LABELS = {"job", "host", "container", "level", "logger"}
FORBIDDEN_LOG_LABELS = {
    "request_id", "key", "user", "tenant", "path", "client_ip", "model", "served_model", "status",
    "msg", "error", "duration_ms", "ttft_ms", "id", "ts", "filename",
}  # fmt: skip

GRAFANA_VARIABLES = {"__rate_interval", "__interval", "__range", "__range_s", "__interval_ms"}
PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
    "offset", "inf", "nan", "atan2",
}  # fmt: skip
CHARTS = {"timeseries", "stat", "gauge"}


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside collapsed rows."""
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], str]]:
    """(where, datasource, query) for every panel target and every query variable."""
    for panel in all_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            datasource = target.get("datasource") or panel.get("datasource") or {}
            yield f"panel {panel['id']} {panel['title']!r} {target['refId']}", datasource, target["expr"]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            yield f"variable ${var['name']}", var["datasource"], query


def prometheus_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for where, datasource, query in queries(dashboard):
        if datasource.get("type") == "prometheus":
            yield where, query


def promql_expression(query: str) -> str:
    """A variable's `label_values(expr, label)` is the expression; anything else already is one."""
    found = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", query, re.S)
    return found.group(1) if found else query


def metric_names(expr: str) -> set[str]:
    """Metric names of a PromQL expression: identifiers that are not functions, keywords or labels."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # strings: label values, regexes
    expr = re.sub(r"\{[^}]*\}", " ", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # ranges and subqueries
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)  # label lists
    expr = re.sub(r"\$\{?\w+\}?", " ", expr)  # Grafana variables
    names = set()
    for match in re.finditer(r"(?<![\w:.])([A-Za-z_:][\w:]*)(\s*\()?", expr):
        name, call = match.groups()
        if not call and name.lower() not in PROMQL_KEYWORDS:
            names.add(name)
    return names


def grafana_variables(query: str) -> set[str]:
    return set(re.findall(r"\$\{?(\w+)", query))


def exposed(page: str) -> set[str]:
    """Series names a /metrics page offers, including those of families with no sample yet."""
    names = set()
    for line in page.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else {name}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


def provisioned_datasources() -> dict[str, str]:
    """uid → type of the data sources Grafana is provisioned with."""
    config = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "datasources.yml").read_text())
    return {source["uid"]: source["type"] for source in config["datasources"]}


# ------------------------------------------------------------------------------------------ dashboards


def test_every_dashboard_is_there_and_provisioned() -> None:
    assert {path.stem for path in DASHBOARDS} == EXPECTED_DASHBOARDS
    uids = [load(path)["uid"] for path in DASHBOARDS]
    assert len(set(uids)) == len(uids), uids
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "dashboards.yml").read_text())["providers"]
    assert [p["type"] for p in providers] == ["file"]
    assert providers[0]["options"]["path"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_is_well_formed(path: Path) -> None:
    dashboard = load(path)
    assert re.fullmatch(r"[a-z0-9-]{1,40}", dashboard["uid"])
    assert dashboard["title"].startswith("Sluice / ")
    assert dashboard["schemaVersion"] >= 36
    assert dashboard.get("id") is None  # provisioned dashboards get their id from Grafana
    panels = list(all_panels(dashboard["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids in {path.name}"
    for panel in panels:
        assert panel.get("title"), panel
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys() and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["targets"], f"{panel['title']!r} has no query"
        assert [t["refId"] for t in panel["targets"]] == sorted({t["refId"] for t in panel["targets"]})
        if panel["type"] in CHARTS:
            assert panel["fieldConfig"]["defaults"].get("unit"), f"{panel['title']!r} has no unit"
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        for cell in (
            (x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])
        ):
            assert cell not in cells, f"{panel['title']!r} overlaps {cells[cell]!r}"
            cells[cell] = panel["title"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_queries_use_provisioned_datasources_and_defined_variables(path: Path) -> None:
    sources = provisioned_datasources()
    assert sources == {"prometheus": "prometheus", "loki": "loki"}
    dashboard = load(path)
    defined = {var["name"] for var in dashboard["templating"]["list"]} | GRAFANA_VARIABLES
    for panel in all_panels(dashboard["panels"]):
        if panel["type"] != "row":
            assert sources.get(panel["datasource"]["uid"]) == panel["datasource"]["type"], panel["title"]
    for where, datasource, query in queries(dashboard):
        assert sources.get(str(datasource.get("uid"))) == datasource.get("type"), f"{where}: {datasource}"
        assert grafana_variables(query) <= defined, f"{where}: undefined variable in {query}"


def test_metric_name_parser() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, model) (rate(sluice_ttft_bucket{model=~"$model", x="a{b}"}'
        "[$__rate_interval]))) / ignoring(kind) group_left sum without (le) (vllm:kv_cache_usage_perc offset 5m) "
        'or on (instance) up{job="vllm"} > bool 0 unless label_replace(foo, "d", "$1", "s", "(.*)")'
    )
    assert metric_names(expr) == {"sluice_ttft_bucket", "vllm:kv_cache_usage_perc", "up", "foo"}
    assert metric_names(promql_expression("label_values(sluice_backend_up, backend)")) == {"sluice_backend_up"}


async def test_panel_metrics_are_exposed(fake: StartFake, gateway: StartGateway) -> None:
    """Every metric in every PromQL query is on a real gateway's or the fake vLLM's /metrics page."""
    engine = await fake("base")
    gw = await gateway([engine], cache={"enabled": True, "semantic": {"enabled": False}})
    async with aiohttp.ClientSession(headers={"authorization": f"Bearer {API_KEY}"}) as session:
        for stream in (False, True, True):  # the second stream is a cache hit, replayed
            body = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
            async with session.post(gw.url + "/v1/chat/completions", json={**body, "stream": stream}) as response:
                assert response.status == 200
                await response.read()
        pages = []
        for url in (gw.url, engine.url):
            async with session.get(url + "/metrics") as response:
                pages.append(await response.text())
    available = exposed(pages[0]) | exposed(pages[1])
    assert {"sluice_time_to_first_token_seconds_bucket", "sluice_cache_store_up", "sluice_audit_database_up",
            "sluice_backend_kv_cache_usage", "vllm:num_requests_running"} <= available  # fmt: skip
    allowed = available | VLLM_NOT_IN_FAKE | PROMETHEUS_OWN
    unknown = []
    for path in DASHBOARDS:
        for where, query in prometheus_queries(load(path)):
            names = metric_names(promql_expression(query))
            assert names, f"{path.name} {where}: no metric in {query}"
            unknown += [f"{path.name} {where}: {name}" for name in sorted(names - allowed)]
    assert not unknown, "metrics neither the gateway nor vLLM exposes:\n" + "\n".join(unknown)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promql_parses(tmp_path: Path) -> None:
    """promtool parses every expression (as a recording rule), with Grafana's variables filled in."""
    rules, wheres = [], {}
    for path in DASHBOARDS:
        for i, (where, query) in enumerate(prometheus_queries(load(path))):
            expr = promql_expression(query)
            expr = re.sub(r"\$__(?:rate_interval|interval|range)\b", "5m", expr)
            expr = re.sub(r"\$\{?\w+\}?", ".*", expr)
            record = f"check:{path.stem.replace('-', '_')}:{i}"
            rules.append({"record": record, "expr": expr})
            wheres[record] = f"{path.name} {where}"
    rule_file = tmp_path / "dashboards.rules.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run(["promtool", "check", "rules", str(rule_file)], capture_output=True, text=True)
    failing = [wheres[name] for name in re.findall(r'"(check:[^"]+)"', result.stdout + result.stderr)]
    assert result.returncode == 0, "\n".join([*failing, result.stdout, result.stderr])


# ------------------------------------------------------------------------------------------ logs


def promtail_labels(config: dict[str, Any]) -> set[str]:
    """Every label name promtail's configuration can give a stream."""
    labels: set[str] = set()
    for client in config["clients"]:
        labels |= set(client.get("external_labels", {}))
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            labels |= {name for name in static.get("labels", {}) if not name.startswith("__")}
        for relabel in job.get("relabel_configs", []):
            if relabel.get("action", "replace") == "replace" and "target_label" in relabel:
                labels.add(relabel["target_label"])
        for stage in job.get("pipeline_stages", []):
            labels |= set(stage.get("labels") or {})
            labels |= set(stage.get("static_labels") or {})
    return {name for name in labels if not name.startswith("__")}


def test_log_shipping_config() -> None:
    promtail = yaml.safe_load(PROMTAIL.read_text())
    loki = yaml.safe_load(LOKI.read_text())
    labels = promtail_labels(promtail)
    assert labels <= ALLOWED_LOG_LABELS and not labels & FORBIDDEN_LOG_LABELS, labels
    assert {"job", "level", "logger"} <= labels
    for job in promtail["scrape_configs"]:
        stages = job["pipeline_stages"]
        assert {"json", "labels", "labelallow"} <= {name for stage in stages for name in stage}, job["job_name"]
        allow = next(stage["labelallow"] for stage in stages if "labelallow" in stage)
        assert set(allow) <= ALLOWED_LOG_LABELS
    assert loki["limits_config"]["allow_structured_metadata"] is True
    assert loki["compactor"]["retention_enabled"] is True
    assert loki["schema_config"]["configs"][-1]["schema"] == "v13"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_log_panels_select_by_shipped_labels(path: Path) -> None:
    shipped = promtail_labels(yaml.safe_load(PROMTAIL.read_text()))
    for where, datasource, query in queries(load(path)):
        if datasource.get("type") == "loki":
            selector = re.match(r"\s*\{([^}]*)\}", query)
            assert selector, f"{where}: {query}"
            used = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector.group(1)))
            assert used <= shipped, f"{where}: {used - shipped} are not Loki labels"
