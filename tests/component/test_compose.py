"""The single-host production deployment (deploy/docker-compose.production.yml) is valid and consistent.

Offline, without Docker: the compose file validates against the Compose specification's JSON schema (the copy
vendored in the `check-jsonschema` package); every service has a health check and a restart policy; no secret
is written inline (they come from deploy/.env, documented by deploy/env.example); every host the gateway
configuration (deploy/sluice.production.yaml) names is a service on a network the gateways share; that
configuration loads with placeholder secrets; every bind-mounted ./ path exists and sits where the mounted
configuration expects; each engine's GPU reservation matches its tensor-parallel size. The gateway's
Dockerfile is linted structurally: multi-stage, slim, non-root, a health check, no remote ADD, no secrets in
ENV, and a build context (.dockerignore) that holds what it copies and nothing private.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from sluice.config_loader import load_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.production.yml"
GATEWAY_CONFIG = DEPLOY / "sluice.production.yaml"
ENV_EXAMPLE = DEPLOY / "env.example"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

GATEWAYS = ("sluice-1", "sluice-2")
ENGINES = ("vllm-a", "vllm-b", "vllm-c")
# Bind mounts whose source is not in the repository on purpose: the TLS certificate and key are the
# operator's (docs/deployment.md).
NOT_IN_REPOSITORY = {"./nginx/certs"}
# Names of variables and settings that hold secrets.
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|(^|_)KEY$|API_KEY|CREDENTIAL", re.IGNORECASE)
# Values that are secrets whatever their name: OpenAI-, Sluice- and Hugging Face-style keys, private keys.
SECRET_VALUE = re.compile(r"sk-[A-Za-z0-9-]{16,}|hf_[A-Za-z0-9]{20,}|-----BEGIN [A-Z ]*PRIVATE KEY")
# Compose interpolation: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, ${VAR:+x}.
INTERPOLATION = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}")
ONLY_A_REFERENCE = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*(?::?[-?][^}]*)?\}$")


# ── Loading ──────────────────────────────────────────────────────────────────────────────────────────────


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())  # SafeLoader resolves the `<<: *anchor` merge keys
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def compose_schema() -> dict[str, Any]:
    """The Compose specification's schema, as vendored (from SchemaStore) by the check-jsonschema package."""
    vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    schema: dict[str, Any] = json.loads((vendor / "compose-spec.json").read_text())
    return schema


def strings(node: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """Every string scalar of a parsed YAML document (keys included), with where it is."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield f"{path}.{key}", str(key)
            yield from strings(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from strings(value, f"{path}[{i}]")
    elif isinstance(node, str):
        yield path, node


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def command_flags(service: dict[str, Any]) -> dict[str, str]:
    """`--flag=value`, `--flag value` and bare `--flag` (value "") of a service's command."""
    command = service.get("command") or []
    args = shlex.split(command) if isinstance(command, str) else [str(a) for a in command]
    flags: dict[str, str] = {}
    for i, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        name, eq, value = arg.partition("=")
        if not eq and i + 1 < len(args) and not args[i + 1].startswith("--"):
            value = args[i + 1]
        flags[name] = value
    return flags


def bind_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of the service's bind mounts written with a relative source."""
    mounts = []
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            source, target = str(volume.get("source", "")), str(volume["target"])
        else:
            source, _, rest = str(volume).partition(":")
            target = rest.split(":")[0]
        if source.startswith("."):
            mounts.append((source, target))
    return mounts


def mount_targets(service: dict[str, Any]) -> set[str]:
    targets = set()
    for volume in service.get("volumes") or []:
        targets.add(str(volume["target"]) if isinstance(volume, dict) else str(volume).split(":")[1])
    return targets


# ── The Compose specification ────────────────────────────────────────────────────────────────────────────


def test_compose_file_matches_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = compose_schema()
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    validator = validator_class(schema, format_checker=validator_class.FORMAT_CHECKER)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors)


def test_the_schema_rejects_a_broken_file(compose: dict[str, Any]) -> None:
    """The schema really is the Compose one: a misspelt service key fails it."""
    broken = json.loads(json.dumps(compose))
    broken["services"]["redis"]["restrat"] = "always"
    assert not jsonschema.validators.validator_for(compose_schema())(compose_schema()).is_valid(broken)


