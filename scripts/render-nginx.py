#!/usr/bin/env python3
"""Render deploy/nginx/sluice.conf.template into an nginx site config (stdlib only, for operators and tests).

    scripts/render-nginx.py --server-name llm.example.com \\
        --upstream 10.0.0.11:8080 --upstream 10.0.0.12:8080 \\
        --cert /etc/letsencrypt/live/llm.example.com/fullchain.pem \\
        --key /etc/letsencrypt/live/llm.example.com/privkey.pem > /etc/nginx/conf.d/sluice.conf

Only `${UPPER_CASE}` placeholders are replaced (as `envsubst` with an explicit variable list would), so
nginx's own `$variables` stay. Every value is checked first: a value that could end a directive (`;`,
braces, quotes, white space) would let a typo or a hostile input rewrite the config, and is refused.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

TEMPLATE = Path(__file__).resolve().parent.parent / "deploy" / "nginx" / "sluice.conf.template"
PLACEHOLDER = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")
HOST_PORT = re.compile(r"^(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):[0-9]{1,5}$")
LISTEN = re.compile(r"^(?:(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):)?[0-9]{1,5}$")
SERVER_NAMES = re.compile(r"^[A-Za-z0-9.*_-]+(?: [A-Za-z0-9.*_-]+)*$")
PATH = re.compile(r"^/[A-Za-z0-9._/@+-]*$")
SIZE = re.compile(r"^[0-9]+[kKmMgG]?$")


class RenderError(ValueError):
    """A value that must not go into the config, or a placeholder without a value."""


def render(template: str, values: Mapping[str, str]) -> str:
    """Replace each `${NAME}`; a value of several lines keeps the indentation of its placeholder's line."""
    missing = sorted(set(PLACEHOLDER.findall(template)) - set(values))
    if missing:
        raise RenderError(f"no value for {', '.join(missing)}")
    return "".join(_render_line(line, values) for line in template.splitlines(keepends=True))


def _render_line(line: str, values: Mapping[str, str]) -> str:
    indent = line[: len(line) - len(line.lstrip())]
    return PLACEHOLDER.sub(lambda m: values[m.group(1)].replace("\n", "\n" + indent), line)


def site_values(
    *,
    server_name: str,
    upstreams: Sequence[str],
    certificate: str,
    certificate_key: str,
    https_listen: str = "443",
    http_listen: str = "80",
    rate: int = 10,
    burst: int = 20,
    stream_rate: int = 30,
    stream_burst: int = 60,
    client_max_body_size: str = "8m",
    access_log: str = "/var/log/nginx/sluice-access.log",
    admin_allow: Sequence[str] = (),
    real_ip_from: Sequence[str] = (),
    acme_root: str = "/var/www/certbot",
) -> dict[str, str]:
    """The template's values, each validated; defaults are the reference deployment's."""
    if not upstreams:
        raise RenderError("at least one --upstream is needed")
    for upstream in upstreams:
        _check(HOST_PORT, upstream, "upstream (host:port)")
    _check(SERVER_NAMES, server_name, "server name")
    _check(LISTEN, https_listen, "HTTPS listen ([address:]port)")
    _check(LISTEN, http_listen, "HTTP listen ([address:]port)")
    for path in (certificate, certificate_key, access_log, acme_root):
        _check(PATH, path, "path (absolute, no spaces or quotes)")
    _check(SIZE, client_max_body_size, "client_max_body_size (e.g. 8m)")
    for number in (rate, burst, stream_rate, stream_burst):
        if number < 1:
            raise RenderError(f"rates and bursts must be at least 1, not {number}")
    allow = [f"allow {_network(cidr)};" for cidr in admin_allow]
    trusted = [f"set_real_ip_from {_network(cidr)};" for cidr in real_ip_from]
    if trusted:
        trusted += ["real_ip_header X-Forwarded-For;", "real_ip_recursive on;"]
    return {
        "SERVER_NAME": server_name,
        "HTTPS_LISTEN": https_listen,
        "HTTP_LISTEN": http_listen,
        "SSL_CERTIFICATE": certificate,
        "SSL_CERTIFICATE_KEY": certificate_key,
        "UPSTREAM_SERVERS": "\n".join(f"server {u} max_fails=1 fail_timeout=10s;" for u in upstreams),
        "RATE_GENERAL": str(rate),
        "BURST_GENERAL": str(burst),
        "RATE_STREAM": str(stream_rate),
        "BURST_STREAM": str(stream_burst),
        "CLIENT_MAX_BODY_SIZE": client_max_body_size,
        "ACCESS_LOG": access_log,
        "ADMIN_ALLOW": "\n".join(allow) if allow else "# no admin network: /admin/ answers 404",
        "REAL_IP_FROM": "\n".join(trusted) if trusted else "# no proxy in front of nginx",
        "ACME_ROOT": acme_root,
    }


def render_site(template: str | None = None, **options: Any) -> str:
    """The site config for `options` (the keywords of `site_values`)."""
    text = template if template is not None else TEMPLATE.read_text()
    return render(text, site_values(**options))


def _check(pattern: re.Pattern[str], value: str, what: str) -> None:
    if not pattern.fullmatch(value):
        raise RenderError(f"invalid {what}: {value!r}")


def _network(cidr: str) -> str:
    try:
        return str(ipaddress.ip_network(cidr, strict=False))
    except ValueError as error:
        raise RenderError(f"invalid network: {cidr!r}") from error


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--server-name", default="_", help="nginx server_name(s), space separated")
    parser.add_argument("--upstream", action="append", default=[], help="a gateway replica host:port (repeat)")
    parser.add_argument("--cert", required=True, help="certificate chain (PEM), e.g. Let's Encrypt fullchain.pem")
    parser.add_argument("--key", required=True, help="its private key (PEM)")
    parser.add_argument("--https-listen", default="443", help="[address:]port for HTTPS and HTTP/2")
    parser.add_argument("--http-listen", default="80", help="[address:]port for ACME challenges and redirects")
    parser.add_argument("--rate", type=int, default=10, help="general requests per second per client address")
    parser.add_argument("--burst", type=int, default=20)
    parser.add_argument("--stream-rate", type=int, default=30, help="r/s per address on the completion endpoints")
    parser.add_argument("--stream-burst", type=int, default=60)
    parser.add_argument("--client-max-body-size", default="8m", help="as the gateway's limits.max_body_bytes")
    parser.add_argument("--access-log", default="/var/log/nginx/sluice-access.log")
    parser.add_argument("--admin-allow", action="append", default=[], help="network allowed to /admin/ (repeat)")
    parser.add_argument("--real-ip-from", action="append", default=[], help="proxy in front of nginx (repeat)")
    parser.add_argument("--acme-root", default="/var/www/certbot", help="certbot --webroot path")
    parser.add_argument("--template", type=Path, default=TEMPLATE)
    args = parser.parse_args(argv)
    try:
        text = render_site(
            args.template.read_text(),
            server_name=args.server_name,
            upstreams=args.upstream,
            certificate=args.cert,
            certificate_key=args.key,
            https_listen=args.https_listen,
            http_listen=args.http_listen,
            rate=args.rate,
            burst=args.burst,
            stream_rate=args.stream_rate,
            stream_burst=args.stream_burst,
            client_max_body_size=args.client_max_body_size,
            access_log=args.access_log,
            admin_allow=args.admin_allow,
            real_ip_from=args.real_ip_from,
            acme_root=args.acme_root,
        )
    except (RenderError, OSError) as error:
        print(f"render-nginx: {error}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
