"""nginx configs generated into a temp dir: the canned upstream and the reverse proxy under test.

Each instance runs in the foreground (``daemon off``) with its own prefix, pid file, logs and temp paths,
so the system nginx and its config are never touched.
"""

from __future__ import annotations

from pathlib import Path

from bench.procs import LOCALHOST, Service, start, wait_tcp

MODEL = "bench-model"
CHAT_COMPLETION = (
    '{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"bench-model",'
    '"choices":[{"index":0,"message":{"role":"assistant","content":"Rivers carve patient paths through '
    'stone, carrying the memory of mountains to the sea."},"logprobs":null,"finish_reason":"stop"}],'
    '"usage":{"prompt_tokens":28,"completion_tokens":17,"total_tokens":45}}'
)
MODELS = (
    '{"object":"list","data":[{"id":"bench-model","object":"model","owned_by":"vllm",'
    '"root":"bench-model","parent":null}]}'
)


def _frame(name: str, prefix: Path, http_body: str) -> str:
    temp = prefix / f"{name}-temp"
    temp.mkdir(parents=True, exist_ok=True)
    temps = "\n".join(
        f"    {kind}_temp_path {temp / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 65536;
pid {prefix / (name + ".pid")};
error_log {prefix / (name + "-error.log")} warn;
events {{
    worker_connections 16384;
}}
http {{
    access_log off;
    server_tokens off;
{temps}
    keepalive_requests 1000000;
    keepalive_timeout 300s;
{http_body}
}}
"""


def canned_upstream_conf(prefix: Path, port: int) -> str:
    """The cheapest upstream: canned chat completion, model list and health."""
    server = f"""    server {{
        listen {LOCALHOST}:{port} reuseport backlog=4096;
        default_type application/json;
        location = /v1/chat/completions {{
            return 200 '{CHAT_COMPLETION}';
        }}
        location = /v1/models {{
            return 200 '{MODELS}';
        }}
        location = /health {{
            return 200 '';
        }}
        location / {{
            return 404 '{{"error":"not found"}}';
        }}
    }}"""
    return _frame("upstream", prefix, server)


def reverse_proxy_conf(prefix: Path, port: int, upstream_port: int) -> str:
    """nginx as a plain reverse proxy: pooled keep-alive upstream, no buffering (SSE-safe)."""
    server = f"""    upstream backend {{
        server {LOCALHOST}:{upstream_port};
        keepalive 256;
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen {LOCALHOST}:{port} reuseport backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 300s;
        }}
    }}"""
    return _frame("proxy", prefix, server)


def _run(name: str, conf: str, *, prefix: Path, port: int, nginx: str, taskset: str, cpu: int) -> Service:
    path = prefix / f"{name}.conf"
    path.write_text(conf)
    service = start(
        f"nginx-{name}",
        [nginx, "-e", str(prefix / f"{name}-startup.log"), "-c", str(path), "-p", str(prefix)],
        cpu=cpu,
        taskset=taskset,
        logdir=prefix,
    )
    wait_tcp(service, port)
    return service


def start_canned_upstream(prefix: Path, port: int, *, nginx: str, taskset: str, cpu: int) -> Service:
    """Run the canned upstream on ``port``."""
    return _run(
        "upstream",
        canned_upstream_conf(prefix, port),
        prefix=prefix,
        port=port,
        nginx=nginx,
        taskset=taskset,
        cpu=cpu,
    )


def start_reverse_proxy(prefix: Path, port: int, upstream_port: int, *, nginx: str, taskset: str, cpu: int) -> Service:
    """Run nginx as a reverse proxy on ``port`` in front of ``upstream_port``."""
    return _run(
        "proxy",
        reverse_proxy_conf(prefix, port, upstream_port),
        prefix=prefix,
        port=port,
        nginx=nginx,
        taskset=taskset,
        cpu=cpu,
    )
