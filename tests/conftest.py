"""Shared fixtures: uvloop for every async test (as in production), fake vLLM servers, in-process gateways."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import uvloop

from sluice.app import Gateway
from sluice.config import SluiceConfig
from sluice.config_loader import load_config
from sluice.testing.fake_vllm import FakeVLLM, FakeVLLMSettings, start_fake_vllm

if TYPE_CHECKING:
    pass

API_KEY = "sk-test-0123456789"
ENGINE = pytest.StashKey["EngineSession"]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Real-engine tests run last, so everything else runs while the engine boots."""
    items.sort(key=lambda item: "real_engine" in getattr(item, "fixturenames", ()))


def pytest_collection_finish(session: pytest.Session) -> None:
    from tests.e2e.engine_session import EngineSession

    engine = EngineSession()
    session.config.stash[ENGINE] = engine
    if any("real_engine" in item.fixturenames for item in session.items):
        engine.start()


def pytest_sessionfinish(session: pytest.Session) -> None:
    engine = session.config.stash.get(ENGINE, None)
    if engine is not None:
        engine.stop()


@pytest.fixture(scope="session")
def real_engine(request: pytest.FixtureRequest) -> str:
    """The URL of the session's real vLLM engine, once it is healthy."""
    engine = request.config.stash[ENGINE]
    if engine.problem and os.environ.get("SLUICE_REQUIRE_ENGINE") != "1":
        pytest.skip(engine.problem)
    return engine.wait()


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Every async test runs on uvloop, the loop the gateway uses in production."""
    return {"uvloop": uvloop.new_event_loop}


async def eventually(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    """Wait until `condition()` holds, checking every 20 ms; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"condition not met within {timeout} s"
        await asyncio.sleep(0.02)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


StartFake = Callable[..., Awaitable[FakeVLLM]]
StartGateway = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def fake() -> AsyncIterator[StartFake]:
    """Start fake vLLM servers: `await fake("model", loras=[...], itl_ms=...)`; all closed afterwards."""
    started: list[FakeVLLM] = []

    async def start(model: str = "base", **kwargs: Any) -> FakeVLLM:
        server = await start_fake_vllm(FakeVLLMSettings(model=model, **kwargs))
        started.append(server)
        return server

    yield start
    await asyncio.gather(*(s.close() for s in started), return_exceptions=True)


def gateway_config(backends: list[dict[str, Any]], **sections: Any) -> SluiceConfig:
    """A test gateway's configuration; its database and audit journal live in a fresh temporary folder."""
    scratch = Path(tempfile.mkdtemp(prefix="sluice-gw-"))
    data: dict[str, Any] = {
        "database": {"url": f"sqlite:///{scratch}/sluice.db"},
        "audit": {"journal_dir": str(scratch / "journal")},
        "server": {"host": "127.0.0.1", "port": 0},
        "backends": backends,
        "auth": {"api_keys": [{"name": "test", "key": API_KEY}]},
        "health": {"interval": 0.2, "timeout": 1.0, "discovery_interval": 1.0},
        "logging": {"level": "warning"},
    }
    data.update(sections)
    return SluiceConfig.model_validate(data)


@pytest.fixture
async def gateway() -> AsyncIterator[StartGateway]:
    """Start in-process gateways over the given fakes: `await gateway([fake_a, fake_b], timeouts={...})`,
    or from a configuration file it can reload: `await gateway(config_path=path)`."""
    started: list[Gateway] = []

    async def start(
        servers: Sequence[FakeVLLM | str] = (),
        backends_extra: dict[str, Any] | None = None,
        config_path: Path | None = None,
        **sections: Any,
    ) -> Gateway:
        backends = []
        for i, server in enumerate(servers):
            url = server if isinstance(server, str) else server.url
            backends.append({"name": f"b{i}", "url": url, **(backends_extra or {})})
        if config_path is not None:
            gw = Gateway(load_config(config_path), config_path)
        else:
            gw = Gateway(gateway_config(backends, **sections))
        await gw.start()
        started.append(gw)
        return gw

    yield start
    for gw in started:
        await gw.close()
