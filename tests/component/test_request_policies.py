"""Request policies of a running gateway: what reaches vLLM, media URLs (SSRF), CORS, the admin listener."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.component.test_http_protocol import chat_request, exchange
from tests.conftest import API_KEY, StartFake, StartGateway, free_port

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
ADMIN_KEY = "sk-admin-0123456789abcdef"
ORIGIN = "https://app.example.com"
UPSTREAM_KEY = "vllm-upstream-secret"


def image_chat(url: str, kind: str = "image_url") -> dict[str, Any]:
    part = {"type": kind, kind: {"url": url}}
    return {"model": "base", "messages": [{"role": "user", "content": [{"type": "text", "text": "what is it"}, part]}]}


async def post(session: aiohttp.ClientSession, url: str, body: dict[str, Any], **headers: str) -> tuple[int, Any]:
    async with session.post(url + "/v1/chat/completions", json=body, headers={**HEADERS, **headers}) as response:
        return response.status, await response.json()


# What reaches vLLM


async def test_hop_by_hop_headers_and_client_credentials_never_reach_the_backend(
    fake: StartFake, gateway: StartGateway
) -> None:
    backend = await fake("base")
    gw = await gateway([backend], backends_extra={"api_key": UPSTREAM_KEY})
    extra = (
        b"Cookie: session=abc\r\nConnection: keep-alive, X-Secret-Hop\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n"
        b"Trailer: X-Checksum\r\nUpgrade: websocket\r\nProxy-Authorization: Basic eDp5\r\nProxy-Anything: 1\r\n"
        b"X-Secret-Hop: private\r\nX-Named-Later: private\r\nConnection: x-named-later\r\nX-Keep-Me: yes\r\n"
        b"Authorization: Bearer second-client-credential\r\n"
    )
    responses, _ = await exchange(gw.port, chat_request(extra=extra), 1)
    assert responses.done[0][0] == 200
    seen = {name.lower(): value for name, value in backend.stats.last_request_headers.items()}
    assert seen["authorization"] == f"Bearer {UPSTREAM_KEY}"  # exactly the gateway's own, once
    assert seen["x-keep-me"] == "yes"  # end-to-end headers still pass
    for name in ("cookie", "keep-alive", "te", "trailer", "upgrade", "proxy-authorization", "proxy-anything",
                 "x-secret-hop", "x-named-later"):  # fmt: skip
        assert name not in seen, name
    assert "connection" not in seen or seen["connection"].lower() in ("keep-alive", "close")
    assert API_KEY not in str(seen) and "second-client-credential" not in str(seen)


async def test_without_an_upstream_key_no_authorization_is_sent(fake: StartFake, gateway: StartGateway) -> None:
    backend = await fake("base")
    gw = await gateway([backend])
    async with aiohttp.ClientSession() as session:
        status, _ = await post(session, gw.url, image_chat("data:image/png;base64,AAAA"), Cookie="a=b")
    assert status == 200
    seen = {name.lower() for name in backend.stats.last_request_headers}
    assert "authorization" not in seen and "cookie" not in seen


# Media URLs the backend would fetch (SSRF)

REFUSED_BY_DEFAULT = {
    "loopback": "http://127.0.0.1:8000/admin",
    "uppercase scheme": "HTTP://127.0.0.1/x.png",
    "cloud metadata": "http://169.254.169.254/latest/meta-data/",
    "private network": "https://10.1.2.3/x.png",
    "ipv6 loopback": "http://[::1]/x.png",
    "ipv4-mapped ipv6": "http://[::ffff:127.0.0.1]/x.png",
    "decimal ipv4": "http://2130706433/x.png",
    "hex ipv4": "http://0x7f.1/x.png",
    "octal ipv4": "http://0177.0.0.1/x.png",
    "userinfo trick": "http://public.example.com@127.0.0.1/x.png",
    "localhost": "http://localhost/x.png",
    "localhost with a trailing dot": "http://localhost./x.png",
    "backslash trick": "http://127.0.0.1\\@example.com/x.png",
    "file scheme": "file:///etc/passwd",
    "gopher scheme": "gopher://127.0.0.1:6379/_FLUSHALL",
}


@pytest.mark.parametrize("url", REFUSED_BY_DEFAULT.values(), ids=REFUSED_BY_DEFAULT.keys())
async def test_private_media_urls_are_refused_by_default(fake: StartFake, gateway: StartGateway, url: str) -> None:
    backend = await fake("base")
    gw = await gateway([backend])
    async with aiohttp.ClientSession() as session:
        status, answer = await post(session, gw.url, image_chat(url))
    assert status == 400
    error = answer["error"]
    assert error["code"] == "media_url_not_allowed" and error["type"] == "invalid_request_error"
    assert error["param"] == "messages[0].content[1].image_url.url"
    assert error["message"].startswith("messages[0].content[1].image_url.url ") and "data: URL" in error["message"]
    assert backend.stats.requests_total == 0


async def test_names_resolving_to_private_addresses_are_refused(fake: StartFake, gateway: StartGateway) -> None:
    name = socket.gethostname().lower()
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(name, None)}
    except OSError:
        pytest.skip(f"{name} does not resolve here")
    if not all(a.startswith(("127.", "10.", "172.", "192.168.", "::1", "fe80")) for a in addresses):
        pytest.skip(f"{name} resolves to a public address here")
    backend = await fake("base")
    gw = await gateway([backend])
    async with aiohttp.ClientSession() as session:
        status, answer = await post(session, gw.url, image_chat(f"http://{name}/x.mp4", "video_url"))
    assert status == 400 and answer["error"]["param"] == "messages[0].content[1].video_url.url"
    assert f"names the host {name}, which resolves to" in answer["error"]["message"]
    assert backend.stats.requests_total == 0


async def test_public_and_inline_media_pass(fake: StartFake, gateway: StartGateway) -> None:
    backend = await fake("base")
    gw = await gateway([backend])
    async with aiohttp.ClientSession() as session:
        for url in ("http://93.184.216.34/cat.png", "https://[2606:4700:4700::1111]/x.png", "data:image/png;base64,AA"):
            status, _ = await post(session, gw.url, image_chat(url))
            assert status == 200, url
            assert backend.stats.last_request_body == image_chat(url)  # forwarded untouched
        plain = {"model": "base", "messages": [{"role": "user", "content": "http://127.0.0.1/ is only text"}]}
        assert (await post(session, gw.url, plain))[0] == 200


async def test_deny_allows_only_inline_media(fake: StartFake, gateway: StartGateway) -> None:
    backend = await fake("base")
    gw = await gateway([backend], media={"remote_urls": "deny"})
    async with aiohttp.ClientSession() as session:
        status, answer = await post(session, gw.url, image_chat("https://93.184.216.34/cat.wav", "audio_url"))
        assert status == 400 and "media.remote_urls: deny" in answer["error"]["message"]
        assert (await post(session, gw.url, image_chat("data:audio/wav;base64,AAAA", "audio_url")))[0] == 200
    assert backend.stats.requests_total == 1


async def test_allow_passes_every_url_through(fake: StartFake, gateway: StartGateway) -> None:
    backend = await fake("base")
    gw = await gateway([backend], media={"remote_urls": "allow"})
    async with aiohttp.ClientSession() as session:
        assert (await post(session, gw.url, image_chat("http://127.0.0.1/x.png")))[0] == 200


# CORS


async def test_cors_is_off_by_default(fake: StartFake, gateway: StartGateway) -> None:
    gw = await gateway([await fake("base")])
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
    async with aiohttp.ClientSession() as session:
        async with session.options(gw.url + "/v1/chat/completions", headers=preflight) as response:
            assert response.status == 405  # the default-deny answer: no CORS headers, so browsers refuse
            assert not [h for h in response.headers if h.lower().startswith("access-control-")]
        chat = {"model": "base", "messages": [{"role": "user", "content": "hi"}]}
        async with session.post(gw.url + "/v1/chat/completions", json=chat, headers={**HEADERS, "Origin": ORIGIN}) as r:
            assert r.status == 200
            assert not [h for h in r.headers if h.lower().startswith("access-control-")]


async def test_cors_preflight_for_listed_origins_only(fake: StartFake, gateway: StartGateway) -> None:
    gw = await gateway([await fake("base")], cors={"allow_origins": [ORIGIN + "/"], "max_age": 120})
    asked = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"}
    async with aiohttp.ClientSession() as session:
        async with session.options(gw.url + "/v1/chat/completions", headers={"Origin": ORIGIN, **asked}) as response:
            assert response.status == 204
            assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
            assert response.headers["Access-Control-Allow-Methods"] == "POST"
            assert response.headers["Access-Control-Allow-Headers"] == "authorization, content-type, x-request-id"
            assert response.headers["Access-Control-Max-Age"] == "120"
            assert "origin" in response.headers["Vary"].lower()
            assert "Access-Control-Allow-Credentials" not in response.headers
            assert "Content-Length" not in response.headers and await response.read() == b""
        evil = {"Origin": "https://evil.example.com", **asked}
        async with session.options(gw.url + "/v1/chat/completions", headers=evil) as response:
            assert response.status == 405
            assert "Access-Control-Allow-Origin" not in response.headers
        async with session.options(gw.url + "/nowhere", headers={"Origin": ORIGIN, **asked}) as response:
            assert response.status == 404 and response.headers["Access-Control-Allow-Origin"] == ORIGIN


async def test_cors_marks_answers_errors_and_streams_for_listed_origins(fake: StartFake, gateway: StartGateway) -> None:
    gw = await gateway([await fake("base", tokens=3)], cors={"allow_origins": [ORIGIN], "allow_credentials": True})
    chat = {"model": "base", "messages": [{"role": "user", "content": "hi"}]}
    listed = {**HEADERS, "Origin": ORIGIN}
    async with aiohttp.ClientSession() as session:
        for body, headers, status in (
            (chat, listed, 200),
            ({**chat, "stream": True}, listed, 200),
            (chat, {"Origin": ORIGIN, "Authorization": "Bearer wrong-key-000"}, 401),
            ({"model": "base"}, listed, 400),
            (image_chat("http://127.0.0.1/x.png"), listed, 400),
        ):
            async with session.post(gw.url + "/v1/chat/completions", json=body, headers=headers) as response:
                assert response.status == status
                await response.read()
                assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
                assert response.headers["Access-Control-Allow-Credentials"] == "true"
                assert response.headers["Vary"].lower() == "origin"
                assert "x-request-id" in response.headers["Access-Control-Expose-Headers"]
        async with session.post(
            gw.url + "/v1/chat/completions", json=chat, headers={**HEADERS, "Origin": "https://evil.example.com"}
        ) as response:
            assert response.status == 200
            assert not [h for h in response.headers if h.lower().startswith("access-control-")]


async def test_cors_any_origin_without_credentials(fake: StartFake, gateway: StartGateway) -> None:
    gw = await gateway([await fake("base")], cors={"allow_origins": ["*"], "allow_headers": ["*"]})
    asked = {"Origin": "https://anywhere.example", "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, x-stainless-os"}  # fmt: skip
    async with aiohttp.ClientSession() as session:
        async with session.options(gw.url + "/v1/chat/completions", headers=asked) as response:
            assert response.status == 204 and response.headers["Access-Control-Allow-Origin"] == "*"
            assert response.headers["Access-Control-Allow-Headers"] == "authorization, x-stainless-os"
        async with session.get(gw.url + "/v1/models", headers={**HEADERS, "Origin": "https://x.example"}) as response:
            assert response.status == 200 and response.headers["Access-Control-Allow-Origin"] == "*"
            assert "Access-Control-Allow-Credentials" not in response.headers


# The admin listener


def admin_config(tmp_path: Path, backend_url: str, **server: object) -> Path:
    path = tmp_path / "sluice.yaml"
    path.write_text(
        orjson.dumps(
            {
                "server": {"host": "127.0.0.1", "port": 0, "admin_host": "127.0.0.1", "admin_port": 0, **server},
                "backends": [{"name": "a", "url": backend_url}],
                "auth": {"api_keys": [{"name": "t", "key": API_KEY}], "admin_key": ADMIN_KEY},
                "database": {"url": f"sqlite:///{tmp_path}/sluice.db"},
                "audit": {"journal_dir": str(tmp_path / "journal")},
                "health": {"interval": 0.2, "timeout": 1.0},
                "logging": {"level": "warning"},
            }
        ).decode()  # JSON is YAML
    )
    return path


async def test_admin_api_is_served_only_on_the_admin_listener(
    fake: StartFake, gateway: StartGateway, tmp_path: Path
) -> None:
    backend = await fake("base")
    gw = await gateway(config_path=admin_config(tmp_path, backend.url))
    assert gw.admin_port and gw.admin_port != gw.port and gw.admin_url.endswith(f":{gw.admin_port}")
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with aiohttp.ClientSession() as session:
        async with session.post(gw.url + "/admin/reload", headers=admin) as response:
            assert response.status == 404 and (await response.json())["error"]["code"] == "not_found"
        async with session.post(gw.admin_url + "/admin/reload", headers=admin) as response:
            assert response.status == 200 and (await response.json())["status"] == "reloaded"
        async with session.post(gw.admin_url + "/admin/reload") as response:
            assert response.status == 401
        for path in ("/v1/models", "/health"):  # the admin listener serves the admin API and nothing else
            async with session.get(gw.admin_url + path, headers=HEADERS) as response:
                assert response.status == 404
        async with session.get(gw.url + "/v1/models", headers=HEADERS) as response:
            assert response.status == 200


async def test_admin_listener_with_several_workers(fake: StartFake, tmp_path: Path) -> None:
    backend = await fake("base")
    port, admin_port = free_port(), free_port()
    config = admin_config(tmp_path, backend.url, port=port, admin_port=admin_port, workers=2)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sluice", "serve", "--config", str(config),
        stderr=asyncio.subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    try:
        connector = aiohttp.TCPConnector(force_close=True)  # a connection each: SO_REUSEPORT spreads them
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(150):
                try:
                    async with session.get(f"http://127.0.0.1:{port}/ready") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.1)
            async with session.post(f"http://127.0.0.1:{port}/admin/reload", headers=admin) as response:
                assert response.status == 404
            pids = set()
            for _ in range(20):
                async with session.post(f"http://127.0.0.1:{admin_port}/admin/reload", headers=admin) as response:
                    assert response.status == 200
                    pids.add((await response.json())["pid"])
                if len(pids) == 2:
                    break
            assert len(pids) == 2, pids  # every worker serves the admin port
        cli = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sluice", "reload", "--config", str(config), stdout=asyncio.subprocess.PIPE
        )
        output, _ = await asyncio.wait_for(cli.communicate(), 30)
        assert cli.returncode == 0 and orjson.loads(output)["status"] == "reloaded"  # found the admin listener
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 10)


async def test_policies_change_on_reload(fake: StartFake, gateway: StartGateway, tmp_path: Path) -> None:
    backend = await fake("base")
    path = admin_config(tmp_path, backend.url)
    gw = await gateway(config_path=path)
    public = image_chat("https://93.184.216.34/cat.png")
    async with aiohttp.ClientSession() as session:
        assert (await post(session, gw.url, public))[0] == 200
        config = orjson.loads(path.read_text())
        path.write_text(orjson.dumps({**config, "media": {"remote_urls": "deny"}, "cors": {"allow_origins": [ORIGIN]}})
                        .decode())  # fmt: skip
        async with session.post(gw.admin_url + "/admin/reload", headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as r:
            assert r.status == 200 and (await r.json())["restart_required"] == []
        status, answer = await post(session, gw.url, public, Origin=ORIGIN)
        assert status == 400 and answer["error"]["code"] == "media_url_not_allowed"
        async with session.get(gw.url + "/v1/models", headers={**HEADERS, "Origin": ORIGIN}) as response:
            assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
