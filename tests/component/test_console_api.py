"""The console's server side: login and sessions, the cookie as a credential, state, drains, static files."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
import pytest
import redis.asyncio as redis
from multidict import CIMultiDict

from sluice.app import Gateway
from sluice.console import pages
from sluice.console.session import ConsoleSessions, session_cookie
from sluice.console.traffic import quantile
from tests.conftest import API_KEY, StartFake, StartGateway, eventually, free_port

ADMIN = "admin-console-0123456789"
AUTH = {"api_keys": [{"name": "test", "key": API_KEY}], "admin_key": ADMIN}
HEALTH = {"interval": 0.2, "timeout": 1.0, "discovery_interval": 0.5}
CHAT = {"model": "base", "messages": [{"role": "user", "content": "hi"}]}
CONSOLE = {"X-Sluice-Console": "1"}


async def request(
    url: str, method: str, path: str, headers: dict[str, str] | None = None, **kwargs: Any
) -> tuple[int, CIMultiDict[str], bytes, list[str]]:
    """Status, headers, body and every Set-Cookie; redirects are not followed."""
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url + path, headers=headers, allow_redirects=False, **kwargs) as response,
    ):
        cookies = response.headers.getall("Set-Cookie", [])
        return response.status, CIMultiDict(response.headers), await response.read(), cookies


async def login(gw: Gateway, key: str = ADMIN) -> tuple[int, CIMultiDict[str], list[str]]:
    status, headers, _, cookies = await request(gw.admin_url, "POST", "/console/login", data={"admin_key": key})
    return status, headers, cookies


async def session_token(gw: Gateway) -> str:
    status, headers, cookies = await login(gw)
    assert status == 303 and headers["Location"] == "/console", headers
    (cookie,) = cookies
    token = session_cookie(cookie.split(";")[0].encode())
    assert token is not None
    return token.decode()


def with_session(token: str, console: bool = True) -> dict[str, str]:
    return {"Cookie": f"other=1; sluice_console={token}", **(CONSOLE if console else {})}


async def test_login_sets_a_strict_session_cookie(fake: StartFake, gateway: StartGateway) -> None:
    gw = await gateway([await fake("base")], auth=AUTH, health=HEALTH)
    status, headers, cookies = await login(gw)
    assert status == 303 and headers["Location"] == "/console"
    (cookie,) = cookies
    attributes = [part.strip() for part in cookie.split(";")]
    assert attributes[0].startswith("sluice_console=") and len(attributes[0]) > 30
    assert {"Path=/", "HttpOnly", "Secure", "SameSite=Strict", "Max-Age=28800"} <= set(attributes)
    assert ADMIN not in cookie

    status, headers, _, cookies = await request(gw.url, "POST", "/console/logout")
    assert status == 303 and headers["Location"] == "/console"
    assert cookies and "sluice_console=;" in cookies[0] and "Max-Age=0" in cookies[0]


async def logout(url: str, token: str) -> None:
    status, headers, _, cookies = await request(url, "POST", "/console/logout", with_session(token, console=False))
    assert status == 303 and headers["Location"] == "/console" and "Max-Age=0" in cookies[0]


async def state_status(url: str, token: str) -> int:
    return (await request(url, "GET", "/console/api/state", with_session(token)))[0]


async def test_logout_ends_that_session_everywhere_it_is_used(fake: StartFake, gateway: StartGateway) -> None:
    """Not only the browser's copy: the logged-out token is refused as a credential, other sessions go on."""
    gw = await gateway([await fake("base")], auth=AUTH, health=HEALTH)
    gone, kept = await session_token(gw), await session_token(gw)
    await logout(gw.url, gone)
    for path in ("/console/api/state", "/admin/keys", "/v1/models"):
        status, _, body, _ = await request(gw.url, "GET", path, with_session(gone))
        assert status == 401, (path, body)
    status, _, _, _ = await request(gw.url, "POST", "/v1/chat/completions", with_session(gone), json=CHAT)
    assert status == 401
    assert await state_status(gw.url, kept) == 200
    await logout(gw.url, "not-a-token")  # nothing to end: the cookie is cleared all the same
    status, _, _, _ = await request(gw.url, "POST", "/console/logout")
    assert status == 303
    async with aiohttp.ClientSession() as session, session.get(gw.url + "/metrics") as response:
        assert 'sluice_auth_failures_total{reason="console_logged_out"} 4.0' in await response.text()


