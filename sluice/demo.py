"""`sluice demo`: a working gateway on a laptop in one command, with nothing to install or run besides.

Until the real local engine lands, the backends are two vLLM-compatible fake servers (say so plainly):
`demo-base` with LoRA adapters `medical` and `code` on one, `demo-small` on the other. A fresh API key
is generated for each run and printed with ready-to-paste examples.
"""

from __future__ import annotations

import asyncio
import secrets
import signal
import sys
from pathlib import Path

from sluice.app import Gateway
from sluice.config import SluiceConfig
from sluice.logs import configure_logging
from sluice.testing.fake_vllm import FakeVLLMSettings, start_fake_vllm


def main(port: int = 8080, data_dir: Path = Path("data/demo")) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(_run(port, data_dir))
    return uvloop.run(_run(port, data_dir))


async def _run(port: int, data_dir: Path) -> int:
    key = "sk-sluice-demo-" + secrets.token_urlsafe(18)
    print("Starting the Sluice demo…", file=sys.stderr)
    print("  [1/3] backends: two FAKE vLLM servers (sluice fake-vllm): canned words, not a model", file=sys.stderr)
    a = await start_fake_vllm(FakeVLLMSettings(model="demo-base", loras=["medical", "code"], itl_ms=30, tokens=24))
    b = await start_fake_vllm(FakeVLLMSettings(model="demo-small", itl_ms=15, tokens=16))
    config = SluiceConfig.model_validate(
        {
            "server": {"host": "127.0.0.1", "port": port},
            "backends": [{"name": "fake-a", "url": a.url}, {"name": "fake-b", "url": b.url}],
            "auth": {"api_keys": [{"name": "demo", "key": key}]},
            "logging": {"format": "text", "level": "warning", "access_log": False},
        }
    )
    configure_logging(config.logging)
    print(f"  [2/3] gateway: listening on 127.0.0.1:{port}", file=sys.stderr)
    gateway = Gateway(config)
    try:
        await gateway.start()
    except OSError as exc:
        print(f"sluice demo: cannot listen on port {port} ({exc.strerror}); try `make demo PORT=8081`",
              file=sys.stderr)
        await a.close()
        await b.close()
        return 1
    _save_key(data_dir, key)
    print("  [3/3] ready\n", file=sys.stderr)
    url = gateway.url
    print(f"""Sluice is running at {url}  (backends are fakes: answers are canned words)
Models: demo-base, medical and code (LoRA adapter names on demo-base), demo-small
API key (also in {data_dir / 'api-key'}): {key}

  curl {url}/v1/chat/completions -H "Authorization: Bearer {key}" \\
       -H "Content-Type: application/json" \\
       -d '{{"model": "medical", "messages": [{{"role": "user", "content": "Hello"}}], "stream": true}}'

  python -c "from openai import OpenAI; c = OpenAI(base_url='{url}/v1', api_key='{key}'); \\
print(c.chat.completions.create(model='code', messages=[{{'role':'user','content':'hi'}}]).choices[0].message.content)"

Metrics: {url}/metrics   Health: {url}/ready   Stop: Ctrl-C""", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await gateway.close()
    await a.close()
    await b.close()
    return 0


def _save_key(data_dir: Path, key: str) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "api-key"
    path.write_text(key + "\n")
    path.chmod(0o600)