def test_every_service_the_issue_lists_is_there(services: dict[str, dict[str, Any]]) -> None:
    expected = {
        *ENGINES,
        "embeddings",
        *GATEWAYS,
        "nginx",
        "redis",
        "chroma",
        "postgres",
        "prometheus",
        "alertmanager",
        "grafana",
        "loki",
        "promtail",
    }
    assert expected <= set(services), f"missing: {sorted(expected - set(services))}"


def test_every_service_has_a_health_check_and_a_restart_policy(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        check = service.get("healthcheck")
        assert check and not check.get("disable") and check.get("test"), f"{name}: no health check"
        assert check["test"][0] in {"CMD", "CMD-SHELL"}, f"{name}: health check test {check['test']!r}"
        assert service.get("restart") in {"always", "unless-stopped"}, f"{name}: restart policy"
        assert service.get("logging", {}).get("options", {}).get("max-size"), f"{name}: logs are not rotated"


def test_volumes_networks_and_secrets_used_are_declared(compose: dict[str, Any]) -> None:
    declared_volumes = set(compose.get("volumes") or {})
    declared_networks = set(compose.get("networks") or {})
    declared_secrets = set(compose.get("secrets") or {})
    for name, service in compose["services"].items():
        for volume in service.get("volumes") or []:
            source = volume.get("source", "") if isinstance(volume, dict) else str(volume).split(":")[0]
            if source and not source.startswith(("/", ".", "$")):
                assert source in declared_volumes, f"{name}: volume {source} is not declared"
        networks = service.get("networks") or []
        assert networks, f"{name}: on no network"
        assert set(networks) <= declared_networks, f"{name}: undeclared network"
        for secret in service.get("secrets") or []:
            source = secret["source"] if isinstance(secret, dict) else secret
            assert source in declared_secrets, f"{name}: secret {source} is not declared"


# ── Secrets ──────────────────────────────────────────────────────────────────────────────────────────────


def test_no_secret_is_written_in_the_compose_file(compose: dict[str, Any], env_example: dict[str, str]) -> None:
    for where, value in strings(compose):
        assert not SECRET_VALUE.search(value), f"{where}: looks like a secret"
    placeholders = {value for name, value in env_example.items() if SECRET_NAME.search(name) and len(value) >= 8}
    text = COMPOSE.read_text()
    for value in placeholders:
        assert value not in text, f"deploy/env.example's value {value!r} is copied into the compose file"
    for name, service in compose["services"].items():
        for key, value in environment(service).items():
            # A path (a *_FILE variable, a certificate key's location) names where a secret is, not the secret.
            if SECRET_NAME.search(key) and not value.startswith("/"):
                assert value == "" or ONLY_A_REFERENCE.match(value), f"{name}: {key} must be a ${{VAR}} reference"
        for flag, value in command_flags(service).items():
            if SECRET_NAME.search(flag.replace("-", "_")):
                assert ONLY_A_REFERENCE.match(value), f"{name}: {flag} must be a ${{VAR}} reference"
    for name, secret in (compose.get("secrets") or {}).items():
        assert "environment" in secret or "file" in secret, f"secret {name}: neither environment nor file"
        if "environment" in secret:
            assert secret["environment"] in env_example, f"secret {name}: {secret['environment']} not in env.example"


def test_gateways_read_secrets_from_the_env_file(services: dict[str, dict[str, Any]]) -> None:
    for name in GATEWAYS:
        env_files = services[name].get("env_file")
        env_files = [env_files] if isinstance(env_files, str) else env_files
        paths = [item["path"] if isinstance(item, dict) else item for item in env_files or []]
        assert ".env" in paths, f"{name}: env_file .env"


def test_env_example_documents_every_variable_with_placeholders(env_example: dict[str, str]) -> None:
    required = {"SLUICE_ADMIN_KEY", "SLUICE_KEY_SECRET", "POSTGRES_PASSWORD", "GRAFANA_ADMIN_PASSWORD", "HF_TOKEN"}
    assert required <= set(env_example), f"env.example lacks {sorted(required - set(env_example))}"
    for name, value in env_example.items():
        if SECRET_NAME.search(name):
            assert "change-me" in value, f"env.example: {name} must be a change-me placeholder, not a real value"
    # Variables referenced without a default must be defined, or `docker compose up` fails or runs with "".
    referenced = set()
    for document in (COMPOSE, GATEWAY_CONFIG):  # parsed, so that ${…} in comments does not count
        for _, value in strings(yaml.safe_load(document.read_text())):
            for match in INTERPOLATION.finditer(value):
                if match.group(2) is None or "?" in match.group(2):
                    referenced.add(match.group(1))
    for secret in (yaml.safe_load(COMPOSE.read_text()).get("secrets") or {}).values():
        if "environment" in secret:
            referenced.add(secret["environment"])
    assert referenced <= set(env_example), f"not in env.example: {sorted(referenced - set(env_example))}"


def test_gateway_configuration_keeps_secrets_in_the_environment() -> None:
    config = yaml.safe_load(GATEWAY_CONFIG.read_text())
    for where, value in strings(config):
        assert not SECRET_VALUE.search(value), f"{where}: looks like a secret"
    auth = config["auth"]
    secrets = [auth.get("admin_key"), auth.get("key_secret"), *(key["key"] for key in auth.get("api_keys", []))]
    secrets += [backend.get("api_key") for backend in config["backends"]]
    for value in filter(None, secrets):
        assert ONLY_A_REFERENCE.match(value), f"auth/backends: {value!r} must be a ${{VAR}} reference"
    password = urlsplit(config["database"]["url"]).password
    assert password is None or ONLY_A_REFERENCE.match(password), "database.url: the password must be ${VAR}"


# ── The gateway configuration against the compose file ───────────────────────────────────────────────────


def test_gateway_configuration_loads(env_example: dict[str, str]) -> None:
    config = load_config(GATEWAY_CONFIG, env=env_example)
    assert {backend.name for backend in config.backends} == set(ENGINES)
    assert config.server.host == "0.0.0.0"
    assert config.cache.enabled and config.cache.embedder.kind == "openai"
    assert config.rag.chroma.mode == "http" and config.rag.routes
    assert config.rag.embedder.kind == "openai"  # the image has no torch for the local embedder
    assert config.repair.enabled and config.audit.enabled
    assert config.database.url.startswith("postgresql://")
    assert config.redis.url


def test_every_host_the_gateway_uses_is_a_service_on_its_network(
    services: dict[str, dict[str, Any]], env_example: dict[str, str]
) -> None:
    config = load_config(GATEWAY_CONFIG, env=env_example)
    urls = {f"backends[{b.name}]": b.url for b in config.backends}
    urls |= {"redis.url": config.redis.url or "", "database.url": config.database.url}
    urls |= {"rag.chroma.url": config.rag.chroma.url or ""}
    urls |= {"cache.embedder.url": config.cache.embedder.url or "", "rag.embedder.url": config.rag.embedder.url or ""}
    gateway_networks = set(services["sluice-1"]["networks"])
    for key, url in urls.items():
        host = urlsplit(url).hostname
        assert host in services, f"{key}: {host} is not a compose service"
        assert gateway_networks & set(services[host]["networks"]), f"{key}: {host} shares no network with sluice-1"
    for backend in config.backends:
        assert "--port" in command_flags(services[backend.name])
        assert urlsplit(backend.url).port == int(command_flags(services[backend.name])["--port"])


def test_backend_concurrency_matches_the_engines(
    services: dict[str, dict[str, Any]], env_example: dict[str, str]
) -> None:
    """max_concurrency is per replica: all replicas together should not exceed the engine's --max-num-seqs."""
    config = load_config(GATEWAY_CONFIG, env=env_example)
    for backend in config.backends:
        max_num_seqs = int(command_flags(services[backend.name])["--max-num-seqs"])
        assert backend.max_concurrency is not None
        assert backend.max_concurrency * len(GATEWAYS) <= max_num_seqs, backend.name


def test_the_alert_rules_know_each_engines_max_num_seqs(services: dict[str, dict[str, Any]]) -> None:
    """sluice:vllm_max_num_seqs (rules/vllm.yml) holds each pool's --max-num-seqs: VLLMRunningNearMaxSeqs
    fires at 80 % of the real value, not of vLLM's default."""
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules" / "vllm.yml").read_text())
    (expr,) = [r["expr"] for g in rules["groups"] for r in g["rules"] if r.get("record") == "sluice:vllm_max_num_seqs"]
    per_pool = {m[0]: int(m[1]) for m in re.findall(r'backend=~"([a-z0-9-]+)\(-\.\+\)\?"\}\)\s*\+\s*(\d+)', expr)}
    engines = {name: int(command_flags(service)["--max-num-seqs"])
               for name, service in services.items() if "--enable-lora" in command_flags(service)}  # fmt: skip
    assert engines and per_pool == engines


def test_gateways_run_the_mounted_configuration(services: dict[str, dict[str, Any]]) -> None:
    for name in GATEWAYS:
        service = services[name]
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).resolve() == DOCKERFILE
        command = service["command"]
        assert command[:2] == ["serve", "--config"]
        assert ("./sluice.production.yaml", command[2]) in bind_mounts(service)
        assert "/ready" in " ".join(service["healthcheck"]["test"])
        assert set(service["networks"]) == {"frontend", "backend"}