async def test_a_logout_reaches_every_replica_through_redis(fake: StartFake, gateway: StartGateway) -> None:
    prefix = f"test-logout-{free_port()}:"
    shared = {"url": "redis://127.0.0.1:6379/0", "key_prefix": prefix}
    backend = await fake("base")
    one = await gateway([backend], auth=AUTH, health=HEALTH, redis=shared)
    two = await gateway([backend], auth=AUTH, health=HEALTH, redis=shared)
    token = await session_token(one)
    assert await state_status(two.url, token) == 200  # one admin key: every replica accepts the session
    await logout(one.url, token)
    assert await state_status(two.url, token) == 401
    client = redis.Redis.from_url(shared["url"])
    try:
        (key,) = await client.keys(prefix + "console:logout:*")
        assert 28790 < await client.ttl(key) <= 28800  # kept until the token would have expired anyway
        await client.delete(key)
    finally:
        await client.aclose()
    assert await state_status(one.url, token) == 401  # the replica that saw the logout remembers it itself


async def test_with_redis_down_a_logout_still_holds_where_it_was_made(
    fake: StartFake, gateway: StartGateway, caplog: pytest.LogCaptureFixture
) -> None:
    closed = {"url": f"redis://127.0.0.1:{free_port()}/0", "timeout": 0.2}
    gw = await gateway([await fake("base")], auth=AUTH, health=HEALTH, redis=closed)
    gone, kept = await session_token(gw), await session_token(gw)
    with caplog.at_level(logging.WARNING, logger="sluice.console"):
        assert await state_status(gw.url, kept) == 200  # the console keeps working in the outage
        await logout(gw.url, gone)
        assert await state_status(gw.url, gone) == 401
    assert any("Redis did not answer" in record.getMessage() for record in caplog.records)


