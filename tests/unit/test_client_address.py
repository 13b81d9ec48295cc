"""Who the client is behind trusted proxies, and why an untrusted X-Forwarded-For is ignored."""

from __future__ import annotations

from sluice.http.request import HttpRequest
from sluice.pipeline.client_address import ClientAddress


def request(peer: str, forwarded: str | None = None) -> HttpRequest:
    headers = [(b"x-forwarded-for", forwarded.encode())] if forwarded is not None else []
    return HttpRequest("POST", "/v1/chat/completions", "", headers, b"", True, True, peer)


def test_the_last_untrusted_hop_is_the_client() -> None:
    address = ClientAddress(["127.0.0.1/32", "10.0.0.0/8"])
    assert address.resolve(request("127.0.0.1", "203.0.113.7")) == "203.0.113.7"
    assert address.resolve(request("127.0.0.1", "198.51.100.1, 203.0.113.7, 10.1.2.3")) == "203.0.113.7"
    assert address.resolve(request("127.0.0.1", "10.0.0.5, 10.0.0.6")) == "127.0.0.1"  # all proxies: the peer
    assert address.resolve(request("127.0.0.1")) == "127.0.0.1"
    assert address.resolve(request("::1", "2001:db8::7")) == "::1"  # ::1 is not in this list


def test_untrusted_peers_and_garbage_are_not_believed() -> None:
    address = ClientAddress(["127.0.0.1/32", "::1/128"])
    assert address.resolve(request("192.0.2.50", "203.0.113.7")) == "192.0.2.50"
    assert address.resolve(request("127.0.0.1", "not-an-ip")) == "127.0.0.1"
    assert address.resolve(request("::1", "2001:db8::7")) == "2001:db8::7"
    assert ClientAddress([]).resolve(request("127.0.0.1", "203.0.113.7")) == "127.0.0.1"
