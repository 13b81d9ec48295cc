"""The RAG stage: a chat request for a RAG route's model name is answered by its base model, grounded
on chunks retrieved from the route's collection (docs/rag.md, "Retrieval").

The last user message is embedded (follow-ups are not condensed with the earlier turns: no extra model
call), the route's collection queried for `top_k` chunks, those below `min_score` dropped, and the request
rewritten: the client's leading system messages, then the route's template with the chunks as `{context}`
(sluice/rag/prompt.py), then the rest of the conversation; `model` becomes the base model.

Every answer says what happened in `X-Sluice-Grounded`: `true` (context injected), `none` (nothing passed
`min_score`: the template is sent with a "no document matches" context, so the model can say it does not
know) or `false` (retrieval failed or timed out: the request goes to the base model unchanged, and its
answer is never cached). `X-Sluice-Sources` lists the chunks used, `[n]` of the prompt being entry n-1;
whole (non-streamed) answers also carry them as a `sources` field.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from sluice.config import RagRouteConfig
from sluice.context import Handler, RequestContext
from sluice.errors import InvalidRequest
from sluice.metrics import GatewayMetrics
from sluice.rag import prompt
from sluice.rag.retrieval import Retrieval, Retriever

GROUNDED = {
    "grounded": b"x-sluice-grounded: true\r\n",
    "no_match": b"x-sluice-grounded: none\r\n",
    "unavailable": b"x-sluice-grounded: false\r\n",
}


class RagStage:
    __slots__ = ("_fingerprints", "_metrics", "_retriever", "_routes")

    def __init__(self, routes: tuple[RagRouteConfig, ...], retriever: Retriever, metrics: GatewayMetrics) -> None:
        self._routes = {route.model: route for route in routes}
        # a changed route (base model, template, top_k…) must not share cached answers with its old self
        self._fingerprints = {route.model: _fingerprint(route) for route in routes}
        self._retriever = retriever
        self._metrics = metrics
        retriever.watch(route.collection for route in routes)

    def corpus_version(self, model: str) -> str:
        """The response cache's corpus scope for `model`: "" unless it is a RAG route's name."""
        route = self._routes.get(model)
        if route is None:
            return ""
        version = self._retriever.version(route.collection)
        return f"{self._fingerprints[model]}:{version if version is not None else '?'}"

    async def __call__(self, ctx: RequestContext, call_next: Handler) -> None:
        route = self._routes.get(ctx.model)
        if route is None or ctx.body is None or ctx.route is None:
            await call_next(ctx)
            return
        if ctx.route.name != "chat":
            raise InvalidRequest(
                f"The model '{route.model}' answers chat completions only (POST /v1/chat/completions).", param="model"
            )
        body = ctx.body
        messages: list[dict[str, Any]] = body["messages"]
        text = prompt.question(messages)
        found = await self._retriever.retrieve(route.collection, text, route.top_k) if text else Retrieval((), 0.0)
        chunks = prompt.ordered(c for c in found.chunks if c.score >= route.min_score)
        outcome = "unavailable" if not found.available else "grounded" if chunks else "no_match"
        self._metrics.rag_retrievals.child(route.model, outcome).inc()
        if text:
            self._metrics.rag_retrieval_duration.child(route.model).observe(found.seconds)
        ctx.writer.extra += GROUNDED[outcome]
        if outcome == "unavailable" or self._retriever.version(route.collection) is None:
            ctx.cache_capture = None  # an ungrounded answer, or one whose corpus version is unknown: not kept
        if outcome != "unavailable":
            body["messages"] = prompt.with_context(messages, route.template, chunks)
            sources = prompt.sources(chunks)
            ctx.writer.extra += b"x-sluice-sources: " + prompt.sources_header(sources) + b"\r\n"
            ctx.answer_extra = b'"sources":' + orjson.dumps(sources)
        body["model"] = ctx.model = route.base_model
        ctx.payload = orjson.dumps(body)
        await call_next(ctx)


def _fingerprint(route: RagRouteConfig) -> str:
    data = orjson.dumps(route.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(data, digest_size=8).hexdigest()
