"""Which JWKs become verification keys for which algorithms, and which strings look like JWTs."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from sluice.identity.jwks import JwksError, UrlSource, fitting_algorithms, parse_key_set
from sluice.identity.jwt import looks_like_jwt

ALL = ("RS256", "PS256", "ES256", "ES384", "EdDSA")


@pytest.fixture(scope="module")
def rsa_jwk() -> dict[str, Any]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    return {**RSAAlgorithm.to_jwk(key, as_dict=True), "kid": "r"}


@pytest.fixture(scope="module")
def ec_jwk() -> dict[str, Any]:
    return {**ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP384R1()).public_key(), as_dict=True), "kid": "e"}


def document(*keys: Any) -> bytes:
    return orjson.dumps({"keys": list(keys)})


def test_each_key_family_fits_only_its_algorithms(rsa_jwk: dict[str, Any], ec_jwk: dict[str, Any]) -> None:
    okp = OKPAlgorithm.to_jwk(ed25519.Ed25519PrivateKey.generate().public_key(), as_dict=True)
    assert fitting_algorithms(rsa_jwk, ALL) == ["RS256", "PS256"]
    assert fitting_algorithms(ec_jwk, ALL) == ["ES384"]  # P-384: not an ES256 key
    assert fitting_algorithms(okp, ALL) == ["EdDSA"]
    assert fitting_algorithms({**rsa_jwk, "alg": "PS256"}, ALL) == ["PS256"]


@pytest.mark.parametrize(
    "change",
    [
        {"alg": "HS256"},  # an RSA key posing as an HMAC secret
        {"alg": "none"},
        {"kty": "oct", "k": "c2VjcmV0"},
        {"use": "enc"},
        {"key_ops": ["encrypt"]},
    ],
)
def test_keys_that_must_never_verify_a_token(rsa_jwk: dict[str, Any], change: dict[str, Any]) -> None:
    assert fitting_algorithms({**rsa_jwk, **change}, ALL) == []


def test_a_key_set_is_indexed_by_kid_and_algorithm(rsa_jwk: dict[str, Any], ec_jwk: dict[str, Any]) -> None:
    broken = {"kty": "RSA", "kid": "broken", "n": "AQAB"}
    keys = parse_key_set(document(rsa_jwk, ec_jwk, broken, "not a key", {"kty": "oct", "k": "eA", "kid": "r"}), ALL)
    assert [key.algorithm_name for key in keys.candidates("r", "PS256")] == ["PS256"]
    assert keys.candidates("r", "ES384") == () and keys.candidates("e", "ES384") != ()
    assert keys.knows("r") and not keys.knows("broken") and not keys.knows("nope")
    assert len(keys.candidates(None, "RS256")) == 1 and len(keys.candidates(None, "ES384")) == 1


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"<html>", "not JSON"),
        (b'{"keys": {}}', "no 'keys' list"),
        (b"[]", "no 'keys' list"),
        (document({"kty": "oct", "k": "c2VjcmV0"}), "no usable signing key"),
    ],
)
def test_unusable_key_sets_are_errors(content: bytes, problem: str) -> None:
    with pytest.raises(JwksError, match=problem):
        parse_key_set(content, ALL)


def segment(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        (segment(b'{"alg":"RS256"}') + b"." + segment(b'{"sub":"a"}') + b".c2ln", True),
        (segment(b'{"alg":"none"}') + b"." + segment(b"{}") + b".", True),
        (b"sk-sluice-0123456789abcdef", False),
        (b"sk-test-0123456789", False),
        (b"a.b.c", False),
        (segment(b"[1, 2]") + b".e30.c2ln", False),  # JSON, but not an object
        (segment(b'{"alg":"RS256"}') + b".e30.c2ln.extra", False),
        (segment(b'{"alg":"RS256"}') + b".e30.c2+n", False),
        (b"", False),
    ],
)
def test_looks_like_jwt(token: bytes, expected: bool) -> None:
    assert looks_like_jwt(token) is expected


def test_a_jwks_url_must_be_http_or_https() -> None:
    assert UrlSource("https://idp.example.com/.well-known/jwks.json").url.startswith("https://")
    for url in ("ftp://idp.example.com/jwks", "file:///etc/jwks.json", "idp.example.com/jwks"):
        with pytest.raises(ValueError, match="jwks_url"):
            UrlSource(url)