def test_trusted_proxies_is_the_network_nginx_reaches_the_gateways_on(
    compose: dict[str, Any], env_example: dict[str, str]
) -> None:
    config = load_config(GATEWAY_CONFIG, env=env_example)
    subnets = {c["subnet"] for c in compose["networks"]["frontend"]["ipam"]["config"]}
    assert set(config.rate_limits.trusted_proxies) == subnets
    assert set(compose["services"]["nginx"]["networks"]) == {"frontend"}


# ── Engines and GPUs ─────────────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("name", "tensor_parallel", "adapter"), [("vllm-a", 2, "medical"), ("vllm-b", 2, "code"), ("vllm-c", 1, "creative")]
)
def test_engine_flags(services: dict[str, dict[str, Any]], name: str, tensor_parallel: int, adapter: str) -> None:
    service = services[name]
    assert service["image"].startswith("vllm/vllm-openai:")
    flags = command_flags(service)
    assert int(flags["--tensor-parallel-size"]) == tensor_parallel
    for flag in ("--enable-lora", "--enable-prefix-caching"):
        assert flag in flags, f"{name}: {flag}"
    for flag in ("--max-loras", "--max-model-len", "--gpu-memory-utilization", "--max-num-seqs"):
        assert flags.get(flag), f"{name}: {flag}"
    assert 0 < float(flags["--gpu-memory-utilization"]) <= 0.95
    assert flags["--lora-modules"].split("=")[0] == adapter
    assert "/health" in " ".join(service["healthcheck"]["test"])
    if name == "vllm-a":
        assert "awq" in flags["--quantization"] or "AWQ" in service["command"][0]
    else:
        assert flags.get("--dtype") == "float16"


