"""The Kubernetes deployment (deploy/k8s/) is valid and consistent, offline and without kubectl.

The base is rendered here the way `kubectl kustomize` would for what it uses (plain resource files and a
common label that does not touch selectors), and the production overlay's patches are applied with a small
strategic merge (lists of named items merged by name). Every object validates against the Kubernetes OpenAPI
schemas shipped by the `kubernetes-validate` package, strictly (unknown fields are errors). Then the checks a
schema cannot make: probes and resources on every workload, the gateway's /ready and /health probes, GPU
limits equal to each engine's tensor-parallel size, every Secret key documented by secret.example.yaml (which
is not applied), every host of the gateway configuration a Service of the manifests with that port, the
configuration loading with placeholder secrets, a drain that fits the grace period, and the HPA, PDB and
Services pointing at the pods they are meant for.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate  # the Kubernetes JSON schemas, offline (the test extra)
import pytest
import yaml

from sluice.config_loader import parse_config

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
BASE = K8S / "base"
PRODUCTION = K8S / "overlays" / "production"
SECRET_EXAMPLE = BASE / "secret.example.yaml"
# The oldest Kubernetes minor still commonly supported by managed offerings; the manifests use nothing newer.
KUBERNETES_VERSION = "1.30.0"
WORKLOAD_KINDS = ("Deployment", "StatefulSet")
GATEWAY = "sluice"
ENGINES = ("vllm-a", "vllm-b", "vllm-c")
PLACEHOLDER_ENV = {
    "SLUICE_API_KEY": "sk-placeholder-api-key-0000",
    "SLUICE_ADMIN_KEY": "placeholder-admin-key-0000",
    "SLUICE_KEY_SECRET": "placeholder-key-secret-0000000000000000",
    "POSTGRES_PASSWORD": "placeholder",
    "SLUICE_TRUSTED_PROXY_CIDR": "192.0.2.0/24",
}

Obj = dict[str, Any]


# ── Rendering ────────────────────────────────────────────────────────────────────────────────────────────


def load_documents(path: Path) -> list[Obj]:
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    assert all(isinstance(doc, dict) for doc in docs), path
    return docs


def kustomization(directory: Path) -> Obj:
    data = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert isinstance(data, dict)
    # Only what this renderer implements: anything else would make it silently diverge from kustomize.
    supported = {"apiVersion", "kind", "labels", "resources", "namespace", "images", "patches"}
    assert set(data) <= supported, f"{directory}: unsupported kustomization fields {set(data) - supported}"
    return data


def render_base() -> list[Obj]:
    kust = kustomization(BASE)
    objects: list[Obj] = []
    for name in kust["resources"]:
        objects.extend(load_documents(BASE / name))
    for entry in kust.get("labels", []):
        assert entry.get("includeSelectors") is False, "common labels must not change immutable selectors"
        for obj in objects:
            obj["metadata"].setdefault("labels", {}).update(entry["pairs"])
    return objects


def merge(base: Any, patch: Any) -> Any:
    """Strategic merge as far as these manifests need it: maps recursively, lists of named maps by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    if (
        isinstance(base, list)
        and isinstance(patch, list)
        and all(isinstance(i, dict) and "name" in i for i in base + patch)
    ):
        out_list = [copy.deepcopy(i) for i in base]
        for item in patch:
            index = next((n for n, b in enumerate(out_list) if b["name"] == item["name"]), None)
            if index is None:
                out_list.append(copy.deepcopy(item))
            else:
                out_list[index] = merge(out_list[index], item)
        return out_list
    return copy.deepcopy(patch)


def render_production() -> list[Obj]:
    kust = kustomization(PRODUCTION)
    assert kust["resources"] == ["../../base"]
    objects = render_base()
    for entry in kust.get("patches", []):
        for patch in load_documents(PRODUCTION / entry["path"]):
            key = (patch["kind"], patch["metadata"]["name"])
            matches = [n for n, obj in enumerate(objects) if (obj["kind"], obj["metadata"]["name"]) == key]
            assert len(matches) == 1, f"patch {entry['path']} targets {key}, which the base does not define once"
            objects[matches[0]] = merge(objects[matches[0]], patch)
    for obj in objects:
        obj["metadata"]["namespace"] = kust["namespace"]
        for container in containers(obj):
            for image in kust.get("images", []):
                name, _, _ = container["image"].rpartition(":")
                if name == image["name"]:
                    container["image"] = f"{image['newName']}:{image['newTag']}"
    return objects


