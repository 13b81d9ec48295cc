"""Configuration: strict keys, errors that name the key and line, ${ENV} substitution."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from sluice.config_loader import ConfigError, load_config, parse_config

ISSUE_EXAMPLE = """\
server: {host: 127.0.0.1, port: 8080}
backends:
  - {name: vllm-a, url: "http://127.0.0.1:9001"}
  - {name: vllm-b, url: "http://127.0.0.1:9002", weight: 2}
auth:
  api_keys:
    - {name: ci, key: "${SLUICE_CI_KEY}"}
"""
ROOT = Path(__file__).resolve().parents[2]


def test_the_documented_minimal_config_loads() -> None:
    config = parse_config(ISSUE_EXAMPLE, env={"SLUICE_CI_KEY": "sk-ci-0123456789"})
    assert config.server.port == 8080
    assert [b.weight for b in config.backends] == [1.0, 2.0]
    assert config.auth.api_keys[0].key == "sk-ci-0123456789"
    assert config.timeouts.connect == 10 and config.timeouts.read == 300 and config.timeouts.stream_read == 600


def test_missing_env_names_key_and_line() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(ISSUE_EXAMPLE, source="sluice.yaml", env={})
    message = str(caught.value)
    assert "sluice.yaml:7" in message and "auth.api_keys[0].key" in message and "SLUICE_CI_KEY" in message


def test_env_default() -> None:
    text = ISSUE_EXAMPLE.replace("${SLUICE_CI_KEY}", "${SLUICE_CI_KEY:-sk-default-key-1}")
    assert parse_config(text, env={}).auth.api_keys[0].key == "sk-default-key-1"


def test_env_cannot_inject_structure() -> None:
    config = parse_config(ISSUE_EXAMPLE, env={"SLUICE_CI_KEY": "x\n  injected: true"})
    assert config.auth.api_keys[0].key == "x\n  injected: true"


@pytest.mark.parametrize(
    ("change", "where", "what"),
    [
        (("weight: 2}", "wieght: 2}"), ":4: backends[1].wieght", "unknown key"),
        (("port: 8080", "port: 80800"), ":1: server.port", "less than or equal to 65535"),
        (('"http://127.0.0.1:9001"', '"https://x:1"'), ":3: backends[0].url", "http://"),
        (('"http://127.0.0.1:9001"', '"http://x:1/v1"'), ":3: backends[0].url", "path"),
        (("name: vllm-b", "name: vllm-a"), "backends", "unique"),
        (("server:", "sever:"), ":1: sever", "unknown key"),
        (("weight: 2", "weight: -1"), ":4: backends[1].weight", "greater than 0"),
    ],
)
def test_errors_name_the_key_and_line(change: tuple[str, str], where: str, what: str) -> None:
    text = ISSUE_EXAMPLE.replace(*change)
    with pytest.raises(ConfigError) as caught:
        parse_config(text, source="f.yaml", env={"SLUICE_CI_KEY": "sk-ci-0123456789"})
    assert where in str(caught.value) and what in str(caught.value)


def test_no_backends_and_bad_yaml() -> None:
    with pytest.raises(ConfigError, match="list at least one, or discover them"):
        parse_config("server: {port: 1}\n")
    with pytest.raises(ConfigError, match="list at least one, or discover them"):
        parse_config("backends: []\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_config("server: [\n")
    with pytest.raises(ConfigError, match="empty"):
        parse_config("")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config("/nonexistent/sluice.yaml")


def test_example_config_is_valid_and_check_config_cli(tmp_path: Path) -> None:
    example = ROOT / "examples" / "sluice.yaml"
    env = {"SLUICE_API_KEY": "sk-example-0123456789", "PATH": "/usr/bin:/bin"}
    ok = subprocess.run(
        [sys.executable, "-m", "sluice", "check-config", str(example)], capture_output=True, text=True, env=env
    )
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(ISSUE_EXAMPLE.replace("weight: 2", "weigth: 2"))
    failed = subprocess.run(
        [sys.executable, "-m", "sluice", "check-config", str(bad)],
        capture_output=True, text=True, env={**env, "SLUICE_CI_KEY": "sk-ci-0123456789"},
    )
    assert failed.returncode == 2
    assert f"{bad}:4: backends[1].weigth: unknown key" in failed.stderr
    assert "Traceback" not in failed.stderr


@pytest.mark.parametrize(
    ("cache", "what"),
    [
        ("{enabled: true, store: redis}", "redis.url is not set"),
        ("{enabled: true, embedder: {kind: local, model: BAAI/bge-m3}}", "kind local runs only all-MiniLM-L6-v2"),
        ("{enabled: true, embedder: {kind: openai}}", "url is required"),
        ("{semantic: {threshold: 1.5}}", "cache.semantic.threshold"),
        ("{models: {m: {max_temperature: -1}}}", "cache.models.m.max_temperature"),
        ("{ttl: 0}", "cache.ttl"),
    ],
)
def test_cache_settings_are_checked(cache: str, what: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(what)):
        parse_config(ISSUE_EXAMPLE + f"cache: {cache}\n", env={"SLUICE_CI_KEY": "sk-ci-0123456789"})


def test_cache_settings_per_model() -> None:
    text = ISSUE_EXAMPLE + "cache: {enabled: true, models: {hot: {max_temperature: 0.5, semantic: false}}}\n"
    cache = parse_config(text, env={"SLUICE_CI_KEY": "sk-ci-0123456789"}).cache
    assert cache.for_model("hot").max_temperature == 0.5 and not cache.for_model("hot").semantic
    assert cache.for_model("other") == cache.default and cache.default.max_temperature == 0


def test_backends_may_all_be_discovered_through_kubernetes() -> None:
    config = parse_config("discovery:\n  kubernetes:\n    pools:\n      - {service: vllm-a, port: 8000, weight: 2}\n")
    assert config.backends == ()
    assert config.discovery.kubernetes is not None
    (pool,) = config.discovery.kubernetes.pools
    assert (pool.service, pool.port, pool.weight) == ("vllm-a", 8000, 2)
    with pytest.raises(ConfigError, match="pools"):
        parse_config("discovery:\n  kubernetes:\n    pools: []\n")
    with pytest.raises(ConfigError, match="each service may appear once"):
        parse_config("discovery:\n  kubernetes:\n    pools: [{service: a}, {service: a}]\n")
    with pytest.raises(ConfigError, match="service"):
        parse_config("discovery:\n  kubernetes:\n    pools: [{service: Not_A_Service}]\n")
