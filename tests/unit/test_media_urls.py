"""The media URL policy: address classification, URL parsing tricks, finding URL fields, host look-ups."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Sequence
from typing import Any

import pytest

from sluice.config import MediaConfig
from sluice.context import RequestContext
from sluice.http.request import HttpRequest
from sluice.http.response import ResponseWriter
from sluice.media_urls import LookUp, Refused, judge, literal_address, media_urls, non_public
from sluice.pipeline.media import MediaPolicyCheck, MediaUrlRefused

NON_PUBLIC = [
    "127.0.0.1", "127.255.255.254", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "100.64.0.1",
    "0.0.0.0", "0.1.2.3", "224.0.0.1", "239.255.255.250", "255.255.255.255", "240.0.0.1", "192.0.2.1",
    "198.18.0.1", "::1", "::", "fe80::1", "fc00::1", "fd12:3456::1", "ff02::1", "::ffff:127.0.0.1",
    "::ffff:10.0.0.1", "::ffff:169.254.169.254", "2002:7f00:1::", "2002:a00:1::", "64:ff9b::7f00:1",
    "::127.0.0.1", "2001:db8::1", "100::1",
]  # fmt: skip
PUBLIC = ["93.184.216.34", "8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8", "2002:808:808::"]


@pytest.mark.parametrize("address", NON_PUBLIC)
def test_non_public_addresses(address: str) -> None:
    assert non_public(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses(address: str) -> None:
    assert non_public(ipaddress.ip_address(address)) == ""


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("2130706433", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("10.1", "10.0.0.1"),
        ("0", "0.0.0.0"),
        ("::ffff:7f00:1", "::ffff:127.0.0.1"),
        ("fe80::1%eth0", "fe80::1"),
    ],
)
def test_literal_addresses_in_every_spelling(host: str, address: str) -> None:
    assert literal_address(host) == ipaddress.ip_address(address)


@pytest.mark.parametrize("host", ["example.com", "deadbeef.com", "1e100.net", "1.2.3.4.5", "0xzz"])
def test_names_are_not_addresses(host: str) -> None:
    assert literal_address(host) is None


REFUSED = [
    "http://127.0.0.1/",
    "HTTP://127.0.0.1/",
    "hTTpS://localhost/",
    "http://2130706433/",
    "http://0x7f.1/",
    "http://0177.0.0.1/",
    "http://127.1:8080/",
    "http://[::1]:8000/",
    "http://[::ffff:127.0.0.1]/",
    "http://[0:0:0:0:0:ffff:7f00:1]/",
    "http://[fe80::1%25eth0]/",
    "http://public.example.com@127.0.0.1/",
    "http://user:pass@169.254.169.254/latest",
    "http://localhost./",
    "http://LOCALHOST/",
    "http://127.0.0.1./",
    "http://app.localhost/",
    "http://127.0.0.1\\@example.com/",
    "http://example.com\\@127.0.0.1/",
    "http://127.0.0.1 /",
    " http://127.0.0.1/",
    "http://127.0.0.1\t.example.com/",
    "http://%31%32%37.0.0.1/",
    "http://exa%6dple.com/",
    "http://ex\u0430mple.com/",
    "http://\u24dbocalhost/",
    "http:///etc/passwd",
    "http:127.0.0.1",
    "//127.0.0.1/x",
    "http://example.com:port/",
    "http://[::1/",
    "file:///etc/passwd",
    "FILE:///etc/passwd",
    "gopher://127.0.0.1:6379/_",
    "ftp://example.com/x",
    "dict://127.0.0.1:11211/",
    "jar:http://example.com!/",
    "",
    "example.com/cat.png",
]


@pytest.mark.parametrize("url", REFUSED)
def test_public_only_refuses(url: str) -> None:
    assert isinstance(judge(url, "public_only"), Refused), url


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("https://example.com/cat.png", "example.com"),
        ("HTTPS://Example.COM./cat.png", "example.com"),
        ("http://user@images.example.com:8443/a?b#c", "images.example.com"),
        ("http://cdn_1.example.com/x", "cdn_1.example.com"),
    ],
)
def test_names_must_be_looked_up(url: str, host: str) -> None:
    assert judge(url, "public_only") == LookUp(host)


@pytest.mark.parametrize("url", ["http://93.184.216.34/x.png", "https://[2606:4700:4700::1111]:443/x", "data:,x"])
def test_public_only_lets_public_addresses_and_inline_data_through(url: str) -> None:
    assert judge(url, "public_only") is None


def test_deny_and_allow() -> None:
    assert isinstance(judge("https://93.184.216.34/x.png", "deny"), Refused)
    assert isinstance(judge("https://example.com/x.png", "deny"), Refused)
    assert judge("data:image/png;base64,AAAA", "deny") is None
    assert judge("DATA:image/png;base64,AAAA", "deny") is None
    assert judge("http://127.0.0.1/", "allow") is None
    assert judge("file:///etc/passwd", "allow") is None


def test_refusals_say_what_is_wrong() -> None:
    refused = judge("http://[::ffff:127.0.0.1]/", "public_only")
    assert isinstance(refused, Refused) and "loopback address (::ffff:127.0.0.1)" in refused.reason
    refused = judge("gopher://x/", "public_only")
    assert isinstance(refused, Refused) and "gopher: scheme" in refused.reason


def test_media_urls_finds_every_url_field() -> None:
    body: dict[str, Any] = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "http://127.0.0.1/ in plain text is not a URL field"},
            {"role": "user", "content": [
                {"type": "text", "text": "http://127.0.0.1/"},
                {"type": "image_url", "image_url": {"url": "http://a/", "detail": "auto"}},
                {"type": "audio_url", "audio_url": {"url": "http://b/"}},
                {"type": "video_url", "video_url": {"url": "http://c/"}},
                {"image_url": "http://d/"},
                {"type": "input_image", "image_url": "http://e/"},
                {"type": "file", "file": {"file_url": "http://f/", "filename": "x.pdf"}},
                {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
                {"type": "image_url", "image_url": {"url": 3}},
                "a bare string part",
            ]},
            "not a message",
            {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "http://g/"}}]},
        ],
    }  # fmt: skip
    assert list(media_urls(body)) == [
        ("messages[1].content[1].image_url.url", "http://a/"),
        ("messages[1].content[2].audio_url.url", "http://b/"),
        ("messages[1].content[3].video_url.url", "http://c/"),
        ("messages[1].content[4].image_url", "http://d/"),
        ("messages[1].content[5].image_url", "http://e/"),
        ("messages[1].content[6].file.file_url", "http://f/"),
        ("messages[3].content[0].image_url.url", "http://g/"),
    ]
    assert list(media_urls({"model": "m", "prompt": "x"})) == []
    assert list(media_urls({"messages": "not a list"})) == []


# The pipeline check, with a stand-in resolver


def context(urls: Sequence[str]) -> RequestContext:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    request = HttpRequest("POST", "/v1/chat/completions", "", [], b"", True, True, "127.0.0.1")
    ctx = RequestContext(request, ResponseWriter(None, b"id", True, True), 0.0)  # type: ignore[arg-type]
    ctx.body = {"model": "m", "messages": [{"role": "user", "content": parts}]}
    return ctx


class Resolver:
    def __init__(self, answers: dict[str, list[str]], delay: float = 0.0) -> None:
        self.answers = answers
        self.delay = delay
        self.asked: list[str] = []

    async def __call__(self, host: str) -> list[str]:
        self.asked.append(host)
        await asyncio.sleep(self.delay)
        if host not in self.answers:
            raise OSError("Name or service not known")
        return self.answers[host]


async def run(check: MediaPolicyCheck, ctx: RequestContext) -> None:
    pending = check.check(ctx)
    if pending is not None:
        await pending


async def test_no_urls_and_literal_addresses_need_no_lookup() -> None:
    resolver = Resolver({})
    check = MediaPolicyCheck(MediaConfig(), resolver)
    assert check.check(context([])) is None
    assert check.check(context(["http://93.184.216.34/x", "data:,x"])) is None
    assert resolver.asked == []


async def test_names_are_looked_up_once_each() -> None:
    resolver = Resolver({"cdn.example.com": ["93.184.216.34", "2606:4700:4700::1111"]})
    check = MediaPolicyCheck(MediaConfig(), resolver)
    await run(check, context(["https://cdn.example.com/a", "https://CDN.example.com./b"]))
    assert resolver.asked == ["cdn.example.com"]


@pytest.mark.parametrize(
    ("answers", "expected"),
    [
        ({"evil.example": ["93.184.216.34", "10.0.0.7"]}, "resolves to a private or reserved address (10.0.0.7)"),
        ({"evil.example": ["::ffff:127.0.0.1"]}, "resolves to a loopback address"),
        ({"evil.example": ["fe80::1%eth0"]}, "resolves to a link-local address"),
        ({"evil.example": []}, "could not be resolved"),
        ({}, "could not be resolved"),
    ],
)
async def test_names_resolving_to_non_public_addresses_are_refused(
    answers: dict[str, list[str]], expected: str
) -> None:
    check = MediaPolicyCheck(MediaConfig(), Resolver(answers))
    with pytest.raises(MediaUrlRefused) as refused:
        await run(check, context(["http://93.184.216.34/ok", "http://evil.example/x"]))
    assert refused.value.param == "messages[0].content[1].image_url.url"
    assert "names the host evil.example, which " + expected in refused.value.message


async def test_a_slow_lookup_is_refused_after_resolve_timeout() -> None:
    check = MediaPolicyCheck(MediaConfig(resolve_timeout=0.05), Resolver({"slow.example": ["8.8.8.8"]}, delay=5))
    with pytest.raises(MediaUrlRefused, match=r"could not be resolved within 0.05 s \(media.resolve_timeout\)"):
        await asyncio.wait_for(run(check, context(["http://slow.example/x"])), 1)


async def test_distinct_hosts_per_request_are_capped() -> None:
    resolver = Resolver({f"h{i}.example": ["8.8.8.8"] for i in range(5)})
    check = MediaPolicyCheck(MediaConfig(max_remote_hosts=3), resolver)
    with pytest.raises(MediaUrlRefused, match=r"media\.max_remote_hosts") as refused:
        check.check(context([f"http://h{i}.example/" for i in range(5)]))
    assert refused.value.param == "messages[0].content[3].image_url.url"
    assert resolver.asked == []  # refused before any lookup
