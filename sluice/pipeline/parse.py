"""Reads the JSON body of proxied routes: parse, validate, apply the key's model allow-list.

For streams it also asks vLLM for the usage chunk (`stream_options.include_usage`) so usage can be
accounted; the relay strips that chunk again when the client did not ask for it.
"""

from __future__ import annotations

from typing import Any

import orjson

from sluice.context import RequestContext
from sluice.errors import GatewayError, InvalidJSON, InvalidRequest
from sluice.pipeline.validation import CHECKS

MAX_NESTING = 254  # levels of arrays and objects orjson can write back (it reads 1024): deeper is refused


class Forbidden(GatewayError):
    status = 403
    type = "permission_error"
    code = "model_not_allowed"


class ParseStage:
    def check(self, ctx: RequestContext) -> None:
        route = ctx.route
        if route is not None and route.proxied:
            self.read(ctx, route.name)

    def read(self, ctx: RequestContext, route: str) -> None:
        raw = ctx.request.body
        if not raw:
            raise InvalidRequest("The request body is empty; send a JSON object.")
        try:
            body: Any = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise InvalidJSON(f"The request body is not valid JSON: {exc}.") from None
        if not isinstance(body, dict):
            raise InvalidRequest("The request body must be a JSON object.")
        if raw.count(b"[") + raw.count(b"{") > MAX_NESTING:  # cheap: only then can it be nested too deeply
            _check_nesting(body)
        CHECKS[route](body)
        model: str = body["model"]
        principal = ctx.principal
        if principal is not None and principal.models is not None and model not in principal.models:
            raise Forbidden(f"This API key may not use the model '{model}'.", param="model")
        ctx.body = body
        ctx.model = model
        if body.get("stream") is True and route != "embeddings":  # embeddings are never streamed
            ctx.stream = True
            options = body.get("stream_options") or {}
            ctx.include_usage = options.get("include_usage") is True
            if not ctx.include_usage:
                body["stream_options"] = {**options, "include_usage": True}
                ctx.payload = orjson.dumps(body)


def _check_nesting(body: dict[str, Any]) -> None:
    """Refuse a body nested too deeply to be written again (stream options, cache keys, fallbacks do)."""
    try:
        orjson.dumps(body)
    except orjson.JSONEncodeError:
        raise InvalidRequest(f"The request body nests arrays and objects over {MAX_NESTING} levels deep.") from None
