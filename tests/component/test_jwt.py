"""JWT bearer tokens: real tokens signed with key pairs made here, checked against a JWKS served over HTTP.

PyJWT checks `exp`/`nbf` against the wall clock, so those tokens keep a wide margin from it; everything the
verifier times itself (cache, TTL, refresh interval) runs on an injected clock that tests move by hand.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

import sluice.identity.jwt
from sluice.config import JwtConfig
from sluice.context import Limits
from sluice.identity.jwt import InvalidToken, JwtVerifier, looks_like_jwt

ISSUER = "https://idp.example.com/"
AUDIENCE = "sluice"
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def public_jwk(key: PrivateKey, kid: str) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPrivateKey):
        jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    else:
        jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**jwk, "kid": kid, "use": "sig"}


def token(key: PrivateKey, kid: str | None = "rsa-1", algorithm: str = "RS256", **claims: Any) -> str:
    now = int(time.time())
    payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 3600, **claims}
    payload = {name: value for name, value in payload.items() if value is not None}
    return jwt.encode(payload, key, algorithm=algorithm, headers={"kid": kid} if kid else None)


def segment(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rsa_key_2() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


class JwksServer:
    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.status = 200
        self.fetches = 0
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.fetches += 1
        if self.status != 200:
            return web.Response(status=self.status, text="down")
        return web.json_response({"keys": self.keys})


@pytest.fixture
async def jwks(rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey) -> AsyncIterator[JwksServer]:
    server = JwksServer()
    server.keys = [public_jwk(rsa_key, "rsa-1"), public_jwk(ec_key, "ec-1")]
    app = web.Application()
    app.router.add_get("/jwks", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    server.url = f"http://127.0.0.1:{port}/jwks"
    yield server
    await runner.cleanup()


MakeVerifier = Callable[..., Awaitable[JwtVerifier]]


@pytest.fixture
async def verifier_for(jwks: JwksServer) -> AsyncIterator[MakeVerifier]:
    """`await verifier_for(clock, **JwtConfig fields)`: a started verifier of the test JWKS server."""
    started: list[JwtVerifier] = []

    async def make(clock: Clock | None = None, **fields: Any) -> JwtVerifier:
        settings: dict[str, Any] = {"issuer": ISSUER, "audience": AUDIENCE, "jwks_url": jwks.url, **fields}
        if "jwks_file" in fields:
            settings.pop("jwks_url")
        verifier = JwtVerifier(JwtConfig.model_validate(settings), clock or Clock())
        await verifier.start()
        started.append(verifier)
        return verifier

    yield make
    for verifier in started:
        await verifier.close()


async def rejected(verifier: JwtVerifier, bearer: str) -> str:
    with pytest.raises(InvalidToken) as caught:
        await verifier.verify(bearer)
    assert caught.value.status == 401 and caught.value.message == "Invalid bearer token."
    return caught.value.reason


async def test_rs256_token_maps_claims_to_a_principal(verifier_for: MakeVerifier, rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = await verifier_for(models_claim="models", limits={"requests_per_minute": 60, "max_concurrency": 2})
    bearer = token(rsa_key, tenant="acme", scope="chat embed", models=["base", "medical"])
    principal = await verifier.verify(bearer)
    assert principal.kind == "jwt" and principal.name == "jwt:alice" and principal.subject == f"jwt:{ISSUER}:alice"
    assert principal.tenant == "acme" and principal.user == "alice"
    assert principal.scopes == {"chat", "embed"} and principal.models == frozenset({"base", "medical"})
    assert principal.limits == Limits(requests_per_minute=60, max_concurrency=2)
    assert looks_like_jwt(bearer.encode())


async def test_es256_token_with_a_scope_list_and_custom_claims(
    verifier_for: MakeVerifier, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    verifier = await verifier_for(user_claim="email", tenant_claim="org", scopes_claim="scp")
    bearer = token(ec_key, "ec-1", "ES256", email="bob@example.com", org="umbrella", scp=["chat"])
    principal = await verifier.verify(bearer)
    assert principal.user == "bob@example.com" and principal.tenant == "umbrella"
    assert principal.scopes == {"chat"} and principal.models is None


async def test_a_configured_models_claim_missing_from_the_token_allows_no_model(
    verifier_for: MakeVerifier, rsa_key: rsa.RSAPrivateKey
) -> None:
    verifier = await verifier_for(models_claim="models")
    assert (await verifier.verify(token(rsa_key))).models == frozenset()


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"exp": int(time.time()) - 3600}, "expired"),
        ({"nbf": int(time.time()) + 3600}, "not yet valid"),
        ({"aud": "someone-else"}, "Audience"),
        ({"iss": "https://evil.example.com/"}, "issuer"),
        ({"exp": None}, '"exp"'),
        ({"aud": None}, '"aud"'),
        ({"sub": None}, "'sub'"),
    ],
)
async def test_claims_that_fail_are_rejected(
    verifier_for: MakeVerifier, rsa_key: rsa.RSAPrivateKey, claims: dict[str, Any], reason: str
) -> None:
    verifier = await verifier_for()
    assert reason in await rejected(verifier, token(rsa_key, **claims))


async def test_exp_and_nbf_within_the_leeway_are_accepted(
    verifier_for: MakeVerifier, rsa_key: rsa.RSAPrivateKey
) -> None:
    verifier = await verifier_for(leeway=60)
    now = int(time.time())
    assert (await verifier.verify(token(rsa_key, exp=now - 20))).user == "alice"
    assert (await verifier.verify(token(rsa_key, nbf=now + 20))).user == "alice"


async def test_tampered_payload_and_signature_are_rejected(
    verifier_for: MakeVerifier, rsa_key: rsa.RSAPrivateKey
) -> None:
    verifier = await verifier_for()
    header, payload, signature = token(rsa_key, scope="chat").split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    forged = segment({**claims, "sub": "admin"})
    assert "Signature" in await rejected(verifier, f"{header}.{forged}.{signature}")
    middle = len(signature) // 2
    flipped = signature[:middle] + ("A" if signature[middle] != "A" else "B") + signature[middle + 1 :]
    assert "Signature" in await rejected(verifier, f"{header}.{payload}.{flipped}")
    for _ in range(2):  # a failure is never remembered as a success
        assert "Signature" in await rejected(verifier, f"{header}.{payload}.{flipped}")


async def test_alg_none_is_rejected(verifier_for: MakeVerifier) -> None:
    verifier = await verifier_for()
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "exp": now + 3600}
    for alg in ("none", "None", "NONE"):
        unsigned = f"{segment({'alg': alg, 'kid': 'rsa-1'})}.{segment(claims)}."
        assert looks_like_jwt(unsigned.encode())
        assert "not allowed" in await rejected(verifier, unsigned)


async def test_hs256_signed_with_the_rsa_public_key_is_rejected(
    verifier_for: MakeVerifier, rsa_key: rsa.RSAPrivateKey
) -> None:
    verifier = await verifier_for()
    pem = rsa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "exp": now + 3600}
    signing_input = f"{segment({'alg': 'HS256', 'typ': 'JWT', 'kid': 'rsa-1'})}.{segment(claims)}"
    mac = base64.urlsafe_b64encode(hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()).rstrip(b"=")
    assert "'HS256' is not allowed" in await rejected(verifier, f"{signing_input}.{mac.decode()}")


async def test_an_algorithm_outside_the_allow_list_is_rejected(
    verifier_for: MakeVerifier, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    verifier = await verifier_for(algorithms=["RS256"])
    assert "'ES256' is not allowed" in await rejected(verifier, token(ec_key, "ec-1", "ES256"))
    assert "'RS384' is not allowed" in await rejected(verifier, token(rsa_key, "rsa-1", "RS384"))


async def test_a_kid_of_the_other_key_type_finds_no_key(
    verifier_for: MakeVerifier, rsa_key: rsa.RSAPrivateKey, jwks: JwksServer
) -> None:
    verifier = await verifier_for()
    assert "no RS256 key with kid 'ec-1'" in await rejected(verifier, token(rsa_key, "ec-1", "RS256"))
    assert jwks.fetches == 1  # the kid is known: refetching could not help


async def test_unknown_kid_refetches_once_then_is_rejected_and_refetches_are_rate_limited(
    verifier_for: MakeVerifier, rsa_key: rsa.RSAPrivateKey, jwks: JwksServer
) -> None:
    clock = Clock()
    verifier = await verifier_for(clock, jwks_refresh_interval=30)
    assert jwks.fetches == 1
    assert "unknown kid 'nope-1'" in await rejected(verifier, token(rsa_key, "nope-1"))
    assert jwks.fetches == 2
    clock.advance(10)
    for kid in ("nope-2", "nope-3", "nope-4"):
        assert "unknown kid" in await rejected(verifier, token(rsa_key, kid))
    assert jwks.fetches == 2
    clock.advance(25)
    assert "unknown kid" in await rejected(verifier, token(rsa_key, "nope-5"))
    assert jwks.fetches == 3


async def test_rotation_new_kid_is_fetched_and_the_retired_key_stops_working(
    verifier_for: MakeVerifier, rsa_key: rsa.RSAPrivateKey, rsa_key_2: rsa.RSAPrivateKey, jwks: JwksServer
) -> None:
    clock = Clock()
    verifier = await verifier_for(clock)
    assert (await verifier.verify(token(rsa_key, "rsa-1"))).user == "alice"
    jwks.keys = [public_jwk(rsa_key_2, "rsa-2")]  # the provider rotates: adds rsa-2, retires rsa-1
    assert (await verifier.verify(token(rsa_key_2, "rsa-2", sub="carol"))).user == "carol"
    assert jwks.fetches == 2
    assert "unknown kid 'rsa-1'" in await rejected(verifier, token(rsa_key, "rsa-1", sub="dave"))


async def test_the_key_set_is_refetched_after_its_ttl_and_kept_when_that_fails(
    verifier_for: MakeVerifier, rsa_key: rsa.RSAPrivateKey, rsa_key_2: rsa.RSAPrivateKey, jwks: JwksServer
) -> None:
    clock = Clock()
    verifier = await verifier_for(clock, jwks_cache_ttl=300, jwks_refresh_interval=30)
    jwks.status = 503
    clock.advance(301)
    assert (await verifier.verify(token(rsa_key, sub="u1"))).user == "u1"  # served while the refetch runs
    await verifier.keys.settle()
    assert jwks.fetches == 2
    assert (await verifier.verify(token(rsa_key, sub="u2"))).user == "u2"  # the failed fetch kept the set
    assert jwks.fetches == 2  # and is retried only after the refresh interval
    jwks.status = 200
    jwks.keys = [public_jwk(rsa_key_2, "rsa-2")]
    clock.advance(31)
    assert (await verifier.verify(token(rsa_key, sub="u3"))).user == "u3"
    await verifier.keys.settle()
    assert jwks.fetches == 3
    assert (await verifier.verify(token(rsa_key_2, "rsa-2"))).user == "alice"
    assert "unknown kid" in await rejected(verifier, token(rsa_key, sub="u4"))
    assert jwks.fetches == 4  # the unknown-kid refetch, which finds rsa-1 retired


async def test_a_token_without_kid_is_tried_against_keys_of_its_type(
    verifier_for: MakeVerifier, rsa_key: rsa.RSAPrivateKey, rsa_key_2: rsa.RSAPrivateKey, jwks: JwksServer
) -> None:
    jwks.keys = [public_jwk(rsa_key_2, "rsa-2"), *jwks.keys]
    verifier = await verifier_for()
    assert (await verifier.verify(token(rsa_key, kid=None))).user == "alice"
    unknown = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert "Signature" in await rejected(verifier, token(unknown, kid=None))
    assert jwks.fetches == 1


async def test_jwks_file_source(
    verifier_for: MakeVerifier, ec_key: ec.EllipticCurvePrivateKey, jwks: JwksServer, tmp_path: Path
) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [public_jwk(ec_key, "ec-file")]}))
    verifier = await verifier_for(jwks_file=str(path))
    assert (await verifier.verify(token(ec_key, "ec-file", "ES256"))).user == "alice"
    assert jwks.fetches == 0


async def test_jwks_endpoint_down_at_start_is_fetched_on_first_use(
    verifier_for: MakeVerifier, rsa_key: rsa.RSAPrivateKey, jwks: JwksServer
) -> None:
    jwks.status = 503
    clock = Clock()
    verifier = await verifier_for(clock)
    assert verifier.keys.current is None and jwks.fetches == 1
    jwks.status = 200
    assert (await verifier.verify(token(rsa_key))).user == "alice"
    assert jwks.fetches == 2


async def test_an_unreachable_jwks_url_at_start_is_not_fatal_and_tokens_are_rejected(
    verifier_for: MakeVerifier, rsa_key: rsa.RSAPrivateKey
) -> None:
    clock = Clock()
    verifier = await verifier_for(clock, jwks_url=f"http://127.0.0.1:{free_port()}/jwks")
    assert "no key set" in await rejected(verifier, token(rsa_key))


async def test_missing_required_scope_is_rejected(verifier_for: MakeVerifier, rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = await verifier_for(required_scope="llm:use")
    assert "missing scope 'llm:use'" in await rejected(verifier, token(rsa_key, scope="openid profile"))
    assert "missing scope" in await rejected(verifier, token(rsa_key, sub="bob"))
    assert (await verifier.verify(token(rsa_key, scope="openid llm:use"))).scopes == {"openid", "llm:use"}


async def test_verified_tokens_are_cached_until_exp_and_at_most_a_minute(
    verifier_for: MakeVerifier, rsa_key: rsa.RSAPrivateKey
) -> None:
    clock = Clock()
    verifier = await verifier_for(clock)
    long_lived, short_lived = token(rsa_key), token(rsa_key, exp=int(clock.now) + 30)
    assert verifier.cached(long_lived) is None
    principal = await verifier.verify(long_lived)
    await verifier.verify(short_lived)
    assert verifier.cached(long_lived) is principal and verifier.cached(short_lived) is not None
    clock.advance(31)
    assert verifier.cached(short_lived) is None and verifier.cached(long_lived) is principal
    clock.advance(30)
    assert verifier.cached(long_lived) is None
    assert await verifier.verify(long_lived) == principal


async def test_concurrent_unknown_kids_share_one_refetch(
    verifier_for: MakeVerifier, rsa_key: rsa.RSAPrivateKey, jwks: JwksServer
) -> None:
    verifier = await verifier_for()
    bearers = [token(rsa_key, f"random-{n}") for n in range(50)]
    results = await asyncio.gather(*(verifier.verify(bearer) for bearer in bearers), return_exceptions=True)
    assert all(isinstance(result, InvalidToken) and "unknown kid" in result.reason for result in results)
    assert jwks.fetches == 2


async def test_the_verification_cache_is_bounded(
    verifier_for: MakeVerifier, rsa_key: rsa.RSAPrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sluice.identity.jwt, "CACHE_ENTRIES", 2)
    verifier = await verifier_for()
    first, second, third = (token(rsa_key, sub=user) for user in ("a", "b", "c"))
    for bearer in (first, second, first, third):  # `first` was used again, so `second` is the oldest
        await verifier.verify(bearer)
    assert verifier.cached(second) is None and verifier.cached(first) and verifier.cached(third)


async def test_a_missing_jwks_file_is_not_fatal_and_tokens_are_rejected(
    verifier_for: MakeVerifier, rsa_key: rsa.RSAPrivateKey, tmp_path: Path
) -> None:
    verifier = await verifier_for(jwks_file=str(tmp_path / "missing.json"))
    assert "no key set" in await rejected(verifier, token(rsa_key))
