"""Managed keys and JWTs through the gateway: lifecycle over the admin API, revocation across replicas."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from sluice.app import Gateway
from tests.component.test_jwt import AUDIENCE, ISSUER, public_jwk, token
from tests.conftest import API_KEY, StartFake, StartGateway

ADMIN = "admin-identity-0123456789"
SECRET = "s" * 40
CHAT = {"model": "base", "messages": [{"role": "user", "content": "hi"}]}
HEALTH = {"interval": 60, "timeout": 1, "discovery_interval": 60}


def identity(tmp_path: Path, **auth: Any) -> dict[str, Any]:
    return {
        "auth": {"api_keys": [{"name": "static", "key": API_KEY}], "admin_key": ADMIN, "key_secret": SECRET, **auth},
        "database": {"url": f"sqlite:///{tmp_path}/sluice.db"},
    }


async def call(gw: Gateway, method: str, path: str, key: str, body: Any = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.request(
        method, gw.url + path, json=body, headers={"Authorization": f"Bearer {key}"}
    ) as response:
        return response.status, orjson.loads(await response.read() or b"null")


async def chat(gw: Gateway, key: str, model: str = "base") -> tuple[int, Any]:
    return await call(gw, "POST", "/v1/chat/completions", key, {**CHAT, "model": model})


async def test_managed_key_lifecycle_over_the_admin_api(
    tmp_path: Path, fake: StartFake, gateway: StartGateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    gw = await gateway([await fake("base", loras=["medical"])], health=HEALTH, **identity(tmp_path))
    status, created = await call(gw, "POST", "/admin/keys", ADMIN, {"name": "team-a", "models": ["medical"]})
    assert status == 201, created
    key, key_id = created["key"], created["id"]
    assert key.startswith("sk-sluice-") and len(key) > 40
    assert (await chat(gw, key, "medical"))[0] == 200
    status, error = await chat(gw, key, "base")
    assert status == 403 and error["error"]["code"] == "model_not_allowed"
    status, listing = await call(gw, "GET", "/admin/keys", ADMIN)
    assert status == 200 and [k["name"] for k in listing["data"]] == ["team-a"]
    assert key not in orjson.dumps(listing).decode()

    status, rotated = await call(gw, "POST", f"/admin/keys/{key_id}/rotate", ADMIN)
    assert status == 200 and rotated["id"] == key_id and rotated["key"] != key
    unknown = await chat(gw, "sk-sluice-" + secrets.token_urlsafe(32), "medical")
    old = await chat(gw, key, "medical")
    assert old == unknown and old[0] == 401  # a replaced key looks like any wrong key
    assert (await chat(gw, rotated["key"], "medical"))[0] == 200

    status, revoked = await call(gw, "POST", "/admin/keys/team-a/revoke", ADMIN)
    assert status == 200 and revoked["revoked_at"]
    assert await chat(gw, rotated["key"], "medical") == unknown  # at once, despite the cache
    assert (await call(gw, "GET", "/admin/keys", ADMIN))[1]["data"] == []  # revoked keys only with ?all=1
    assert [k["name"] for k in (await call(gw, "GET", "/admin/keys?all=1", ADMIN))[1]["data"]] == ["team-a"]
    assert (await call(gw, "GET", "/admin/keys?xall=10", ADMIN))[1]["data"] == []  # not a substring match
    assert (await call(gw, "POST", "/admin/keys", API_KEY, {"name": "x"}))[0] == 401  # API keys are not admin
    assert (await call(gw, "POST", "/admin/keys", ADMIN, {"name": "bad name!"}))[0] == 400
    assert (await call(gw, "POST", "/admin/keys", ADMIN, {"name": "team-b", "rpm": 5}))[0] == 400
    assert (await call(gw, "GET", "/admin/keys/nope", ADMIN))[0] == 404

    logged = caplog.text + gw.metrics.render().decode()
    for secret in (key, rotated["key"], key[-20:], rotated["key"][-20:]):
        assert secret not in logged


async def test_expired_key_is_refused(tmp_path: Path, fake: StartFake, gateway: StartGateway) -> None:
    gw = await gateway([await fake("base")], health=HEALTH, **identity(tmp_path))
    status, error = await call(gw, "POST", "/admin/keys", ADMIN, {"name": "past", "expires_at": "2000-01-01T00:00:00Z"})
    assert status == 400, error
    soon = (datetime.now(UTC) + timedelta(seconds=1.5)).isoformat()
    status, created = await call(gw, "POST", "/admin/keys", ADMIN, {"name": "brief", "expires_at": soon})
    assert status == 201
    assert (await chat(gw, created["key"]))[0] == 200  # cached now, but never past its expiry
    await asyncio.sleep(1.6)
    status, error = await chat(gw, created["key"])
    assert status == 401 and error["error"]["message"] == "Invalid API key."


async def test_revocation_reaches_another_replica_within_a_second(
    tmp_path: Path, fake: StartFake, gateway: StartGateway
) -> None:
    backend = await fake("base")
    shared = {**identity(tmp_path), "redis": {"url": "redis://127.0.0.1:6379/0"}}
    first = await gateway([backend], health=HEALTH, **shared)
    second = await gateway([backend], health=HEALTH, **shared)
    status, created = await call(first, "POST", "/admin/keys", ADMIN, {"name": "roaming"})
    assert status == 201
    assert (await chat(second, created["key"]))[0] == 200  # now cached on the second replica (5 s TTL)
    await call(first, "POST", f"/admin/keys/{created['id']}/revoke", ADMIN)
    await asyncio.sleep(1.0)
    assert (await chat(second, created["key"]))[0] == 401


async def test_managed_keys_off_without_a_secret(fake: StartFake, gateway: StartGateway) -> None:
    gw = await gateway(
        [await fake("base")], health=HEALTH, auth={"api_keys": [{"name": "s", "key": API_KEY}], "admin_key": ADMIN}
    )
    status, error = await call(gw, "GET", "/admin/keys", ADMIN)
    assert status == 404 and "auth.key_secret" in error["error"]["message"]
    assert (await chat(gw, "sk-sluice-" + "x" * 43))[0] == 401


async def test_jwt_bearer_tokens_through_the_gateway(tmp_path: Path, fake: StartFake, gateway: StartGateway) -> None:
    signing = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [public_jwk(signing, "rsa-1")]}))
    jwt_config = {
        "issuer": ISSUER, "audience": AUDIENCE, "jwks_file": str(jwks), "models_claim": "models",
        "limits": {"requests_per_minute": 60},
    }  # fmt: skip
    gw = await gateway(
        [await fake("base")], health=HEALTH,
        auth={"api_keys": [{"name": "static", "key": API_KEY}], "jwt": jwt_config},
    )
    alice = token(signing, tenant="acme", models=["base"])
    assert (await chat(gw, alice))[0] == 200
    status, error = await chat(gw, alice)  # 60 a minute, one at once: the user's own limit
    assert status == 429 and error["error"]["type"] == "rate_limit_error"
    assert (await chat(gw, token(signing, sub="bob", models=["base"])))[0] == 200  # another user, own budget
    assert (await chat(gw, token(signing, sub="carol", models=["other"])))[0] == 403
    expired = token(signing, sub="dave", exp=int(time.time()) - 3600)
    status, error = await chat(gw, expired)
    assert status == 401 and error["error"]["message"] == "Invalid bearer token."
    assert (await chat(gw, API_KEY))[0] == 200  # API keys still work beside tokens
