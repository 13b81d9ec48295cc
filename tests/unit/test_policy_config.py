"""Validation of the request-policy settings: `cors`, `media` and the admin listener of `server`."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from sluice.config import CorsConfig, MediaConfig, ServerConfig


def test_defaults_are_the_safe_choice() -> None:
    assert MediaConfig().remote_urls == "public_only"
    assert CorsConfig().allow_origins == () and not CorsConfig().allow_credentials
    assert ServerConfig().admin_port is None


@pytest.mark.parametrize(
    ("given", "normalised"),
    [
        ("https://app.example.com", "https://app.example.com"),
        ("HTTPS://App.Example.COM:443/", "https://app.example.com"),
        ("http://localhost:3000", "http://localhost:3000"),
        ("http://[::1]:8080", "http://[::1]:8080"),
        ("*", "*"),
    ],
)
def test_origins_are_kept_as_browsers_send_them(given: str, normalised: str) -> None:
    assert CorsConfig(allow_origins=(given,)).allow_origins == (normalised,)


@pytest.mark.parametrize(
    "origin", ["null", "app.example.com", "ftp://example.com", "https://example.com/app", "https://u@example.com",
               "https://example.com:x", "https://example.com?q=1"],
)  # fmt: skip
def test_malformed_origins_are_refused(origin: str) -> None:
    with pytest.raises(ValidationError, match="origin"):
        CorsConfig(allow_origins=(origin,))


def test_any_origin_is_refused_with_credentials() -> None:
    with pytest.raises(ValidationError, match="allow_credentials"):
        CorsConfig(allow_origins=("*",), allow_credentials=True)
    assert CorsConfig(allow_origins=("https://a.example",), allow_credentials=True).allow_credentials


def test_header_names_are_validated_and_lower_cased() -> None:
    assert CorsConfig(allow_headers=("Authorization", "X-Stainless-OS")).allow_headers == (
        "authorization", "x-stainless-os",
    )  # fmt: skip
    with pytest.raises(ValidationError, match="header name"):
        CorsConfig(expose_headers=("x-bad header",))


def test_media_policy_is_one_of_three() -> None:
    with pytest.raises(ValidationError):
        MediaConfig(remote_urls="private_ok")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        MediaConfig(resolve_timeout=0)


def test_admin_port_must_differ_from_the_api_port() -> None:
    with pytest.raises(ValidationError, match="admin_port must differ"):
        ServerConfig(port=8080, admin_port=8080)
    assert ServerConfig(port=0, admin_port=0).admin_port == 0
    assert ServerConfig(port=8080, admin_port=8081, admin_host="10.0.0.5").admin_host == "10.0.0.5"
