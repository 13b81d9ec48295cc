"""Which media URLs a backend may be asked to fetch: finding them in a request, and judging their hosts.

vLLM downloads the `image_url`, `audio_url` and `video_url` parts of chat messages itself, from inside the
network it runs in, so a caller could make it read cloud metadata (169.254.169.254), admin pages on
localhost or anything else only the cluster can reach (server-side request forgery). This module holds the
pure part of the defence: `media_urls` lists the URL fields of a parsed body, and `judge` says whether one
may go out under a policy, or which host name must be looked up first. Host names are judged strictly:
anything that different URL parsers could read differently (backslashes, spaces, percent-escapes or
non-ASCII in the host) is refused rather than interpreted, and the legacy IPv4 spellings that resolvers
still accept (`2130706433`, `0x7f.1`, `0177.0.0.1`) are read as the addresses they are.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

Policy = Literal["allow", "public_only", "deny"]
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
REMOTE_SCHEMES = frozenset({"http", "https"})
HOST_NAME = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*$")
LEGACY_IPV4 = re.compile(r"^[0-9a-fx.]+$")  # decimal, octal and hex parts, as inet_aton reads them
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
UNSAFE_CHARACTERS = re.compile(r"[\x00-\x20\x7f\\]")


@dataclass(frozen=True, slots=True)
class Refused:
    """The URL may not be fetched; `reason` completes the sentence "<param> …" (the error message)."""

    reason: str


@dataclass(frozen=True, slots=True)
class LookUp:
    """The URL names a host that must resolve to public addresses only before it may go out."""

    host: str


Verdict = Refused | LookUp | None  # None: the URL may go out as it is


def media_urls(body: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(param, url) for every URL a backend would fetch in `body`'s chat messages.

    A URL field is a string under a key named `url` or ending in `_url`, in a content part or one level
    down: `image_url.url`, `audio_url.url`, `video_url.url`, vLLM's bare `"image_url": "…"` form and
    whatever media kinds follow that naming. Inline payloads (`input_audio.data`) are not URLs.
    """
    messages = body.get("messages")
    if type(messages) is not list:
        return
    for i, message in enumerate(messages):
        content = message.get("content") if type(message) is dict else None
        if type(content) is not list:
            continue  # plain text: the common case costs one lookup per message
        for j, part in enumerate(content):
            if type(part) is not dict:
                continue
            for key, value in part.items():
                if type(value) is str:
                    if key == "url" or key.endswith("_url"):
                        yield f"messages[{i}].content[{j}].{key}", value
                elif type(value) is dict:
                    for inner, url in value.items():
                        if type(url) is str and (inner == "url" or inner.endswith("_url")):
                            yield f"messages[{i}].content[{j}].{key}.{inner}", url


def judge(url: str, policy: Policy) -> Verdict:
    """May a backend fetch `url` under `policy`? Inline `data:` URLs always may."""
    scheme, colon, _ = url.partition(":")
    scheme = scheme.strip().lower()
    if colon and scheme == "data":
        return None
    if policy == "allow":
        return None
    if not colon or scheme not in REMOTE_SCHEMES:
        if colon and scheme.isascii() and scheme.isalnum():
            return Refused(f"uses the {scheme}: scheme; only http(s) URLs and inline data: URLs are accepted")
        return Refused("has no http(s) scheme")
    if policy == "deny":
        return Refused("is a remote URL, and this gateway lets no backend fetch remote media (media.remote_urls: deny)")
    host = _host(url)
    if isinstance(host, Refused):
        return host
    address = literal_address(host)
    if address is not None:
        problem = non_public(address)
        return Refused(f"points to {problem} address ({host}) (media.remote_urls: public_only)") if problem else None
    if host == "localhost" or host.endswith(".localhost"):
        return Refused(f"points to {host}, the backend's own machine (media.remote_urls: public_only)")
    return LookUp(host)


def _host(url: str) -> str | Refused:
    """The URL's host in lower case without trailing dots, or why it cannot be trusted to mean one host."""
    if UNSAFE_CHARACTERS.search(url):
        return Refused("contains spaces, control characters or backslashes; send a well-formed URL")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        return Refused("is not a well-formed URL")
    host = parts.hostname
    if not host:
        return Refused("has no host")
    if ":" in host:  # an IPv6 literal (urlsplit checked the brackets)
        return host
    host = host.rstrip(".")
    if not HOST_NAME.match(host):
        return Refused("has a host name with characters other than letters, digits, '-', '_' and '.'")
    return host


def literal_address(host: str) -> Address | None:
    """The address `host` spells directly, in any form a resolver would accept; None for a name."""
    try:
        return ipaddress.ip_address(host.partition("%")[0])  # a zone id (fe80::1%eth0) is no part of it
    except ValueError:
        pass
    if LEGACY_IPV4.match(host) and host[0].isdigit():
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def non_public(address: Address) -> str:
    """What kind of non-public address `address` is ('' for a public one), looking inside IPv6 forms
    that carry an IPv4 address (mapped, 6to4, NAT64)."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or _nat64(address)
        if embedded is not None:
            return non_public(embedded)
    if address.is_loopback:
        return "a loopback"
    if address.is_link_local:
        return "a link-local"
    if address.is_multicast:
        return "a multicast"
    if address.is_unspecified:
        return "an unspecified"
    if address.is_private or address.is_reserved or not address.is_global:
        return "a private or reserved"
    return ""


def _nat64(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address in NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None