@pytest.fixture(scope="module")
def objects() -> list[Obj]:
    return render_base()


@pytest.fixture(scope="module")
def production() -> list[Obj]:
    return render_production()


def find(objects: list[Obj], kind: str, name: str) -> Obj:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def workloads(objects: list[Obj]) -> Iterator[Obj]:
    return (o for o in objects if o["kind"] in WORKLOAD_KINDS)


def containers(obj: Obj) -> list[Obj]:
    if obj["kind"] not in WORKLOAD_KINDS:
        return []
    return list(obj["spec"]["template"]["spec"]["containers"])


def pod_labels(obj: Obj) -> dict[str, str]:
    return dict(obj["spec"]["template"]["metadata"]["labels"])


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def gateway_config(objects: list[Obj]) -> Obj:
    text = find(objects, "ConfigMap", "sluice-config")["data"]["sluice.yaml"]
    data = yaml.safe_load(text)
    assert isinstance(data, dict)
    return data


def strings(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)
    elif isinstance(node, str):
        yield node


def flag(args: list[str], name: str) -> str | None:
    for arg in args:
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
    return None


# ── Schema ───────────────────────────────────────────────────────────────────────────────────────────────


def validate(obj: Obj) -> None:
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {exc.message}")


def test_the_base_validates_against_the_kubernetes_schemas(objects: list[Obj]) -> None:
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Service", "ConfigMap", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= kinds
    assert {"StatefulSet", "PersistentVolumeClaim"} <= kinds
    for obj in objects:
        validate(obj)
    names = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(names) == len(set(names)), "duplicate objects"


def test_the_production_overlay_validates_and_changes_what_it_says(production: list[Obj]) -> None:
    for obj in production:
        validate(obj)
    gateway = find(production, "Deployment", GATEWAY)
    assert gateway["spec"]["replicas"] == 3
    (container,) = containers(gateway)
    assert container["image"].startswith("registry.example.com/")
    assert container["resources"]["requests"]["cpu"] == "2"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready", "the patch must not lose the probes"
    hpa = find(production, "HorizontalPodAutoscaler", GATEWAY)
    assert hpa["spec"]["maxReplicas"] > 6 and hpa["spec"]["minReplicas"] == 3


def test_the_secret_is_referenced_not_applied() -> None:
    resources = kustomization(BASE)["resources"]
    assert SECRET_EXAMPLE.name not in resources
    assert not any(o["kind"] == "Secret" for o in render_base()), "real Secrets are created out of band"
    (example,) = load_documents(SECRET_EXAMPLE)
    validate(example)


# ── Workloads ────────────────────────────────────────────────────────────────────────────────────────────


def test_every_workload_has_probes_and_resource_requests(objects: list[Obj]) -> None:
    for workload in workloads(objects):
        for container in containers(workload):
            where = f"{workload['metadata']['name']}/{container['name']}"
            assert "readinessProbe" in container and "livenessProbe" in container, where
            requests = container.get("resources", {}).get("requests", {})
            assert {"cpu", "memory"} <= set(requests), where
            assert "memory" in container["resources"].get("limits", {}), where
            port_names = {p.get("name") for p in container.get("ports", [])}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                action = container.get(probe, {}).get("httpGet") or container.get(probe, {}).get("tcpSocket")
                if action and isinstance(action["port"], str):
                    assert action["port"] in port_names, f"{where}: {probe} names an unknown port"
            image = container["image"]
            assert ":" in image and not image.endswith(":latest"), f"{where}: pin the image"


