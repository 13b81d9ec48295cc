"""Run one stack under study: ``python -m bench.stacks.serve STACK --port P --upstream URL``.

The accepted key comes from ``SLUICE_BENCH_KEY``. Every stack runs one process with one event loop
(uvloop) so that it fits on the one core the harness pins it to.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

import uvloop

from bench.stacks.asgi_app import ENV_KEY, ENV_UPSTREAM_CLIENT, ENV_UPSTREAM_URL, ProxyApp
from bench.stacks.upstreams import make_upstream

STACKS = ("protocol", "uvicorn-aiohttp", "uvicorn-httpx", "aiohttp", "granian-aiohttp")
HOST = "127.0.0.1"


def _serve_uvicorn(client: str, port: int, upstream: str, keys: frozenset[bytes]) -> None:
    import uvicorn

    app = ProxyApp(make_upstream(client, upstream), keys)
    uvicorn.run(
        app,
        host=HOST,
        port=port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level="warning",
    )


def _serve_aiohttp(port: int, upstream: str, keys: frozenset[bytes]) -> None:
    from aiohttp import web

    from bench.stacks.aiohttp_app import build_app

    app = build_app(make_upstream("aiohttp", upstream), keys)
    web.run_app(app, host=HOST, port=port, access_log=None, print=None, loop=uvloop.new_event_loop())


def _serve_granian(port: int, upstream: str) -> None:
    from granian import Granian
    from granian.constants import HTTPModes, Interfaces, Loops, RuntimeModes
    from granian.log import LogLevels

    os.environ[ENV_UPSTREAM_URL] = upstream
    os.environ[ENV_UPSTREAM_CLIENT] = "aiohttp"
    Granian(
        "bench.stacks.asgi_app:app_from_env",
        factory=True,
        address=HOST,
        port=port,
        interface=Interfaces.ASGI,
        workers=1,
        runtime_threads=1,
        runtime_mode=RuntimeModes.st,
        loop=Loops.uvloop,
        http=HTTPModes.http1,
        websockets=False,
        log_level=LogLevels.warning,
    ).serve()


def _serve_protocol(port: int, upstream: str, keys: frozenset[bytes]) -> None:
    from urllib.parse import urlsplit

    from bench.stacks.protocol_server import ProxyProtocol
    from bench.stacks.protocol_upstream import UpstreamPool

    target = urlsplit(upstream)

    async def serve() -> None:
        pool = UpstreamPool(target.hostname or HOST, target.port or 80)
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: ProxyProtocol(pool, keys), HOST, port, backlog=4096)
        stop = loop.create_future()
        loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
        loop.add_signal_handler(signal.SIGINT, stop.set_result, None)
        async with server:
            await stop
        pool.close()

    uvloop.run(serve())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stacks.serve", description=__doc__)
    parser.add_argument("stack", choices=STACKS)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="upstream base URL, e.g. http://127.0.0.1:9000")
    args = parser.parse_args(argv)
    key = os.environ.get(ENV_KEY)
    if not key:
        print(f"{ENV_KEY} is not set", file=sys.stderr)
        return 2
    keys = frozenset({key.encode()})
    if args.stack == "protocol":
        _serve_protocol(args.port, args.upstream, keys)
    elif args.stack == "uvicorn-aiohttp":
        _serve_uvicorn("aiohttp", args.port, args.upstream, keys)
    elif args.stack == "uvicorn-httpx":
        _serve_uvicorn("httpx", args.port, args.upstream, keys)
    elif args.stack == "aiohttp":
        _serve_aiohttp(args.port, args.upstream, keys)
    else:
        _serve_granian(args.port, args.upstream)
    return 0


if __name__ == "__main__":
    sys.exit(main())
