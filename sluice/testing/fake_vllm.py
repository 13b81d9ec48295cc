"""A vLLM-compatible fake OpenAI server, for the gateway's tests and benchmarks and for users.

It answers like vLLM's OpenAI server on the wire (chat, completions, embeddings, models, runtime LoRA,
health, version, Prometheus metrics) while simulating vLLM's load: `max_num_seqs` running sequences,
a FIFO waiting queue, KV-cache usage, a prefix cache and (with `prefill_ms_per_token`) prefills that
cost time per uncached prompt token and queue behind each other. Latency, output length and failures
are set by flags, by `X-Fake-*` request headers or at runtime through `POST /fake/config`;
`GET /fake/stats` and `FakeVLLM.stats` report what the fake saw.

Python API::

    fake = await start_fake_vllm(FakeVLLMSettings(model="m", loras=["a"], ttft_ms=50))
    ...  # use fake.url + "/v1"
    await fake.close()

CLI: `sluice fake-vllm --model m --lora a --port 8000` (or `python -m sluice.testing.fake_vllm ...`).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Callable
from types import TracebackType

from aiohttp import web

from sluice.testing.fake_vllm_admin import AdminHandlers
from sluice.testing.fake_vllm_engine import FakeEngine
from sluice.testing.fake_vllm_handlers import InferenceHandlers
from sluice.testing.fake_vllm_settings import FakeVLLMSettings, parse_fail, parse_lora
from sluice.testing.fake_vllm_state import FakeStats

__all__ = ["FakeStats", "FakeVLLM", "FakeVLLMSettings", "build_app", "main", "start_fake_vllm"]

SHUTDOWN_TIMEOUT_S = 0.1  # close() cuts in-flight requests after this long
MAX_BODY_BYTES = 64 * 1024 * 1024
BACKLOG = 2048


def build_app(engine: FakeEngine) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    inference = InferenceHandlers(engine)
    admin = AdminHandlers(engine)
    add = app.router.add_route
    add("POST", "/v1/chat/completions", inference.chat)
    add("POST", "/v1/completions", inference.completions)
    add("POST", "/v1/embeddings", inference.embeddings)
    add("GET", "/v1/models", admin.models)
    add("POST", "/v1/load_lora_adapter", admin.load_lora)
    add("POST", "/v1/unload_lora_adapter", admin.unload_lora)
    add("GET", "/health", admin.health)
    add("GET", "/version", admin.version)
    add("GET", "/metrics", admin.metrics)
    add("GET", "/fake/config", admin.get_config)
    add("POST", "/fake/config", admin.set_config)
    add("GET", "/fake/stats", admin.get_stats)
    add("POST", "/fake/reset", admin.reset_stats)
    return app


class FakeVLLM:
    """A running fake server. `settings` is live: changing it changes how later requests behave."""

    def __init__(self, engine: FakeEngine, runner: web.AppRunner, host: str, port: int) -> None:
        self.engine = engine
        self.settings = engine.settings
        self.stats: FakeStats = engine.stats
        self.host = host
        self.port = port
        self.url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        self._runner = runner
        self._closed = False

    async def close(self) -> None:
        """Stop listening, cut whatever is still in flight (after SHUTDOWN_TIMEOUT_S) and free the port."""
        if self._closed:
            return
        self._closed = True
        await self._runner.cleanup()

    async def __aenter__(self) -> FakeVLLM:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


async def start_fake_vllm(settings: FakeVLLMSettings) -> FakeVLLM:
    """Start a fake on `settings.host:settings.port` (port 0 picks a free port); raises ValueError/OSError."""
    settings.validate()
    engine = FakeEngine(settings)
    # handler_cancellation: a client disconnect cancels its handler at once, which is how the fake
    # notices aborted streams (aiohttp >= 3.9 does not cancel handlers by default).
    runner = web.AppRunner(
        build_app(engine),
        handle_signals=False,
        access_log=None,
        handler_cancellation=True,
        shutdown_timeout=SHUTDOWN_TIMEOUT_S,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.port, backlog=BACKLOG)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    port = int(runner.addresses[0][1])
    return FakeVLLM(engine, runner, settings.host, port)


def _fail_arg(value: str) -> str:
    try:
        parse_fail(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sluice fake-vllm", description="A vLLM-compatible fake OpenAI server.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", required=True, help="base model name served")
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME[=PATH]",
        help="LoRA adapter served next to the base model (repeatable)",
    )
    p.add_argument("--ttft-ms", type=float, default=0.0, help="time to first token once scheduled")
    p.add_argument("--itl-ms", type=float, default=0.0, help="delay between tokens")
    p.add_argument("--tokens", type=int, default=16, help="tokens generated when max_tokens is absent")
    p.add_argument("--error-rate", type=float, default=0.0, help="fraction of requests answered 500")
    p.add_argument(
        "--fail",
        type=_fail_arg,
        default=None,
        help="inject a failure into every request: 500 (any 4xx/5xx), hang, close, drop:N, sse-error:N",
    )
    p.add_argument("--max-num-seqs", type=int, default=256, help="sequences running at once")
    p.add_argument("--kv-capacity-tokens", type=int, default=65536, help="KV cache size, in tokens")
    p.add_argument(
        "--prefill-ms-per-token",
        type=float,
        default=0.0,
        help="prefill cost of each prompt token not in the prefix cache; prefills run one at a time (default 0)",
    )
    p.add_argument("--embedding-dim", type=int, default=32)
    p.add_argument("--max-loras", type=int, default=4, help="adapters that may be loaded at once")
    p.add_argument("--max-model-len", type=int, default=2048, help="context window, in tokens")
    p.add_argument("--seed", type=int, default=None, help="seed for --error-rate, for reproducible runs")
    return p


def _settings_from(args: argparse.Namespace) -> FakeVLLMSettings:
    return FakeVLLMSettings(
        model=args.model,
        loras=list(args.lora),
        host=args.host,
        port=args.port,
        ttft_ms=args.ttft_ms,
        itl_ms=args.itl_ms,
        tokens=args.tokens,
        error_rate=args.error_rate,
        fail=args.fail,
        max_num_seqs=args.max_num_seqs,
        kv_capacity_tokens=args.kv_capacity_tokens,
        prefill_ms_per_token=args.prefill_ms_per_token,
        embedding_dim=args.embedding_dim,
        max_loras=args.max_loras,
        max_model_len=args.max_model_len,
        seed=args.seed,
    )


async def _serve(settings: FakeVLLMSettings) -> int:
    try:
        fake = await start_fake_vllm(settings)
    except OSError as exc:
        print(f"fake vLLM: cannot listen on {settings.host}:{settings.port}: {exc}", file=sys.stderr)
        return 1
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    names = [parse_lora(spec)[0] for spec in settings.loras]
    loras = f" (+ loras: {', '.join(names)})" if names else ""
    print(f"fake vLLM serving {settings.model}{loras} on {fake.url}", flush=True)
    try:
        await stop.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await fake.close()
    return 0


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main(argv: list[str] | None = None) -> int:
    """Run the fake until SIGINT/SIGTERM; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = _settings_from(args)
    try:
        settings.validate()
    except ValueError as exc:
        print(f"fake vLLM: {exc}", file=sys.stderr)
        return 2
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(_serve(settings))


if __name__ == "__main__":
    sys.exit(main())
