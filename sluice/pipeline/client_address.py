"""The client's address: the peer, or what a trusted proxy (nginx) says in `X-Forwarded-For`.

`X-Forwarded-For` is believed only when the connection comes from one of `rate_limits.trusted_proxies`;
then the list is read from the right, skipping further trusted proxies, and the first address that is
not one of them is the client. Anyone else could write any address there, so from an untrusted peer
the header is ignored.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from functools import lru_cache

from sluice.context import RequestContext
from sluice.http.request import HttpRequest

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ClientAddress:
    def __init__(self, trusted_proxies: Iterable[str]) -> None:
        networks = tuple(ipaddress.ip_network(p, strict=False) for p in trusted_proxies)

        @lru_cache(maxsize=4096)
        def trusted(address: str) -> bool:
            try:
                ip = ipaddress.ip_address(address.strip())
            except ValueError:
                return False
            return any(ip in network for network in networks)

        self._trusted = trusted

    def check(self, ctx: RequestContext) -> None:
        """A pipeline step before any other can answer: every log line and audit record names the real client."""
        ctx.client_ip = self.resolve(ctx.request)

    def resolve(self, request: HttpRequest) -> str:
        peer = request.client_ip
        if not self._trusted(peer):
            return peer
        forwarded = request.header(b"x-forwarded-for")
        if not forwarded:
            return peer
        for hop in reversed(forwarded.decode("latin-1").split(",")):
            hop = hop.strip()
            if hop and not self._trusted(hop):
                return hop if _valid(hop) else peer
        return peer


def _valid(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True
