"""A Kubernetes API server that replays recorded EndpointSlice responses (tests/fixtures/kubernetes).

No cluster is available here, so discovery's tests point the official client (through a kubeconfig) at
this server: `GET …/endpointslices` answers the recorded list, `…&watch=true` streams the events a test
releases with `send`, one JSON object per line, as the API server does. The test can make the API fail,
end a watch, and read every request the client made (path, query, Authorization header).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

FIXTURES = Path(__file__).parent / "fixtures" / "kubernetes"
TOKEN = "recorded-sa-token"


def recorded(name: str, addresses: dict[str, str] | None = None, port: int | None = None) -> str:
    """A fixture's text, with pod addresses and the engines' port mapped onto where the fakes listen."""
    text = (FIXTURES / name).read_text()
    for recorded_address, here in (addresses or {}).items():
        text = text.replace(f'"{recorded_address}"', f'"{here}"')
    if port is not None:
        text = text.replace('"port": 8000', f'"port": {port}').replace('"port":8000', f'"port":{port}')
    return text


def recorded_events(name: str, addresses: dict[str, str] | None = None, port: int | None = None) -> list[str]:
    return [line for line in recorded(name, addresses, port).splitlines() if line.strip()]


@dataclass
class Call:
    path: str
    query: dict[str, str]
    authorization: str


@dataclass
class FakeKubernetesApi:
    list_body: str = ""
    fail_with: int | None = None  # answer every request with this status while set
    calls: list[Call] = field(default_factory=list)
    url: str = ""
    _events: asyncio.Queue[str | None] = field(default_factory=asyncio.Queue)
    _runner: web.AppRunner | None = None
    watching: asyncio.Event = field(default_factory=asyncio.Event)
    _open_watches: int = 0

    async def start(self) -> FakeKubernetesApi:
        app = web.Application()
        app.router.add_get("/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices", self._slices)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def close(self) -> None:
        for _ in range(self._open_watches):
            self._events.put_nowait(None)
        if self._runner is not None:
            await self._runner.cleanup()

    def send(self, *lines: str) -> None:
        """Stream these events (JSON lines) to the current or next watch."""
        for line in lines:
            self._events.put_nowait(line)

    def end_watch(self) -> None:
        """Close the current watch, as the API server does when its timeout passes."""
        self._events.put_nowait(None)

    def kubeconfig(self, folder: Path, namespace: str = "sluice") -> Path:
        path = folder / "kubeconfig"
        config: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "recorded", "cluster": {"server": self.url}}],
            "users": [{"name": "gateway", "user": {"token": TOKEN}}],
            "contexts": [
                {"name": "recorded", "context": {"cluster": "recorded", "user": "gateway", "namespace": namespace}}
            ],
            "current-context": "recorded",
        }
        path.write_text(json.dumps(config))
        return path

    def watches(self) -> list[Call]:
        return [call for call in self.calls if call.query.get("watch") == "true"]

    async def _slices(self, request: web.Request) -> web.StreamResponse:
        self.calls.append(Call(request.path, dict(request.query), request.headers.get("Authorization", "")))
        if self.fail_with is not None:
            status = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": self.fail_with}
            return web.json_response(status, status=self.fail_with)
        if request.query.get("watch") != "true":
            return web.Response(text=self.list_body, content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        self.watching.set()
        self._open_watches += 1
        try:
            while True:
                line = await self._events.get()
                if line is None:
                    break
                await response.write(line.encode() + b"\n")
                if json.loads(line)["type"] == "ERROR":  # the API server ends a watch after an error
                    break
        finally:
            self._open_watches -= 1
            self.watching.clear()
        with contextlib.suppress(ConnectionError):  # the client went away first
            await response.write_eof()
        return response
