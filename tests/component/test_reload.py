"""Reloading backends, keys, routing and adapters in a running gateway without dropping connections."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

from sluice.app import Gateway
from sluice.testing.fake_vllm import FakeVLLM
from tests.conftest import API_KEY, StartFake, StartGateway, gateway_config

ADMIN = "admin-0123456789abcdef"
NEW_KEY = "sk-new-0123456789"
CHAT = {"model": "base", "messages": [{"role": "user", "content": "hi"}]}
HEALTH = {"interval": 60, "timeout": 1, "discovery_interval": 60}


def write(path: Path, backends: dict[str, FakeVLLM], keys: dict[str, str], **sections: Any) -> None:
    data = {
        "server": {"host": "127.0.0.1", "port": 0},
        "backends": [{"name": name, "url": fake.url} for name, fake in backends.items()],
        "auth": {"api_keys": [{"name": n, "key": k} for n, k in keys.items()], "admin_key": ADMIN},
        "health": HEALTH,
        "logging": {"level": "warning"},
        **sections,
    }
    path.write_text(yaml.safe_dump(data))


async def one_backend(tmp_path: Path, fake: StartFake, gateway: StartGateway) -> tuple[Gateway, Path, FakeVLLM]:
    """A gateway started from a file with one fake backend `a` and one API key."""
    backend = await fake("base")
    config = tmp_path / "sluice.yaml"
    write(config, {"a": backend}, {"k": API_KEY})
    return await gateway(config_path=config), config, backend


async def call(
    session: aiohttp.ClientSession, url: str, key: str, body: dict[str, Any] | None = None
) -> tuple[int, Any]:
    method = session.post if body is not None or url.endswith("/reload") else session.get
    async with method(url, json=body, headers={"Authorization": f"Bearer {key}"}) as response:
        return response.status, orjson.loads(await response.read())


async def test_reload_swaps_backends_and_keys_while_a_stream_and_a_connection_stay_open(
    tmp_path: Path, fake: StartFake, gateway: StartGateway
) -> None:
    old, new = await fake("base", tokens=30, itl_ms=30), await fake("base")
    config = tmp_path / "sluice.yaml"
    write(config, {"old": old}, {"first": API_KEY})
    gw = await gateway(config_path=config)
    one_connection = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession() as streaming, aiohttp.ClientSession(connector=one_connection) as session:
        assert (await call(session, gw.url + "/v1/chat/completions", API_KEY, CHAT))[0] == 200
        auth = {"Authorization": f"Bearer {API_KEY}"}
        stream = await streaming.post(gw.url + "/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth)
        assert stream.status == 200
        write(config, {"new": new}, {"second": NEW_KEY})
        status, summary = await call(session, gw.url + "/admin/reload", ADMIN)
        assert status == 200, summary
        assert summary["backends"] == {"kept": [], "added": ["new"], "changed": [], "removed": ["old"]}
        assert summary["api_keys"] == 1 and summary["restart_required"] == []
        body = await stream.read()  # the stream on the removed backend finishes untouched
        assert body.endswith(b"data: [DONE]\n\n") and body.count(b"data: {") == 32  # role, 30 tokens, finish
        status, answer = await call(session, gw.url + "/v1/chat/completions", NEW_KEY, CHAT)
        assert status == 200, answer
        assert (await call(session, gw.url + "/v1/chat/completions", API_KEY, CHAT))[0] == 401
        assert [b.name for b in gw.backends.all] == ["new"] and new.stats.completed == 1
        assert len(gw._connections) == 2  # the keep-alive connection lived through the reload
    assert old.stats.completed == 2 and old.stats.aborted == 0


async def test_an_unchanged_backend_keeps_its_state_and_a_changed_one_is_replaced(
    tmp_path: Path, fake: StartFake, gateway: StartGateway
) -> None:
    a, b = await fake("base"), await fake("base")
    config = tmp_path / "sluice.yaml"
    write(config, {"a": a, "b": b}, {"k": API_KEY})
    gw = await gateway(config_path=config)
    kept, replaced = gw.backends.by_name["a"], gw.backends.by_name["b"]
    data = yaml.safe_load(config.read_text())
    data["backends"][1]["weight"] = 3
    data["routing"] = {"strategy": "round_robin", "retry_after": 9}
    data["timeouts"] = {"read": 12}
    config.write_text(yaml.safe_dump(data))
    summary = await gw.reload_from_file()
    assert summary["backends"] == {"kept": ["a"], "added": [], "changed": ["b"], "removed": []}
    assert summary["restart_required"] == ["timeouts"]
    assert gw.backends.by_name["a"] is kept and gw.backends.by_name["b"] is not replaced
    assert gw.backends.by_name["b"].weight == 3 and gw.backends.by_name["b"].healthy  # probed before use
    assert gw.config.routing.strategy == "round_robin" and gw.config.timeouts.read == 300  # read: at restart
    assert gw.admission.retry_after == (("retry-after", "9"),)


async def test_an_invalid_file_is_refused_and_the_running_config_stays(
    tmp_path: Path, fake: StartFake, gateway: StartGateway
) -> None:
    gw, config, _backend = await one_backend(tmp_path, fake, gateway)
    config.write_text(config.read_text().replace("weight", "wieght") + "routing: {strategy: fastest}\n")
    async with aiohttp.ClientSession() as session:
        status, error = await call(session, gw.url + "/admin/reload", ADMIN)
        assert status == 400 and error["error"]["code"] == "invalid_config"
        assert "sluice.yaml:" in error["error"]["message"] and "routing.strategy" in error["error"]["message"]
        assert "running one stays" in error["error"]["message"]
        assert (await call(session, gw.url + "/v1/chat/completions", API_KEY, CHAT))[0] == 200


async def test_the_admin_api_takes_only_the_admin_key(
    tmp_path: Path, fake: StartFake, gateway: StartGateway
) -> None:
    gw, _config, backend = await one_backend(tmp_path, fake, gateway)
    async with aiohttp.ClientSession() as session:
        assert (await call(session, gw.url + "/admin/reload", API_KEY))[0] == 401  # an API key is not enough
        assert (await call(session, gw.url + "/admin/reload", ADMIN + "x"))[0] == 401
        assert (await call(session, gw.url + "/v1/models", ADMIN))[0] == 401  # nor the admin key an API key
        async with session.get(gw.url + "/admin/reload", headers={"Authorization": f"Bearer {ADMIN}"}) as r:
            assert r.status == 405
    plain = Gateway(gateway_config([{"name": "a", "url": backend.url}]))  # no admin_key, no file
    await plain.start()
    try:
        async with aiohttp.ClientSession() as session:
            status, error = await call(session, plain.url + "/admin/reload", ADMIN)
            assert status == 404 and "auth.admin_key" in error["error"]["message"]
    finally:
        await plain.close()


async def test_reload_brings_in_an_adapter_registry(tmp_path: Path, fake: StartFake, gateway: StartGateway) -> None:
    gw, config, backend = await one_backend(tmp_path, fake, gateway)
    medical = {**CHAT, "model": "medical"}
    async with aiohttp.ClientSession() as session:
        assert (await call(session, gw.url + "/v1/chat/completions", API_KEY, medical))[0] == 404
        registry = [{"name": "medical", "path": "/adapters/medical", "base_model": "base"}]
        write(config, {"a": backend}, {"k": API_KEY}, adapters={"registry": registry})
        assert (await call(session, gw.url + "/admin/reload", ADMIN))[0] == 200
        status, answer = await call(session, gw.url + "/v1/chat/completions", API_KEY, medical)
        assert status == 200 and answer["model"] == "medical"
    assert backend.engine.loras.adapters == {"medical": "/adapters/medical"}


async def test_concurrent_reloads_apply_one_at_a_time(
    tmp_path: Path, fake: StartFake, gateway: StartGateway
) -> None:
    a, b = await fake("base"), await fake("base")
    config = tmp_path / "sluice.yaml"
    write(config, {"a": a}, {"k": API_KEY})
    gw = await gateway(config_path=config)
    write(config, {"a": a, "b": b}, {"k": API_KEY})
    first, second = await asyncio.gather(gw.reload_from_file(), gw.reload_from_file())
    assert first["backends"]["added"] == ["b"] and second["backends"]["kept"] == ["a", "b"]
    assert [x.name for x in gw.backends.all] == ["a", "b"]