async def test_a_wrong_key_gets_no_cookie_and_is_not_written_anywhere(
    fake: StartFake, gateway: StartGateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    gw = await gateway([await fake("base")], auth=AUTH, health=HEALTH)
    wrong = "wrong-key-" + "x" * 20
    status, headers, cookies = await login(gw, wrong)
    assert status == 303 and headers["Location"] == "/console#login-failed"
    assert not cookies
    assert wrong not in headers["Location"]
    assert "console login refused" in caplog.text
    for record in caplog.records:
        assert wrong not in str(record.__dict__) and ADMIN not in str(record.__dict__)
    assert gw.metrics.auth_failures.child("console_login").value == 1
    status, _, _, cookies = await request(gw.url, "POST", "/console/login", data=b"admin_key=%ff%fe&x", headers={})
    assert status == 303 and not cookies  # unreadable bodies are just wrong keys


async def test_the_cookie_is_a_credential_only_with_the_console_header(fake: StartFake, gateway: StartGateway) -> None:
    backend = await fake("base")
    gw = await gateway([backend], auth=AUTH, health=HEALTH)
    token = await session_token(gw)

    for path in ("/admin/keys", "/console/api/state", "/v1/models"):
        status, headers, _, _ = await request(gw.url, "GET", path, with_session(token, console=False))
        assert status == 401, path
        status, _, _, _ = await request(gw.url, "GET", path, CONSOLE)
        assert status == 401, path
    status, _, _, _ = await request(gw.url, "POST", "/v1/chat/completions", with_session(token, False), json=CHAT)
    assert status == 401 and backend.stats.requests_total == 0

    status, _, body, _ = await request(gw.url, "GET", "/admin/keys", with_session(token))
    assert status == 404 and b"key_secret" in body  # authenticated; managed keys are just off here
    status, _, body, _ = await request(gw.url, "GET", "/console/api/state", with_session(token))
    assert status == 200, body
    status, headers, body, _ = await request(gw.url, "POST", "/v1/chat/completions", with_session(token), json=CHAT)
    assert status == 200, body
    assert headers["X-Sluice-Backend"] == "b0" and headers["X-Sluice-Model"] == "base"
    assert backend.stats.requests_total == 1
    status, headers, _, _ = await request(
        gw.url, "POST", "/v1/chat/completions", {"Authorization": f"Bearer {API_KEY}"}, json=CHAT
    )
    assert status == 200 and "X-Sluice-Backend" not in headers  # only the console is told
    status, _, _, _ = await request(  # a bearer header wins over the session
        gw.url, "GET", "/admin/keys", {**with_session(token), "Authorization": "Bearer nope-0123456789"}
    )
    assert status == 401


@pytest.mark.parametrize(
    "forge",
    [
        lambda token: "abc.def",
        lambda token: "",
        lambda token: token + "x",
        lambda token: token.replace(".", ""),
        lambda token: ConsoleSessions(ADMIN, 60, clock=lambda: time.time() - 3600).issue(),  # expired
        lambda token: ConsoleSessions("another-admin-key-0123", 3600).issue(),  # another admin key
        lambda token: ConsoleSessions(ADMIN, 60).issue().split(".")[0] + "9." + token.split(".")[1],  # longer
    ],
)
async def test_forged_expired_and_foreign_tokens_are_refused(
    forge: Any, fake: StartFake, gateway: StartGateway
) -> None:
    gw = await gateway([await fake("base")], auth=AUTH, health=HEALTH)
    token = await session_token(gw)
    for path in ("/admin/keys", "/console/api/state"):
        status, headers, body, _ = await request(gw.url, "GET", path, with_session(forge(token)))
        assert status == 401, (path, body)
        assert "Bearer" in headers["WWW-Authenticate"]
    status, _, _, _ = await request(gw.url, "POST", "/v1/chat/completions", with_session(forge(token)), json=CHAT)
    assert status == 401


def test_sessions_unit() -> None:
    now = [1000.0]
    sessions = ConsoleSessions(ADMIN, 60, clock=lambda: now[0])
    token = sessions.issue().encode()
    session = sessions.verify(token)
    assert session is not None and session.expires == 1060 and len(session.id) == 32
    other = sessions.verify(sessions.issue().encode())
    assert other is not None and other.id != session.id  # every login its own session
    now[0] += 59
    assert sessions.verify(token) == session
    now[0] += 1
    assert sessions.verify(token) is None
    now[0] = 1000.0
    old_format = b"1060"  # a token of the expiry alone, as before sessions had ids: signed, but refused
    signed = base64.urlsafe_b64encode(old_format).rstrip(b"=") + b"." + base64.urlsafe_b64encode(
        hmac.new(sessions._secret, old_format, hashlib.sha256).digest()
    ).rstrip(b"=")
    assert sessions.verify(signed) is None
    assert sessions.accepts_key(ADMIN.encode()) and not sessions.accepts_key(b"admin")
    assert session_cookie(b"a=1; sluice_console=tok; b=2") == b"tok"
    assert session_cookie(b"xsluice_console=tok") is None
    assert session_cookie(None) is None


def test_quantile_interpolates_like_prometheus() -> None:
    bounds = (0.1, 0.2, 0.4)
    assert quantile(0.5, bounds, [0, 0, 0, 0]) is None
    assert quantile(0.5, bounds, [2, 0, 0, 0]) == pytest.approx(0.05)
    assert quantile(0.5, bounds, [0, 4, 0, 0]) == pytest.approx(0.15)
    assert quantile(0.99, bounds, [0, 0, 0, 3]) == 0.4  # in +Inf: the highest finite bound


async def test_state_shows_backends_models_and_traffic(fake: StartFake, gateway: StartGateway) -> None:
    gw = await gateway([await fake("base", loras=["medical"], ttft_ms=5), await fake("base")], auth=AUTH, health=HEALTH)
    await eventually(lambda: all(b.healthy and b.scraped_at for b in gw.backends.all))
    bearer = {"Authorization": f"Bearer {API_KEY}"}
    for index in range(6):
        stream = {**CHAT, "model": "medical" if index % 2 else "base", "stream": index % 3 == 0}
        status, _, _, _ = await request(gw.url, "POST", "/v1/chat/completions", bearer, json=stream)
        assert status == 200
    await request(gw.url, "POST", "/v1/chat/completions", bearer, json={**CHAT, "model": "nope"})
    gw.traffic.sample()  # the point covering those requests, without waiting for the sampler's tick

    status, headers, body, _ = await request(gw.url, "GET", "/console/api/state", {"Authorization": f"Bearer {ADMIN}"})
    assert status == 200 and headers["Content-Type"] == "application/json"
    state = orjson.loads(body)
    assert state["refresh_seconds"] == 2 and state["version"] and abs(state["server_time"] - time.time()) < 5
    first, second = state["backends"]
    assert first["name"] == "b0" and first["url"].startswith("http://") and first["healthy"] is True
    assert first["models"] == ["base"] and first["adapters"] == ["medical"]
    assert second["models"] == ["base"] and second["adapters"] == []
    assert first["drained"] is False and first["drained_by"] == [] and first["circuit"] == "closed"
    assert first["in_flight"] == 0 and first["running"] is not None and first["waiting"] is not None
    assert 0 <= first["kv_cache_usage"] <= 1 and first["last_error"] == ""
    assert sorted(state["models"]) == ["base", "medical"] and state["rag_routes"] == []
    traffic = state["traffic"]
    assert traffic["interval"] == 2 and traffic["points"]
    point = traffic["points"][-1]
    assert point["rps"] > 0 and point["errors_per_s"] == 0 and point["rate_limited_per_s"] == 0
    assert point["cache_hit_rate"] is None  # the cache is off
    assert set(point["models"]) == {"base", "medical", "unknown"}
    base = point["models"]["base"]
    assert base["rps"] > 0 and base["latency_p50_ms"] > 0 and base["latency_p99_ms"] >= base["latency_p50_ms"]
    assert base["ttft_p50_ms"] is not None and base["ttft_p99_ms"] >= base["ttft_p50_ms"]


async def test_drain_and_undrain_change_routing(fake: StartFake, gateway: StartGateway) -> None:
    first, second = await fake("base"), await fake("base", loras=["medical"])
    gw = await gateway([first, second], auth=AUTH, health=HEALTH)
    await eventually(lambda: all(b.healthy for b in gw.backends.all))
    token = await session_token(gw)
    console = with_session(token)

    status, _, body, _ = await request(gw.url, "POST", "/admin/backends/b0/drain", console)
    assert status == 200 and orjson.loads(body) == {"name": "b0", "drained": True, "drained_by": ["console"]}
    status, _, body, _ = await request(gw.url, "POST", "/admin/backends/b0/drain", console)
    assert status == 200 and orjson.loads(body)["drained"] is True  # again: no change
    for _ in range(6):
        status, headers, _, _ = await request(gw.url, "POST", "/v1/chat/completions", console, json=CHAT)
        assert status == 200 and headers["X-Sluice-Backend"] == "b1"
    assert first.stats.requests_total == 0 and second.stats.requests_total == 6

    status, _, body, _ = await request(gw.url, "POST", "/admin/backends/b1/drain", console)
    assert status == 409, body
    error = orjson.loads(body)["error"]
    assert "base" in error["message"] and "medical" in error["message"]
    assert not gw.backends.by_name["b1"].drained_by

    status, _, body, _ = await request(gw.url, "POST", "/admin/backends/b0/undrain", console)
    assert status == 200 and orjson.loads(body) == {"name": "b0", "drained": False, "drained_by": []}
    for _ in range(6):
        await request(gw.url, "POST", "/v1/chat/completions", console, json=CHAT)
    assert first.stats.requests_total > 0

    admin = {"Authorization": f"Bearer {ADMIN}"}
    status, _, body, _ = await request(gw.url, "POST", "/admin/backends/nope/drain", admin)
    assert status == 404 and orjson.loads(body)["error"]["message"]
    status, _, _, _ = await request(gw.url, "POST", "/admin/backends/b0/explode", admin)
    assert status == 404
    status, headers, _, _ = await request(gw.url, "GET", "/admin/backends/b0/drain", admin)
    assert status == 405 and headers["Allow"] == "POST"
    status, _, _, _ = await request(gw.url, "POST", "/admin/backends/b0/drain", {"Authorization": f"Bearer {API_KEY}"})
    assert status == 401


async def raw_status(url: str, target: str) -> int:
    """The status of a GET of `target` exactly as written (no client normalising `..`)."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    line = await reader.readline()
    writer.close()
    return int(line.split()[1])


async def test_static_files_and_their_name_filter(
    fake: StartFake, gateway: StartGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pages, "STATIC", tmp_path)  # an empty folder: the placeholder page is served
    gw = await gateway([await fake("base")], auth=AUTH, health=HEALTH)
    status, headers, body, _ = await request(gw.url, "GET", "/console")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert b'name="admin_key"' in body and ADMIN.encode() not in body
    assert headers["Cache-Control"] == "no-cache" and "frame-ancestors 'none'" in headers["Content-Security-Policy"]

    (tmp_path / "console.html").write_text("<!doctype html><title>console</title>")
    (tmp_path / "app.js").write_text("console.log(1)")
    (tmp_path / "style.css").write_text("body { color: red }")
    (tmp_path / "logo.svg").write_text("<svg/>")
    (tmp_path / "notes.txt").write_text("secret")
    assert (await request(gw.url, "GET", "/console"))[2] == b"<!doctype html><title>console</title>"
    for name, content_type in (
        ("app.js", "text/javascript; charset=utf-8"),
        ("style.css", "text/css; charset=utf-8"),
        ("logo.svg", "image/svg+xml"),
        ("console.html", "text/html; charset=utf-8"),
    ):
        status, headers, body, _ = await request(gw.url, "GET", "/console/static/" + name)
        assert status == 200 and body == (tmp_path / name).read_bytes(), name
        assert headers["Content-Type"] == content_type and headers["Cache-Control"] == "no-cache"
    for name in ("missing.js", "APP.js", "notes.txt", "a.b.js", "", "sub/x.js", "%2e%2e/app.py", "app.js.map"):
        status, _, _, _ = await request(gw.url, "GET", "/console/static/" + name)
        assert status == 404, name
    for target in ("/console/static/../app.py", "/console/static/..%2fapp.py", "/console/static/../../pyproject.toml"):
        assert await raw_status(gw.url, target) == 404, target


async def test_console_is_off_without_an_admin_key_or_when_disabled(fake: StartFake, gateway: StartGateway) -> None:
    backend = await fake("base")
    off = await gateway([backend], health=HEALTH)
    for method, path in (("GET", "/console"), ("POST", "/console/login"), ("GET", "/console/static/app.js")):
        status, _, _, cookies = await request(off.url, method, path, data={"admin_key": "x"})
        assert status == 404 and not cookies, path
    status, _, _, _ = await request(off.url, "GET", "/console/api/state", CONSOLE)
    assert status == 404

    disabled = await gateway([backend], auth=AUTH, health=HEALTH, console={"enabled": False})
    token = ConsoleSessions(ADMIN, 3600).issue()
    assert (await request(disabled.url, "GET", "/console"))[0] == 404
    assert (await request(disabled.url, "GET", "/console/api/state", with_session(token)))[0] == 401
    assert (await request(disabled.url, "GET", "/console/api/state", {"Authorization": f"Bearer {ADMIN}"}))[0] == 404


async def test_the_console_lives_on_the_admin_listener(fake: StartFake, gateway: StartGateway) -> None:
    gw = await gateway(
        [await fake("base")],
        auth=AUTH,
        health=HEALTH,
        server={"host": "127.0.0.1", "port": 0, "admin_port": free_port()},
    )
    assert gw.admin_url != gw.url
    assert (await request(gw.url, "GET", "/console"))[0] == 404
    assert (await request(gw.url, "POST", "/console/login", data={"admin_key": ADMIN}))[0] == 404
    assert (await request(gw.admin_url, "GET", "/console"))[0] == 200
    token = await session_token(gw)  # logs in on the admin listener
    assert (await request(gw.admin_url, "GET", "/console/api/state", with_session(token)))[0] == 200
    status, headers, _, _ = await request(gw.url, "POST", "/v1/chat/completions", with_session(token), json=CHAT)
    assert status == 200 and headers["X-Sluice-Backend"] == "b0"  # a session works on the API listener too
    # The playground works where the page is: the admin listener takes its chat calls, from sessions only.
    status, headers, body, _ = await request(
        gw.admin_url, "POST", "/v1/chat/completions", with_session(token), json={**CHAT, "stream": True}
    )
    assert status == 200 and headers["X-Sluice-Backend"] == "b0" and body.rstrip().endswith(b"data: [DONE]")
    bearer = {"Authorization": f"Bearer {API_KEY}"}
    status, _, body, _ = await request(gw.admin_url, "POST", "/v1/chat/completions", bearer, json=CHAT)
    assert status == 404 and b"server.port" in body  # API keys use the API listener
    statuses = [
        (await request(gw.admin_url, "POST", "/v1/chat/completions", headers, json=CHAT))[0]
        for headers in ({}, with_session(token, console=False), with_session("forged.token"))
    ]
    assert statuses == [404, 404, 401]  # not a console call: not served here; a console call: its session
    for path in ("/v1/completions", "/v1/embeddings", "/v1/models", "/v1/usage"):  # the playground needs none
        method = "GET" if path in ("/v1/models", "/v1/usage") else "POST"
        status, _, _, _ = await request(gw.admin_url, method, path, with_session(token), json=CHAT)
        assert status == 404, path


async def test_the_sampler_follows_an_admin_key_given_or_taken_by_a_reload(
    fake: StartFake, gateway: StartGateway
) -> None:
    gw = await gateway([await fake("base")], auth={"api_keys": [{"name": "test", "key": API_KEY}]}, health=HEALTH)
    assert not gw.traffic.running and not gw.metrics.model_duration_on  # no console: nothing recorded
    await gw.reload(gw.config.model_copy(update={"auth": gw.config.auth.model_copy(update={"admin_key": ADMIN})}))
    assert gw.traffic.running and gw.metrics.model_duration_on
    await session_token(gw)  # and the console answers
    await gw.reload(gw.config.model_copy(update={"auth": gw.config.auth.model_copy(update={"admin_key": None})}))
    assert not gw.traffic.running and not gw.metrics.model_duration_on


async def test_a_cache_hit_names_no_backend(fake: StartFake, gateway: StartGateway) -> None:
    gw = await gateway([await fake("base")], auth=AUTH, health=HEALTH, cache={"enabled": True, "store": "memory"})
    headers = with_session(await session_token(gw))
    deterministic = {**CHAT, "temperature": 0}
    _, miss, _, _ = await request(gw.url, "POST", "/v1/chat/completions", headers, json=deterministic)
    assert miss["X-Sluice-Cache"] == "miss" and miss["X-Sluice-Backend"] == "b0"
    for _ in range(50):  # the answer is stored in the background once complete
        _, hit, _, _ = await request(gw.url, "POST", "/v1/chat/completions", headers, json=deterministic)
        if hit["X-Sluice-Cache"] == "hit-exact":
            break
        await asyncio.sleep(0.05)
    assert hit["X-Sluice-Cache"] == "hit-exact" and "X-Sluice-Backend" not in hit