def test_the_gateway_probes_security_and_drain(objects: list[Obj]) -> None:
    gateway = find(objects, "Deployment", GATEWAY)
    assert gateway["spec"]["replicas"] == 2
    pod = gateway["spec"]["template"]["spec"]
    (container,) = containers(gateway)
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001  # the Dockerfile's user
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/etc/sluice", "/tmp"} <= mounts  # the config file; the workers' metrics sockets
    config = gateway_config(objects)
    assert config["audit"]["journal_dir"] in mounts, "the audit journal must be writable"
    assert container["args"][-1] == "/etc/sluice/sluice.yaml"
    # Zero-downtime rollout: a new pod is ready before an old one drains, and the drain fits the grace period.
    assert gateway["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > config["server"]["drain_timeout"] + int(pre_stop[1])


def test_engine_gpu_limits_equal_their_tensor_parallel_size(objects: list[Obj]) -> None:
    engines = [w for w in workloads(objects) if pod_labels(w).get("app.kubernetes.io/component") == "vllm"]
    assert sorted(w["metadata"]["name"] for w in engines) == list(ENGINES)
    expected = {"vllm-a": 2, "vllm-b": 2, "vllm-c": 1}
    for engine in engines:
        (container,) = containers(engine)
        name = engine["metadata"]["name"]
        tp = flag(container["args"], "--tensor-parallel-size")
        assert tp is not None and int(tp) == expected[name], name
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == int(tp), name
        assert flag(container["args"], "--enable-lora") is None and "--enable-lora" in container["args"], name
        assert flag(container["args"], "--lora-modules"), name
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"]["path"] == "/health", f"{name}: {probe}"
        assert pod_labels(engine)["sluice.dev/pool"] == name
    embeddings = find(objects, "Deployment", "embeddings")
    (container,) = containers(embeddings)
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert flag(container["args"], "--runner") == "pooling"


def test_engine_services_are_labelled_per_pool(objects: list[Obj]) -> None:
    for name in ENGINES:
        service = find(objects, "Service", name)
        labels = service["metadata"]["labels"]
        assert labels["app.kubernetes.io/component"] == "vllm"
        assert labels["sluice.dev/pool"] == name
        assert selects(service["spec"]["selector"], pod_labels(find(objects, "Deployment", name)))


# ── Secrets and configuration ────────────────────────────────────────────────────────────────────────────


def secret_refs(node: Any) -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        ref = node.get("secretKeyRef")
        if isinstance(ref, dict):
            yield ref["name"], ref["key"]
        if isinstance(node.get("secretRef"), dict):
            pytest.fail("envFrom secretRef hides which keys are needed: reference each key")
        for value in node.values():
            yield from secret_refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from secret_refs(value)


def test_every_referenced_secret_key_is_in_the_example(objects: list[Obj]) -> None:
    (example,) = load_documents(SECRET_EXAMPLE)
    documented = set(example["stringData"])
    refs = {ref for obj in objects for ref in secret_refs(obj)}
    assert refs, "the manifests reference no Secret"
    for name, key in refs:
        assert name == example["metadata"]["name"], name
        assert key in documented, f"{key} is referenced but not listed in secret.example.yaml"
    # And every ${NAME} of the gateway configuration comes from the gateway's environment.
    text = find(objects, "ConfigMap", "sluice-config")["data"]["sluice.yaml"]
    needed = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", text))
    (container,) = containers(find(objects, "Deployment", GATEWAY))
    assert needed <= {e["name"] for e in container["env"]}
    assert needed == set(PLACEHOLDER_ENV)
    secret_keys = {key for _, key in refs}
    assert {name for name in needed if name not in secret_keys} == {"SLUICE_TRUSTED_PROXY_CIDR"}  # not a secret


def test_the_gateway_configuration_loads(objects: list[Obj]) -> None:
    text = find(objects, "ConfigMap", "sluice-config")["data"]["sluice.yaml"]
    config = parse_config(text, source="sluice-config", env=PLACEHOLDER_ENV)
    assert config.backends == ()  # the engines' pods are discovered
    assert config.discovery.kubernetes is not None
    assert [pool.service for pool in config.discovery.kubernetes.pools] == list(ENGINES)
    assert config.discovery.kubernetes.kubeconfig is None  # the pod's service account
    assert config.server.host == "0.0.0.0"


def test_every_configured_host_is_a_service_of_the_manifests(objects: list[Obj]) -> None:
    services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
    config = gateway_config(objects)
    hosts = set()
    for value in strings(config):
        if "://" not in value or value.startswith(("sqlite:", "file:")):
            continue
        url = urlsplit(value.replace("${POSTGRES_PASSWORD}", "x"))
        assert url.hostname, value
        hosts.add(url.hostname)
        assert url.hostname in services, f"{value}: no Service named {url.hostname}"
        ports = {p["port"] for p in services[url.hostname]["spec"].get("ports", [])}
        assert url.port in ports, f"{value}: the Service {url.hostname} has no port {url.port}"
    assert {"embeddings", "chroma", "redis", "postgres"} <= hosts
    # Each discovered pool is an engine Service with the named port, selecting that engine's pods.
    for pool in config["discovery"]["kubernetes"]["pools"]:
        service = services[pool["service"]]
        assert service["metadata"]["labels"]["app.kubernetes.io/component"] == "vllm"
        assert pool["port"] in {p["name"] for p in service["spec"]["ports"]}, pool
        assert selects(service["spec"]["selector"], pod_labels(find(objects, "Deployment", pool["service"])))


def test_the_gateway_may_watch_endpoint_slices_and_nothing_more(objects: list[Obj], production: list[Obj]) -> None:
    for rendered in (objects, production):
        gateway = find(rendered, "Deployment", GATEWAY)
        pod = gateway["spec"]["template"]["spec"]
        account = find(rendered, "ServiceAccount", pod["serviceAccountName"])
        assert pod["automountServiceAccountToken"] is True  # the in-cluster client reads the token
        assert account["automountServiceAccountToken"] is False  # no other pod gets it by accident
        (binding,) = [o for o in rendered if o["kind"] == "RoleBinding"]
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"]}]
        assert binding["roleRef"]["kind"] == "Role"  # namespaced, never cluster-wide
        role = find(rendered, "Role", binding["roleRef"]["name"])
        assert role["rules"] == [
            {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]}
        ]
    for engine in ENGINES:  # the engines never talk to the API
        assert find(objects, "Deployment", engine)["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_x_forwarded_for_is_trusted_from_the_overlays_network_only(objects: list[Obj], production: list[Obj]) -> None:
    def cidr(rendered: list[Obj]) -> str:
        (container,) = containers(find(rendered, "Deployment", GATEWAY))
        (value,) = [e["value"] for e in container["env"] if e["name"] == "SLUICE_TRUSTED_PROXY_CIDR"]
        return str(value)

    assert cidr(objects) == "192.0.2.0/24"  # the base trusts no real network
    production_cidr = cidr(production)
    assert production_cidr != "192.0.2.0/24" and not production_cidr.endswith("/8")
    assert gateway_config(objects)["rate_limits"]["trusted_proxies"] == ["${SLUICE_TRUSTED_PROXY_CIDR}"]


def test_services_select_pods_and_managed_stores_are_external(objects: list[Obj]) -> None:
    for service in (o for o in objects if o["kind"] == "Service"):
        name = service["metadata"]["name"]
        if service["spec"].get("type") == "ExternalName":
            assert name in {"redis", "postgres"}, name
            assert "selector" not in service["spec"]
            continue
        targets = [w for w in workloads(objects) if selects(service["spec"]["selector"], pod_labels(w))]
        assert len(targets) == 1, f"Service {name} selects {len(targets)} workloads"
        (target,) = targets
        ports = {p["name"] for c in containers(target) for p in c.get("ports", [])}
        assert all(p["targetPort"] in ports for p in service["spec"]["ports"]), name
    chroma = find(objects, "StatefulSet", "chroma")
    assert chroma["spec"]["serviceName"] == "chroma" and chroma["spec"]["replicas"] == 1


def test_the_hpa_and_pdb_target_the_gateway(objects: list[Obj]) -> None:
    gateway = find(objects, "Deployment", GATEWAY)
    hpa = find(objects, "HorizontalPodAutoscaler", GATEWAY)
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", GATEWAY)
    assert hpa["spec"]["minReplicas"] >= 2
    assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in hpa["spec"]["metrics"])
    pdb = find(objects, "PodDisruptionBudget", GATEWAY)
    assert pdb["spec"]["minAvailable"] == 1
    selector = pdb["spec"]["selector"]["matchLabels"]
    assert selects(selector, pod_labels(gateway))
    assert selector == gateway["spec"]["selector"]["matchLabels"]
    others = [w for w in workloads(objects) if w is not gateway and selects(selector, pod_labels(w))]
    assert not others, "the PDB must cover the gateway pods only"
