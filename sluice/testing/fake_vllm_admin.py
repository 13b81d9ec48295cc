"""The fake vLLM's cold routes: models, runtime LoRA, health, version, metrics and `/fake/*` control.

`/v1/models`, `/v1/load_lora_adapter`, `/v1/unload_lora_adapter`, `/health`, `/version` and `/metrics`
answer like vLLM. `/fake/config` (GET, POST), `/fake/stats` (GET) and `/fake/reset` (POST) let tests in
other processes steer and observe the fake.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import orjson
from aiohttp import web

from sluice.testing.fake_vllm_engine import FakeEngine
from sluice.testing.fake_vllm_handlers import error_response
from sluice.testing.fake_vllm_metrics import CONTENT_TYPE
from sluice.testing.fake_vllm_wire import WireError, bad_request, parse_json, random_id

VERSION = "0.32.0+fake"


def json_response(value: object, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(value), content_type="application/json")


def _permission(created: int) -> list[dict[str, Any]]:
    return [
        {
            "id": random_id("modelperm-"),
            "object": "model_permission",
            "created": created,
            "allow_create_engine": False,
            "allow_sampling": True,
            "allow_logprobs": True,
            "allow_search_indices": False,
            "allow_view": True,
            "allow_fine_tuning": False,
            "organization": "*",
            "group": None,
            "is_blocking": False,
        }
    ]


class AdminHandlers:
    def __init__(self, engine: FakeEngine) -> None:
        self._engine = engine

    async def models(self, request: web.Request) -> web.Response:
        settings = self._engine.settings
        created = int(time.time())
        cards: list[dict[str, Any]] = [
            {
                "id": settings.model,
                "object": "model",
                "created": created,
                "owned_by": "vllm",
                "root": settings.model,
                "parent": None,
                "max_model_len": settings.max_model_len,
                "permission": _permission(created),
            }
        ]
        for name, path in self._engine.loras.adapters.items():
            cards.append(
                {
                    "id": name,
                    "object": "model",
                    "created": created,
                    "owned_by": "vllm",
                    "root": path,
                    "parent": settings.model,
                    "max_model_len": None,
                    "permission": _permission(created),
                }
            )
        return json_response({"object": "list", "data": cards})

    async def _lora_body(self, request: web.Request) -> dict[str, Any]:
        body = parse_json(await request.read())
        if not isinstance(body, dict):
            raise bad_request("1 validation error: Input should be a valid dictionary")
        return body

    async def load_lora(self, request: web.Request) -> web.Response:
        try:
            body = await self._lora_body(request)
        except WireError as err:
            return error_response(err)
        name, path = body.get("lora_name"), body.get("lora_path")
        problem = self._engine.loras.load(name if isinstance(name, str) else "", path if isinstance(path, str) else "")
        if problem is not None:
            return error_response(WireError(400, problem, "InvalidUserInput"))
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_lora(self, request: web.Request) -> web.Response:
        try:
            body = await self._lora_body(request)
        except WireError as err:
            return error_response(err)
        name = body.get("lora_name")
        if not isinstance(name, str) or not name:
            message = "either 'lora_name' and 'lora_int_id' needs to be provided."
            return error_response(WireError(400, message, "InvalidUserInput"))
        if not self._engine.loras.unload(name):
            message = f"The lora adapter '{name}' cannot be found."
            return error_response(WireError(404, message, "NotFoundError"))
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    async def health(self, request: web.Request) -> web.Response:
        return web.Response()

    async def version(self, request: web.Request) -> web.Response:
        return json_response({"version": VERSION})

    async def metrics(self, request: web.Request) -> web.Response:
        response = web.Response(body=self._engine.metrics.render())
        response.headers["Content-Type"] = CONTENT_TYPE
        return response

    async def get_config(self, request: web.Request) -> web.Response:
        return json_response(dataclasses.asdict(self._engine.settings))

    async def set_config(self, request: web.Request) -> web.Response:
        try:
            body = parse_json(await request.read())
            if not isinstance(body, dict):
                raise bad_request("expected a JSON object of settings")
            self._engine.settings.apply(body)
        except WireError as err:
            return error_response(err)
        except ValueError as exc:
            return error_response(bad_request(str(exc)))
        self._engine.scheduler.wake()  # max_num_seqs may have grown
        return await self.get_config(request)

    async def get_stats(self, request: web.Request) -> web.Response:
        return json_response(self._engine.stats.as_dict())

    async def reset_stats(self, request: web.Request) -> web.Response:
        self._engine.stats.reset()
        return json_response(self._engine.stats.as_dict())
