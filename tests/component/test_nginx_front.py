"""The nginx front (deploy/nginx/) for real: nginx with the rendered site config and a self-signed certificate,
two `sluice serve` replicas behind it, a fake vLLM behind them.

Each check speaks from its own loopback source address (127.0.0.x): the per-address rate limits of one check
cannot disturb another, and the gateway's idea of the client address is distinguishable from nginx's own
(127.0.0.1, the only trusted proxy). The failover test kills a replica, so it comes last.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
KEY = "sk-nginx-front-0123456789"
ADMIN_KEY = "admin-nginx-front-0123456789"
ITL_MS = 30
STREAM_TOKENS = 20
SECURITY_HEADERS = {
    "strict-transport-security": "max-age=63072000; includeSubDomains",
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}

pytestmark = pytest.mark.skipif(not os.path.exists(NGINX), reason="nginx is not installed")


def load_renderer() -> ModuleType:
    spec = importlib.util.spec_from_file_location("render_nginx", ROOT / "scripts" / "render-nginx.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main_config(root: Path, site: Path) -> str:
    """deploy/nginx/nginx.conf with its system paths moved into `root` (and workers run as the test's user)."""
    text = (ROOT / "deploy" / "nginx" / "nginx.conf").read_text()
    temps = " ".join(
        f"{kind}_temp_path {root / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    for old, new in {
        "user www-data;": "user root;" if os.geteuid() == 0 else "",
        "worker_processes auto;": "worker_processes 2;",
        "/run/nginx.pid": str(root / "nginx.pid"),
        "/var/log/nginx/error.log": str(root / "error.log"),
        "/var/log/nginx/access.log": str(root / "default-access.log"),
        "include /etc/nginx/conf.d/*.conf;": f"{temps}\n    include {site};",
    }.items():
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return text


def self_signed(root: Path) -> tuple[Path, Path]:
    cert, key = root / "cert.pem", root / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-days", "1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return cert, key


def wait_tcp(port: int, process: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"{process.args!r} exited with {process.returncode}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port} after {timeout} s")


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Front:
    root: Path
    port: int
    http_port: int
    cert: Path
    tls: ssl.SSLContext
    gateways: list[subprocess.Popen[bytes]]
    gateway_ports: list[int]
    gateway_logs: list[Path]
    access_log: Path

    def call(
        self,
        path: str,
        body: dict[str, Any] | bytes | None = None,
        *,
        source: str,
        key: str | None = KEY,
        headers: dict[str, str] | None = None,
        method: str | None = None,
    ) -> Answer:
        """One HTTPS request on a fresh connection from the loopback address `source`."""
        connection = http.client.HTTPSConnection(
            "127.0.0.1", self.port, context=self.tls, timeout=10, source_address=(source, 0)
        )
        return _exchange(connection, path, body, key, headers, method)

    def gateway_access(self) -> list[dict[str, Any]]:
        time.sleep(0.3)  # the gateway writes its access log every 0.1 s
        lines = []
        for log in self.gateway_logs:
            for line in log.read_text().splitlines():
                if line.startswith("{") and '"sluice.access"' in line:
                    lines.append(json.loads(line))
        return lines

    def nginx_access(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.access_log.read_text().splitlines()]


def _exchange(
    connection: http.client.HTTPConnection,
    path: str,
    body: dict[str, Any] | bytes | None,
    key: str | None,
    headers: dict[str, str] | None,
    method: str | None,
) -> Answer:
    sent = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    try:
        connection.request(method or ("POST" if data is not None else "GET"), path, data, sent | (headers or {}))
        response = connection.getresponse()
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        connection.close()


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    root = tmp_path_factory.mktemp("nginx-front")
    started: list[subprocess.Popen[bytes]] = []
    try:
        fake_port = free_port()
        fake = subprocess.Popen(
            [sys.executable, "-m", "sluice", "fake-vllm", "--port", str(fake_port), "--model", "base",
             "--itl-ms", str(ITL_MS), "--tokens", str(STREAM_TOKENS)],
            stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        started.append(fake)
        gateway_ports = [free_port(), free_port()]
        gateways, logs = [], []
        for i, port in enumerate(gateway_ports):
            config = root / f"gateway{i}.yaml"
            config.write_text(
                f"server: {{host: 127.0.0.1, port: {port}}}\n"
                f"backends:\n  - {{name: a, url: 'http://127.0.0.1:{fake_port}'}}\n"
                f"auth:\n  admin_key: {ADMIN_KEY}\n  api_keys:\n    - {{name: ci, key: '{KEY}'}}\n"
                "rate_limits: {trusted_proxies: [127.0.0.1/32]}\n"
                "health: {interval: 0.2, timeout: 1.0, discovery_interval: 1.0}\n"
                f"database: {{url: 'sqlite:///{root}/gateway{i}.db'}}\n"
                f"audit: {{journal_dir: '{root}/journal{i}'}}\n"
                "logging: {level: info, format: json}\n"
            )
            logs.append(root / f"gateway{i}.log")
            with logs[-1].open("wb") as log:
                gateway = subprocess.Popen(
                    [sys.executable, "-m", "sluice", "serve", "--config", str(config)],
                    stderr=log, start_new_session=True,
                )  # fmt: skip
            started.append(gateway)
            gateways.append(gateway)

        cert, key = self_signed(root)
        port, http_port = free_port(), free_port()
        site = root / "sluice.conf"
        site.write_text(
            load_renderer().render_site(
                server_name="localhost",
                upstreams=[f"127.0.0.1:{p}" for p in gateway_ports],
                certificate=str(cert),
                certificate_key=str(key),
                https_listen=f"127.0.0.1:{port}",
                http_listen=f"127.0.0.1:{http_port}",
                client_max_body_size="64k",
                access_log=str(root / "access.log"),
                admin_allow=["127.0.0.5/32"],
            )
        )
        (root / "nginx.conf").write_text(main_config(root, site))
        nginx = subprocess.Popen(
            [NGINX, "-p", str(root), "-e", str(root / "startup.log"), "-c", str(root / "nginx.conf"),
             "-g", "daemon off;"],
            start_new_session=True,
        )  # fmt: skip
        started.append(nginx)
        wait_tcp(port, nginx)
        for gateway, gateway_port in zip(gateways, gateway_ports, strict=True):
            wait_tcp(gateway_port, gateway)
        tls = ssl.create_default_context(cafile=str(cert))
        result = Front(root, port, http_port, cert, tls, gateways, gateway_ports, logs, root / "access.log")
        deadline = time.monotonic() + 20
        while result.call("/v1/models", source="127.0.0.200").json().get("data") in (None, []):
            assert time.monotonic() < deadline, "the gateways never listed the fake's model"
            time.sleep(0.1)
        yield result
    finally:
        for process in reversed(started):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in started:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def handshake(front: Front, minimum: ssl.TLSVersion, maximum: ssl.TLSVersion, ciphers: str | None = None) -> Any:
    context = ssl.create_default_context(cafile=str(front.cert))
    context.minimum_version, context.maximum_version = minimum, maximum
    if ciphers:
        context.set_ciphers(ciphers)
    context.set_alpn_protocols(["h2", "http/1.1"])
    with (
        socket.create_connection(("127.0.0.1", front.port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        return tls.version(), tls.cipher(), tls.selected_alpn_protocol()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_tls_1_2_and_1_3_with_modern_ciphers_and_http2(front: Front) -> None:
    assert handshake(front, ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3)[::2] == ("TLSv1.3", "h2")
    version, (cipher, _, _), _ = handshake(front, ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2)
    assert version == "TLSv1.2" and cipher.startswith("ECDHE-") and ("GCM" in cipher or "CHACHA20" in cipher)
    # Refused by nginx (its alert), not by this client: TLS 1.1, and TLS 1.2 with a CBC cipher.
    with pytest.raises(ssl.SSLError, match="ALERT_PROTOCOL_VERSION"):
        handshake(front, ssl.TLSVersion.TLSv1_1, ssl.TLSVersion.TLSv1_1, "DEFAULT:@SECLEVEL=0")
    with pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE"):
        handshake(front, ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES128-SHA")
    # A whole request over HTTP/2 (curl verifies the certificate against the test's own CA file).
    result = subprocess.run(
        ["curl", "--http2", "-sS", "--cacert", str(front.cert), "--interface", "127.0.0.2", "-o", "/dev/null",
         "-w", "%{http_version} %{http_code}", f"https://127.0.0.1:{front.port}/version"],
        capture_output=True, text=True, timeout=10,
    )  # fmt: skip
    assert result.stdout == "2 200", result.stderr


def test_plain_http_is_redirected_to_https(front: Front) -> None:
    for port in (front.http_port, front.port):  # the HTTP port, and plain HTTP sent to the HTTPS port
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        answer = _exchange(connection, "/v1/models", None, None, None, None)
        assert answer.status == 301 and answer.headers["location"] == "https://127.0.0.1/v1/models"


def test_sse_chunks_arrive_spread_over_time_through_http2(front: Front) -> None:
    body = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    start = time.monotonic()
    curl = subprocess.Popen(
        ["curl", "--http2", "-sSN", "--cacert", str(front.cert), "--interface", "127.0.0.6",
         "-H", f"Authorization: Bearer {KEY}", "-H", "Content-Type: application/json", "-d", json.dumps(body),
         "-w", "\nversion %{http_version}\n", f"https://127.0.0.1:{front.port}/v1/chat/completions"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert curl.stdout is not None
    arrivals, lines = [], []
    for line in curl.stdout:
        lines.append(line.strip())
        if line.startswith(b"data: {"):
            arrivals.append(time.monotonic() - start)
    assert curl.wait(10) == 0
    assert lines[-1] == b"version 2" and b"data: [DONE]" in lines
    assert len(arrivals) >= STREAM_TOKENS
    generation = STREAM_TOKENS * ITL_MS / 1000
    # Buffered, everything would arrive at once at the end; streamed, the first token comes right away.
    assert arrivals[-1] - arrivals[0] >= 0.6 * generation, arrivals
    assert arrivals[0] < 0.3 * arrivals[-1], arrivals


def test_security_headers_and_request_id(front: Front) -> None:
    given = front.call("/version", source="127.0.0.2", headers={"X-Request-Id": "client-id-42"})
    generated = front.call("/version", source="127.0.0.2")
    refused = front.call("/version", source="127.0.0.2", headers={"X-Request-Id": "not valid!"})
    missing = front.call("/nowhere", source="127.0.0.2")
    for answer in (given, generated, refused, missing):
        assert SECURITY_HEADERS.items() <= answer.headers.items(), answer.headers
        assert answer.headers["server"] == "nginx"  # no version
    assert given.status == 200 and given.json()["name"] == "sluice"
    assert given.headers["x-request-id"] == "client-id-42"
    for answer in (generated, refused, missing):
        assert len(answer.headers["x-request-id"]) == 32 and answer.headers["x-request-id"] != "client-id-42"
    # The gateway was given the same id nginx answered with and logged.
    gateway_ids = {line["request_id"] for line in front.gateway_access()}
    assert {"client-id-42", generated.headers["x-request-id"], refused.headers["x-request-id"]} <= gateway_ids
    nginx_ids = {line["request_id"] for line in front.nginx_access()}
    assert {"client-id-42", missing.headers["x-request-id"]} <= nginx_ids


def test_only_the_public_paths_are_served_the_rest_is_a_json_404(front: Front) -> None:
    assert front.call("/health", source="127.0.0.2", key=None).json() == {"status": "ok"}
    assert front.call("/version", source="127.0.0.2", key=None).status == 200
    assert front.call("/v1/models", source="127.0.0.2").json()["data"][0]["id"] == "base"
    assert front.call("/v1/unknown", source="127.0.0.2").json()["error"]["code"] == "not_found"  # the gateway's
    for path in ("/", "/metrics", "/ready", "/admin/keys", "/console", "/v2/models", "/health/x", "/.env"):
        answer = front.call(path, source="127.0.0.2", key=ADMIN_KEY)
        assert answer.status == 404 and answer.headers["content-type"] == "application/json", path
        assert answer.json()["error"]["code"] == "not_found"
    # /admin/ only from the configured admin network, and then still behind the gateway's admin key.
    assert front.call("/admin/usage", source="127.0.0.5", key=ADMIN_KEY).status == 200
    assert front.call("/admin/usage", source="127.0.0.5", key=KEY).status == 401
    console = front.call("/console", source="127.0.0.5", key=None)  # the console, from there too
    assert console.status == 200 and console.headers["content-type"].startswith("text/html")
    policy = console.headers["content-security-policy"]  # the gateway's, which lets the page run, alone
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert console.headers["strict-transport-security"] and console.headers["x-frame-options"] == "DENY"
    too_large = front.call("/v1/chat/completions", b"x" * 100_000, source="127.0.0.2")
    assert too_large.status == 413 and too_large.json()["error"]["code"] == "request_too_large"
    # /health is never in the access log; everything else is, one JSON object per line.
    access = front.nginx_access()
    assert not [line for line in access if line["path"] == "/health"]
    assert {"/version", "/metrics", "/admin/keys"} <= {line["path"] for line in access}
    assert all(line["status"] > 0 and line["client_ip"].startswith("127.") for line in access)


def test_per_address_rate_limits_answer_429_past_the_burst(front: Front) -> None:
    statuses = [front.call("/v1/models", source="127.0.0.3").status for _ in range(40)]
    assert statuses[:21] == [200] * 21 and 429 in statuses, statuses  # 1 + burst 20, then 10 r/s
    refused = front.call("/v1/models", source="127.0.0.3")
    assert refused.status == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert refused.headers["retry-after"] == "1" and SECURITY_HEADERS.items() <= refused.headers.items()
    assert front.call("/v1/models", source="127.0.0.4").status == 200  # another address is not affected
    # The completion endpoints have their own, larger zone (30 r/s, burst 60); unauthenticated requests are
    # the cheapest way to spend it (the gateway answers 401), and nginx counts them just the same.
    body = {"model": "base", "messages": []}
    statuses = [front.call("/v1/completions", body, source="127.0.0.7", key=None).status for _ in range(150)]
    assert statuses[:61] == [401] * 61 and 429 in statuses, statuses
    assert front.call("/v1/models", source="127.0.0.7").status == 200  # a separate zone


def test_the_gateway_sees_the_real_client_address(front: Front) -> None:
    # The gateway resolves the client address for the proxied routes (rate limits, access log, audit).
    body = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    spoofed = {"X-Forwarded-For": "203.0.113.9", "X-Request-Id": "real-ip-through-nginx"}
    assert front.call("/v1/chat/completions", body, source="127.0.0.8", headers=spoofed).status == 200
    # Straight to a replica from an untrusted address, X-Forwarded-For is ignored.
    direct = http.client.HTTPConnection("127.0.0.1", front.gateway_ports[0], timeout=5, source_address=("127.0.0.9", 0))
    spoofed_direct = spoofed | {"X-Request-Id": "real-ip-direct"}
    assert _exchange(direct, "/v1/chat/completions", body, KEY, spoofed_direct, None).status == 200
    seen = {line["request_id"]: line["client_ip"] for line in front.gateway_access()}
    assert seen["real-ip-through-nginx"] == "127.0.0.8"
    assert seen["real-ip-direct"] == "127.0.0.9"


def test_killing_a_replica_loses_no_request(front: Front) -> None:
    """Last in this module: one replica stays dead."""
    body = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    statuses: list[int] = []
    stop = threading.Event()

    def client(source: str) -> None:
        while not stop.is_set():
            statuses.append(front.call("/v1/chat/completions", body, source=source).status)

    threads = [threading.Thread(target=client, args=(f"127.0.10.{i}",)) for i in range(1, 9)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    before = len(statuses)
    os.killpg(front.gateways[0].pid, signal.SIGKILL)
    time.sleep(1.0)
    stop.set()
    for thread in threads:
        thread.join(15)
    assert before > 10 and len(statuses) > before + 20, (before, len(statuses))
    assert set(statuses) == {200}, [s for s in statuses if s != 200]
    dead = f"127.0.0.1:{front.gateway_ports[0]}"
    retried = [line for line in front.nginx_access() if line["upstream"].startswith(f"{dead}, ")]
    assert retried, "no request was passed on from the killed replica"
    assert all(line["status"] == 200 for line in retried)


def test_the_renderer_refuses_values_that_would_rewrite_the_config() -> None:
    renderer = load_renderer()
    good = {"server_name": "llm.example.com", "upstreams": ["10.0.0.1:8080"], "certificate": "/c.pem"}
    assert "server 10.0.0.1:8080 max_fails=1" in renderer.render_site(**good, certificate_key="/k.pem")
    for bad in (
        {"upstreams": ["10.0.0.1:8080; }"]},
        {"upstreams": []},
        {"server_name": "x; include /etc/passwd"},
        {"certificate": "/c.pem;"},
        {"admin_allow": ["everyone"]},
        {"client_max_body_size": "8m; deny all"},
    ):
        with pytest.raises(renderer.RenderError):
            renderer.render_site(**(good | {"certificate_key": "/k.pem"} | bad))
    with pytest.raises(renderer.RenderError, match="UNKNOWN"):
        renderer.render("listen ${UNKNOWN};", {})