def gpu_devices(service: dict[str, Any]) -> list[str]:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    ids = []
    for device in devices:
        assert "gpu" in device["capabilities"]
        ids += device["device_ids"]
    return ids


def test_gpu_reservations_match_tensor_parallel_sizes(services: dict[str, dict[str, Any]]) -> None:
    """Each engine reserves as many GPUs as its tensor-parallel size; engines sharing a GPU fit in its memory."""
    share: dict[str, float] = {}
    for name, service in services.items():
        devices = gpu_devices(service)
        if not service.get("image", "").startswith("vllm/"):
            assert not devices, f"{name} reserves GPUs"
            continue
        flags = command_flags(service)
        tensor_parallel = int(flags.get("--tensor-parallel-size", "1"))
        assert len(devices) == tensor_parallel, f"{name}: {len(devices)} GPUs for TP={tensor_parallel}"
        assert len(set(devices)) == len(devices), f"{name}: a GPU listed twice"
        for device in devices:
            share[device] = share.get(device, 0.0) + float(flags.get("--gpu-memory-utilization", "0.9"))
    for device, fraction in share.items():
        assert fraction <= 0.95, f"GPU {device}: the engines on it ask for {fraction:.0%} of its memory"


def test_embeddings_service_serves_the_configured_model(
    services: dict[str, dict[str, Any]], env_example: dict[str, str]
) -> None:
    config = load_config(GATEWAY_CONFIG, env=env_example)
    service = services["embeddings"]
    served = command_flags(service).get("--served-model-name") or service["command"][0]
    assert config.cache.embedder.model == served == config.rag.embedder.model
    flags = command_flags(service)
    assert flags.get("--runner") == "pooling" or flags.get("--task") == "embed"


# ── Mounted configuration ────────────────────────────────────────────────────────────────────────────────


