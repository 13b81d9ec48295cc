"""Applies `media.remote_urls` to the media URLs of a request before any backend sees them (SSRF guard).

`public_only` refuses URLs whose host is a non-public address or a name that resolves to one (looked up
with the event loop's resolver within `media.resolve_timeout`); `deny` refuses every remote URL; inline
`data:` URLs always pass. Runs after the rate limits (so lookups are paid for like any request) and
before the cache and dispatch. A request without media URLs costs a walk over its messages and no
coroutine; only a host name to look up makes the check wait.

What a gateway cannot see: the engine resolves the name again when it fetches (a name could change its
answer in between) and may follow redirects, so pair `public_only` with the engines' own
`--allowed-media-domains` and `VLLM_MEDIA_URL_ALLOW_REDIRECTS=0`, or an egress network policy
(docs/configuration.md#media).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence

from sluice.config import MediaConfig
from sluice.context import RequestContext
from sluice.errors import InvalidRequest
from sluice.media_urls import LookUp, Refused, judge, media_urls, non_public

Resolve = Callable[[str], Awaitable[Sequence[str]]]
ADVICE = "Use an http(s) URL on a public host, or send the media inline as a base64 data: URL."


class MediaUrlRefused(InvalidRequest):
    code = "media_url_not_allowed"


class MediaPolicyCheck:
    def __init__(self, config: MediaConfig, resolve: Resolve | None = None) -> None:
        """`resolve`: host name -> its addresses (the event loop's getaddrinfo unless a test gives one)."""
        self._policy = config.remote_urls
        self._timeout = config.resolve_timeout
        self._max_hosts = config.max_remote_hosts
        self._resolve = resolve or _getaddrinfo

    def check(self, ctx: RequestContext) -> Awaitable[None] | None:
        body = ctx.body
        if body is None or not _has_parts(body.get("messages")):
            return None  # text only, the common case: no generator, no work
        lookups: dict[str, str] = {}  # host -> the first param naming it
        for param, url in media_urls(body):
            verdict = judge(url, self._policy)
            if isinstance(verdict, Refused):
                raise _refusal(param, verdict.reason)
            if isinstance(verdict, LookUp) and verdict.host not in lookups:
                if len(lookups) == self._max_hosts:
                    raise _refusal(param, f"is one of more than {self._max_hosts} hosts in one request "
                                          "(media.max_remote_hosts)")  # fmt: skip
                lookups[verdict.host] = param
        return self._look_up(lookups) if lookups else None

    async def _look_up(self, lookups: dict[str, str]) -> None:
        results = await asyncio.gather(*(self._public_host(host) for host in lookups))
        for (host, param), problem in zip(lookups.items(), results, strict=True):
            if problem:
                raise _refusal(param, f"names the host {host}, which {problem} (media.remote_urls: public_only)")

    async def _public_host(self, host: str) -> str:
        """'' when every address of `host` is public, else what is wrong with it."""
        try:
            async with asyncio.timeout(self._timeout):
                addresses = await self._resolve(host)
        except TimeoutError:
            return f"could not be resolved within {self._timeout:g} s (media.resolve_timeout)"
        except OSError:
            return "could not be resolved"
        if not addresses:
            return "could not be resolved"
        for text in addresses:
            address = ipaddress.ip_address(text.partition("%")[0])
            problem = non_public(address)
            if problem:
                return f"resolves to {problem} address ({address})"
        return ""


def _has_parts(messages: object) -> bool:
    """Whether any message has a list of content parts (where media URLs live)."""
    if type(messages) is not list:
        return False
    for message in messages:  # noqa: SIM110 - a plain loop: any() would add a generator to every request
        if type(message) is dict and type(message.get("content")) is list:
            return True
    return False


def _refusal(param: str, reason: str) -> MediaUrlRefused:
    return MediaUrlRefused(f"{param} {reason}. {ADVICE}", param=param)


async def _getaddrinfo(host: str) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]
