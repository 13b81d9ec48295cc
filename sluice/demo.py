"""`sluice demo`: a working gateway in front of a real vLLM engine on a laptop, in one command.

The backend is the local engine prepared by `sluice engine prepare` (Gemma 3 270M on CPU, with two
untrained demonstration LoRA adapters, `medical` and `code`). `--with-fake` adds a vLLM-compatible fake
server (`demo-fake`) as a second backend; `--fake-only` runs the fakes alone, for machines that cannot
spare the engine's ~6 GB. A fresh API key and admin key (for the console at /console) are generated for
each run and printed with examples.
"""

from __future__ import annotations

import asyncio
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sluice.app import Gateway
from sluice.config import SluiceConfig
from sluice.engine.info import load_engine_info
from sluice.engine.launch import engine_url, start_engine, stop_engine, wait_healthy
from sluice.logs import configure_logging
from sluice.testing.fake_vllm import FakeVLLM, FakeVLLMSettings, start_fake_vllm

ENGINE_DATA = Path("data/engine")


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main(port: int = 8080, with_fake: bool = False, fake_only: bool = False, data_dir: Path = Path("data/demo")) -> int:
    engine: subprocess.Popen[bytes] | None = None
    url = ""
    if not fake_only:
        info = load_engine_info(ENGINE_DATA)
        if info is None:
            say(f"sluice demo: the local engine is not prepared in {ENGINE_DATA}; run `sluice engine prepare` "
                "(`make demo` does it for you), or use --fake-only")
            return 1
        engine_port = _free_port()
        log = ENGINE_DATA / "logs" / f"demo-engine-{engine_port}.log"
        say(f"  [1/3] engine: starting vLLM ({info.served_model_name} + adapters {', '.join(info.adapters)}) "
            f"on 127.0.0.1:{engine_port}; log: {log}")
        engine = start_engine(info, engine_port, max_num_seqs=8, lora=True, log_path=log)
        url = engine_url(engine_port)
        started = time.monotonic()
        try:
            wait_healthy(url, 420, process=engine, on_tick=_ticker(started), interval=1.0)
        except Exception as exc:
            say(f"\nsluice demo: the engine did not start: {exc}; see {log}")
            stop_engine(engine)
            return 1
        say(f"\n        ready after {time.monotonic() - started:.0f} s")
    try:
        import uvloop

        return uvloop.run(_run(port, url, with_fake or fake_only, data_dir))
    finally:
        if engine is not None:
            stop_engine(engine)


def _ticker(started: float) -> Any:
    def tick() -> None:
        print(f"\r        loading the model … {time.monotonic() - started:.0f} s", end="", file=sys.stderr, flush=True)

    return tick


async def _run(port: int, engine: str, with_fake: bool, data_dir: Path) -> int:
    key = "sk-sluice-demo-" + secrets.token_urlsafe(18)
    admin_key = "demo-admin-" + secrets.token_urlsafe(18)
    fakes: list[FakeVLLM] = []
    backends: list[dict[str, Any]] = []
    if engine:
        backends.append({"name": "local-vllm", "url": engine})
    if with_fake:
        say("  [2/3] fake backend: a vLLM-compatible FAKE server (canned words, not a model) serving demo-fake")
        fake = await start_fake_vllm(FakeVLLMSettings(model="demo-fake", itl_ms=20, tokens=24))
        fakes.append(fake)
        backends.append({"name": "fake", "url": fake.url})
    config = SluiceConfig.model_validate(
        {
            "server": {"host": "127.0.0.1", "port": port},
            "backends": backends,
            "auth": {
                "api_keys": [{"name": "demo", "key": key}],
                "admin_key": admin_key,  # the console (/console) and the admin API
                "key_secret": _kept_secret(data_dir),  # managed keys made in the console outlive a restart
            },
            "database": {"url": f"sqlite:///{data_dir / 'sluice.db'}"},
            "audit": {"journal_dir": str(data_dir / "audit-journal")},
            "cache": {"enabled": True},  # in process, with the local embedding model (docs/cache.md)
            "logging": {"format": "text", "level": "warning", "access_log": False},
        }
    )
    configure_logging(config.logging)
    gateway = Gateway(config)
    try:
        await gateway.start()
    except OSError as exc:
        say(f"sluice demo: cannot listen on port {port} ({exc.strerror}); try `make demo PORT=8081`")
        for fake in fakes:
            await fake.close()
        return 1
    _save_key(data_dir, "api-key", key)
    _save_key(data_dir, "admin-key", admin_key)
    url = gateway.url
    say(f"  [3/3] gateway: listening on {url}\n")
    model = "medical" if engine else "demo-fake"
    models = "gemma-3-270m (base), medical and code (LoRA adapters)" if engine else ""
    if with_fake:
        models += (", " if models else "") + "demo-fake (fake backend)"
    notice = (
        "The model is Gemma 3 270M, a small base model (not instruction-tuned); the adapters are untrained,\n"
        "for demonstration only. The Gemma terms apply to the weights.\n"
        if engine
        else ""
    )
    print(f"""Sluice is running at {url}
Models: {models}
{notice}API key (also in {data_dir / 'api-key'}): {key}

  curl {url}/v1/chat/completions -H "Authorization: Bearer {key}" \\
       -H "Content-Type: application/json" \\
       -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello"}}], "stream": true}}'

  python -c "from openai import OpenAI; c = OpenAI(base_url='{url}/v1', api_key='{key}'); \\
print(c.completions.create(model='{model}', prompt='The sky is', max_tokens=16).choices[0].text)"

Ask the same question twice with "temperature": 0 and `curl -i`: the second answer says
X-Sluice-Cache: hit-exact (the response cache; reworded questions can be hit-semantic).

Console: {url}/console   admin key (also in {data_dir / 'admin-key'}): {admin_key}
Metrics: {url}/metrics   Ready: {url}/ready   Stop: Ctrl-C""", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    say("stopping …")
    await gateway.close()
    for fake in fakes:
        await fake.close()
    return 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _save_key(data_dir: Path, name: str, key: str) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / name
    path.write_text(key + "\n")
    path.chmod(0o600)


def _kept_secret(data_dir: Path) -> str:
    """The demo's `auth.key_secret`, made on the first run and kept in data_dir (managed keys hash with it)."""
    path = data_dir / "key-secret"
    if not path.exists():
        _save_key(data_dir, "key-secret", secrets.token_urlsafe(32))
    return path.read_text().strip()
