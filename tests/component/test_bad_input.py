"""Bad input gets the right 4xx and an OpenAI-shaped error body, never a 500."""

from __future__ import annotations

import aiohttp
import orjson
import pytest

from tests.conftest import API_KEY, StartFake, StartGateway

HEADERS = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
GOOD = {"model": "base", "messages": [{"role": "user", "content": "hi"}]}


def body(**changes: object) -> bytes:
    data = {**GOOD, **changes}
    return orjson.dumps({k: v for k, v in data.items() if v is not ...})


CASES = [
    ("malformed json", "/v1/chat/completions", b'{"model": "base", "messages": [', 400, "invalid_json", None),
    ("not an object", "/v1/chat/completions", b'["model"]', 400, "invalid_request", None),
    ("empty body", "/v1/chat/completions", b"", 400, "invalid_request", None),
    ("missing model", "/v1/chat/completions", body(model=...), 400, "invalid_request", "model"),
    ("model not a string", "/v1/chat/completions", body(model=3), 400, "invalid_request", "model"),
    ("missing messages", "/v1/chat/completions", body(messages=...), 400, "invalid_request", "messages"),
    ("messages not a list", "/v1/chat/completions", body(messages="hi"), 400, "invalid_request", "messages"),
    ("message without role", "/v1/chat/completions", body(messages=[{"content": "x"}]), 400, "invalid_request",
     "messages"),
    ("stream not a bool", "/v1/chat/completions", body(stream="yes"), 400, "invalid_request", "stream"),
    ("max_tokens negative", "/v1/chat/completions", body(max_tokens=-1), 400, "invalid_request", "max_tokens"),
    ("temperature a string", "/v1/chat/completions", body(temperature="hot"), 400, "invalid_request",
     "temperature"),
    ("bad stream_options", "/v1/chat/completions", body(stream_options=[1]), 400, "invalid_request",
     "stream_options"),
    ("prompt missing", "/v1/completions", orjson.dumps({"model": "base"}), 400, "invalid_request", "prompt"),
    ("input missing", "/v1/embeddings", orjson.dumps({"model": "base"}), 400, "invalid_request", "input"),
    ("unknown model", "/v1/chat/completions", body(model="gpt-nope"), 404, "model_not_found", "model"),
]


@pytest.mark.parametrize(("name", "path", "payload", "status", "code", "param"), CASES, ids=[c[0] for c in CASES])
async def test_bad_bodies(
    fake: StartFake, gateway: StartGateway, name: str, path: str, payload: bytes, status: int, code: str,
    param: str | None,
) -> None:
    backend = await fake("base")
    gw = await gateway([backend])
    async with aiohttp.ClientSession() as session, session.post(gw.url + path, data=payload, headers=HEADERS) as r:
        assert r.status == status
        assert r.headers["Content-Type"] == "application/json"
        assert r.headers["X-Request-Id"]
        error = (await r.json())["error"]
    assert error["code"] == code and error["param"] == param
    assert error["message"] and "Traceback" not in error["message"]
    assert backend.stats.requests_total == 0  # refused at the gateway


async def test_credentials(fake: StartFake, gateway: StartGateway) -> None:
    gw = await gateway([await fake("base")])
    async with aiohttp.ClientSession() as session:
        for headers in ({}, {"Authorization": "Bearer wrong-key-000"}, {"Authorization": API_KEY},
                        {"Authorization": "Basic dXNlcjpwYXNz"}):
            async with session.post(gw.url + "/v1/chat/completions", json=GOOD, headers=headers) as r:
                assert r.status == 401
                assert r.headers["WWW-Authenticate"].startswith("Bearer")
                error = (await r.json())["error"]
                assert error["type"] == "authentication_error" and API_KEY not in error["message"]
        async with session.get(gw.url + "/v1/models") as r:
            assert r.status == 401
        for public in ("/health", "/version", "/metrics", "/ready"):
            async with session.get(gw.url + public) as r:
                assert r.status == 200, public


async def test_unknown_paths_and_wrong_methods(fake: StartFake, gateway: StartGateway) -> None:
    gw = await gateway([await fake("base")])
    async with aiohttp.ClientSession() as session:
        for path in ("/", "/v1", "/v1/chat", "/admin", "/v1/chat/completions/", "/../etc/passwd"):
            async with session.get(gw.url + path, headers=HEADERS) as r:
                assert r.status == 404, path
                assert (await r.json())["error"]["code"] == "not_found"
        async with session.get(gw.url + "/v1/chat/completions", headers=HEADERS) as r:
            assert r.status == 405 and r.headers["Allow"] == "POST"
            assert (await r.json())["error"]["code"] == "method_not_allowed"
        async with session.post(gw.url + "/v1/models", headers=HEADERS) as r:
            assert r.status == 405 and r.headers["Allow"] == "GET"


async def test_body_over_the_limit_is_413(fake: StartFake, gateway: StartGateway) -> None:
    backend = await fake("base")
    gw = await gateway([backend], limits={"max_body_bytes": 64 * 1024})
    huge = body(messages=[{"role": "user", "content": "x" * 100_000}])
    async with aiohttp.ClientSession() as session:
        async with session.post(gw.url + "/v1/chat/completions", data=huge, headers=HEADERS) as r:
            assert r.status == 413
            assert (await r.json())["error"]["code"] == "request_too_large"

        async def chunks():  # type: ignore[no-untyped-def]
            for _ in range(20):
                yield b"x" * 8192

        async with session.post(gw.url + "/v1/chat/completions", data=chunks(), headers=HEADERS) as r:
            assert r.status == 413  # chunked bodies are counted as they arrive
    assert backend.stats.requests_total == 0


async def test_per_key_model_allow_list(fake: StartFake, gateway: StartGateway) -> None:
    gw = await gateway(
        [await fake("base", loras=["medical"])],
        auth={"api_keys": [{"name": "limited", "key": "sk-limited-123", "models": ["medical"]}]},
    )
    headers = {"Authorization": "Bearer sk-limited-123"}
    async with aiohttp.ClientSession() as session:
        async with session.post(gw.url + "/v1/chat/completions", json=GOOD, headers=headers) as r:
            assert r.status == 403 and (await r.json())["error"]["code"] == "model_not_allowed"
        medical = {**GOOD, "model": "medical"}
        async with session.post(gw.url + "/v1/chat/completions", json=medical, headers=headers) as r:
            assert r.status == 200
        async with session.get(gw.url + "/v1/models", headers=headers) as r:
            assert [m["id"] for m in (await r.json())["data"]] == ["medical"]


async def test_backend_4xx_is_passed_through(fake: StartFake, gateway: StartGateway) -> None:
    gw = await gateway([await fake("base")])
    async with aiohttp.ClientSession() as session, session.post(
        gw.url + "/v1/chat/completions", json=GOOD, headers={**HEADERS, "X-Fake-Fail": "400"}
    ) as r:
        assert r.status == 400
        assert "error" in await r.json()