def test_every_bind_mounted_path_exists(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for source, _ in bind_mounts(service):
            if source in NOT_IN_REPOSITORY:
                continue
            assert (DEPLOY / source).exists(), f"{name}: {source} does not exist (relative to deploy/)"


def test_redis_is_bounded_and_persistent(services: dict[str, dict[str, Any]]) -> None:
    service = services["redis"]
    by_target = {target: DEPLOY / source for source, target in bind_mounts(service)}
    settings: dict[str, str] = {}

    def read(path: Path) -> None:
        for line in path.read_text().splitlines():
            key, _, value = line.strip().partition(" ")
            if key == "include":
                read(by_target[value.strip()])
            elif key and not key.startswith("#"):
                settings[key] = value.strip()

    read(by_target[service["command"][1]])
    assert settings["maxmemory"] == "512mb"
    assert settings["maxmemory-policy"] == "allkeys-lru"
    assert settings["appendonly"] == "yes"
    assert settings["dir"] in mount_targets(service)


def test_observability_configs_are_mounted_where_they_expect(services: dict[str, dict[str, Any]]) -> None:
    # Grafana: provisioning, and the dashboards where the dashboard provider reads them.
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/dashboards.yml").read_text())
    grafana = dict(bind_mounts(services["grafana"]))
    assert grafana["./grafana/provisioning"] == "/etc/grafana/provisioning"
    assert grafana["./grafana/dashboards"] == provider["providers"][0]["options"]["path"]
    # Prometheus: its rule files are found relative to the mounted configuration.
    prometheus = dict(bind_mounts(services["prometheus"]))
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    assert prometheus["./prometheus"] == "/etc/prometheus"
    scrape = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    for job in scrape["scrape_configs"]:
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host = target.split(":")[0]
                assert host == "localhost" or host in services, f"prometheus target {target} is not a service"
    # Alertmanager: the admin-key file its webhook reads is a secret mounted at that path.
    alertmanager = yaml.safe_load((DEPLOY / "alertmanager/alertmanager.yml").read_text())
    credential_files = {
        webhook["http_config"]["authorization"]["credentials_file"]
        for receiver in alertmanager["receivers"]
        for webhook in receiver.get("webhook_configs", [])
        if "http_config" in webhook
    }
    secret_targets = {s["target"] for s in services["alertmanager"]["secrets"] if isinstance(s, dict)}
    assert credential_files <= secret_targets
    # Loki keeps everything under its path_prefix, which must be a volume.
    loki = yaml.safe_load((DEPLOY / "loki/loki.yml").read_text())
    assert loki["common"]["path_prefix"] in mount_targets(services["loki"])
    # Promtail: Docker discovery needs the socket, and its positions file needs a volume.
    promtail = yaml.safe_load((DEPLOY / "promtail/promtail.yml").read_text())
    targets = mount_targets(services["promtail"])
    assert "/var/run/docker.sock" in targets
    assert str(Path(promtail["positions"]["filename"]).parent) in targets
    assert "-config.expand-env=true" in services["promtail"]["command"]


def test_postgres_keeps_its_data_in_a_volume(compose: dict[str, Any]) -> None:
    postgres = compose["services"]["postgres"]
    assert any(t.startswith("/var/lib/postgresql") for t in mount_targets(postgres))
    env = environment(postgres)
    assert env.get("POSTGRES_PASSWORD_FILE", "").startswith("/run/secrets/") or ONLY_A_REFERENCE.match(
        env.get("POSTGRES_PASSWORD", "")
    )


def test_nginx_mounts_its_configuration_and_template(services: dict[str, dict[str, Any]]) -> None:
    mounts = dict(bind_mounts(services["nginx"]))
    assert mounts.get("./nginx/nginx.conf") == "/etc/nginx/nginx.conf"
    template = mounts.get("./nginx/sluice.conf.template", "")
    assert template.startswith("/etc/nginx/templates/") and template.endswith(".template")
    ports = {str(port).split(":")[-1] for port in services["nginx"].get("ports", [])}
    assert {"80", "443"} <= ports
    # Only nginx takes outside traffic; anything else published must be bound to loopback.
    for name, service in services.items():
        if name != "nginx":
            for port in service.get("ports", []):
                assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


# ── The Dockerfile ───────────────────────────────────────────────────────────────────────────────────────


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: continuation lines joined, comments and parser directives dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        logical = (pending + stripped).strip()
        pending = ""
        if logical:
            keyword, _, arguments = logical.partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def stages(instructions: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for instruction in instructions:
        if instruction[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


def exec_form(arguments: str) -> list[str]:
    value = json.loads(arguments)
    assert isinstance(value, list), f"not the exec (JSON) form: {arguments}"
    return [str(item) for item in value]


def test_the_parser_reads_continuations_and_comments() -> None:
    text = "# syntax=docker/dockerfile:1\nFROM a AS b\nRUN one \\\n    # a comment\n    two\nUSER x\n"
    assert dockerfile_instructions(text) == [("FROM", "a AS b"), ("RUN", "one two"), ("USER", "x")]


def test_dockerfile_is_multi_stage_slim_and_non_root() -> None:
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    all_stages = stages(instructions)
    assert len(all_stages) >= 2, "multi-stage: a builder and a runtime stage"
    final = all_stages[-1]
    image = final[0][1].split()[0]
    assert image.startswith("python:3.11") and "slim" in image, f"final stage on {image}"
    keywords = [keyword for keyword, _ in final]
    users = [(i, arguments) for i, (keyword, arguments) in enumerate(final) if keyword == "USER"]
    assert users, "the final stage never leaves root"
    last_user_at, user = users[-1]
    assert user.split(":")[0] not in {"root", "0"}, f"USER {user}"
    for keyword in ("ENTRYPOINT", "CMD"):
        assert keyword in keywords and keywords.index(keyword) > last_user_at, f"{keyword} before USER"
    assert any(keyword == "COPY" and arguments.startswith("--from=") for keyword, arguments in final)
    # No compiler or package manager work in the runtime stage (the builder has them).
    for keyword, arguments in final:
        if keyword == "RUN":
            assert not re.search(r"build-essential|\bgcc\b|pip install", arguments), f"runtime stage: RUN {arguments}"


def test_dockerfile_health_check_entrypoint_and_port() -> None:
    final = stages(dockerfile_instructions(DOCKERFILE.read_text()))[-1]
    by_keyword = {keyword: arguments for keyword, arguments in final}
    assert "HEALTHCHECK" in by_keyword and not by_keyword["HEALTHCHECK"].upper().startswith("NONE")
    assert "8080" in by_keyword["EXPOSE"].split()
    assert exec_form(by_keyword["ENTRYPOINT"]) == ["sluice"]
    command = exec_form(by_keyword["CMD"])
    assert command[:2] == ["serve", "--config"] and command[2] == "/etc/sluice/sluice.yaml"


def test_dockerfile_has_no_remote_add_nor_secrets() -> None:
    for keyword, arguments in dockerfile_instructions(DOCKERFILE.read_text()):
        if keyword == "ADD":
            assert not re.search(r"https?://|git@", arguments), f"ADD {arguments}: fetch with a checked RUN instead"
        if keyword in {"ENV", "ARG", "LABEL"}:
            for name in re.findall(r"([A-Za-z_][A-Za-z0-9_.]*)=", arguments) or arguments.split()[:1]:
                assert not SECRET_NAME.search(name), f"{keyword} {name}: secrets belong in the runtime environment"
            assert not SECRET_VALUE.search(arguments), f"{keyword} {arguments}"


def test_dockerfile_installs_the_production_extras() -> None:
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    extras = next(arguments for keyword, arguments in instructions if arguments.startswith("SLUICE_EXTRAS="))
    chosen = set(extras.partition("=")[2].split(","))
    assert {"rag", "tracing", "kubernetes"} <= chosen
    assert "embeddings" not in chosen, "torch stays out of the gateway image: the embeddings service embeds"


def dockerignored(path: str, rules: list[str]) -> bool:
    """Whether .dockerignore excludes `path` (the last matching rule wins; `!` re-includes)."""
    excluded = False
    for rule in rules:
        negated = rule.startswith("!")
        pattern = rule.lstrip("!").strip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes):
            excluded = not negated
    return excluded


def test_build_context_holds_what_the_dockerfile_copies_and_nothing_private() -> None:
    rules = [line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and line[0] != "#"]
    for keyword, arguments in dockerfile_instructions(DOCKERFILE.read_text()):
        if keyword == "COPY" and not arguments.startswith("--from="):
            for source in arguments.split()[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
                assert not dockerignored(source, rules), f"COPY {source}: excluded by .dockerignore"
    for private in (".venv", ".git", "data", "deploy/.env", ".env", "tests"):
        assert dockerignored(private, rules), f"{private} would be sent to the Docker daemon"
