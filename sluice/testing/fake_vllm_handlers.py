"""The fake vLLM's inference routes: `/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`.

Every request is counted, then failure injection runs (`X-Fake-Fail` / `--fail`, error rate), then vLLM's
validation, then the simulated engine. A streamed response sends its headers at once (as vLLM does,
before the request is even scheduled) and its first event when the first token is due.

Client disconnects: the server runs with aiohttp's `handler_cancellation=True`, so when the connection
drops aiohttp cancels the handler at whatever it is awaiting (queue, TTFT, a write); a write that races
the disconnect raises `ConnectionError` instead. Both end as `Outcome.ABORTED`, which frees the
scheduler slot at once, like vLLM aborting a request whose client went away.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from http import HTTPStatus

from aiohttp import web

from sluice.testing.fake_vllm_engine import FakeEngine, Outcome
from sluice.testing.fake_vllm_settings import FailMode, Knobs, resolve_knobs
from sluice.testing.fake_vllm_wire import (
    DONE,
    GenRequest,
    Kind,
    StreamEncoder,
    WireError,
    bad_request,
    completion_body,
    embedding_body,
    model_of,
    parse_embedding,
    parse_generation,
    parse_json,
    plan_tokens,
    split_words,
    token_texts,
)

SSE_CONTENT_TYPE = "text/event-stream; charset=utf-8"
FLUSH_POLLS = 500  # 1 ms apart: wait at most ~0.5 s for written chunks to leave before a drop


def error_response(err: WireError) -> web.Response:
    return web.Response(status=err.status, body=err.body(), content_type="application/json")


def injected_error(status: int) -> WireError:
    phrase = HTTPStatus(status).phrase.replace(" ", "").replace("-", "")
    err_type = phrase if phrase.endswith("Error") else phrase + "Error"
    return WireError(status, f"Injected failure: the fake vLLM answers {status}.", err_type)


async def cut_connection(request: web.BaseRequest, flush: bool) -> None:
    """Close the TCP connection without finishing the response (no terminating chunk, no [DONE])."""
    transport = request.transport
    if transport is None:
        return
    if flush:  # let the chunks already written reach the client first
        for _ in range(FLUSH_POLLS):
            if not transport.get_write_buffer_size():
                break
            await asyncio.sleep(0.001)
    transport.abort()


class InferenceHandlers:
    def __init__(self, engine: FakeEngine) -> None:
        self._engine = engine

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generation(request, "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generation(request, "completion")

    async def _intake(self, request: web.Request) -> tuple[object, Knobs]:
        """Count the request and read its body and knobs; raises WireError."""
        stats = self._engine.stats
        settings = self._engine.settings
        stats.requests_total += 1
        # Keys are istr; a repeated header's values are joined (as HTTP combines them), so duplicates show.
        headers = request.headers
        stats.last_request_headers = {str(k): ", ".join(headers.getall(k)) for k in headers}
        stats.last_request_body = None
        body = parse_json(await request.read())
        stats.last_request_body = body
        model = model_of(body, settings.model)
        stats.requests_by_model[model] = stats.requests_by_model.get(model, 0) + 1
        try:
            knobs = resolve_knobs(settings, request.headers)
        except ValueError as exc:
            raise bad_request(str(exc)) from None
        return body, knobs

    async def _inject(self, request: web.Request, knobs: Knobs) -> web.StreamResponse | None:
        """Failures decided before validation; None lets the request through."""
        fail, stats = knobs.fail, self._engine.stats
        if fail is not None:
            if fail.kind == "close":
                stats.failed += 1
                await cut_connection(request, flush=False)
                return web.Response()  # never sent: aiohttp finds the connection closed
            if fail.kind == "hang":
                try:
                    await asyncio.get_running_loop().create_future()
                except asyncio.CancelledError:
                    stats.aborted += 1
                    raise
            if fail.kind == "status":
                stats.failed += 1
                return error_response(injected_error(fail.status))
        if knobs.error_rate > 0 and self._engine.rng.random() < knobs.error_rate:
            stats.failed += 1
            return error_response(injected_error(500))
        return None

    async def _generation(self, request: web.Request, kind: Kind) -> web.StreamResponse:
        engine = self._engine
        settings = engine.settings
        try:
            body, knobs = await self._intake(request)
            injected = await self._inject(request, knobs)
            if injected is not None:
                return injected
            gen = parse_generation(kind, body, settings.model, settings.max_model_len, engine.loras.serves)
        except WireError as err:
            engine.stats.failed += 1
            return error_response(err)
        late = knobs.fail if knobs.fail is not None and knobs.fail.kind in ("drop", "sse_error") else None
        if gen.stream:
            return await self._stream(request, gen, knobs, late)
        return await self._complete(request, gen, knobs, late)

    async def _stream(
        self, request: web.Request, gen: GenRequest, knobs: Knobs, late: FailMode | None
    ) -> web.StreamResponse:
        engine = self._engine
        count, reason = plan_tokens(gen, knobs.tokens, knobs.tokens_forced, engine.settings.max_model_len)
        cut_at = late.after if late is not None else -1
        encoder = StreamEncoder(gen)
        seq = engine.new_sequence(gen.model, gen.prompt_words)
        response = web.StreamResponse(headers={"Content-Type": SSE_CONTENT_TYPE})
        outcome = Outcome.ABORTED
        try:
            await response.prepare(request)
            await engine.admit(seq)
            for index, text in enumerate(token_texts(gen.prompt_text, count)):
                if index == cut_at:
                    break
                await engine.token_due(seq, index, knobs)
                if index == 0 and gen.kind == "chat":
                    await response.write(encoder.role())
                await response.write(encoder.token(text))
            if late is not None:  # cut after `after` tokens, or before the final chunk if fewer
                outcome = Outcome.FAILED
                if late.kind == "drop":
                    await cut_connection(request, flush=True)
                    return response
                await response.write(encoder.error("Injected failure: the fake vLLM failed mid-stream."))
                await response.write(DONE)
                await response.write_eof()
                return response
            await response.write(encoder.finish(reason))
            if gen.include_usage:
                await response.write(encoder.usage(gen.prompt_tokens, count))
            await response.write(DONE)
            await response.write_eof()
            outcome = Outcome.COMPLETED
        except ConnectionError:
            pass  # the client went away while we were writing
        finally:
            engine.finish(seq, outcome, reason)
        return response

    async def _complete(
        self, request: web.Request, gen: GenRequest, knobs: Knobs, late: FailMode | None
    ) -> web.StreamResponse:
        engine = self._engine
        count, reason = plan_tokens(gen, knobs.tokens, knobs.tokens_forced, engine.settings.max_model_len)
        stop_at = min(late.after, count) if late is not None else count
        seq = engine.new_sequence(gen.model, gen.prompt_words)
        response: web.StreamResponse = web.Response()
        outcome = Outcome.ABORTED
        try:
            await engine.admit(seq)
            for index in range(stop_at):
                await engine.token_due(seq, index, knobs)
            if late is not None:
                outcome = Outcome.FAILED
            response = await _answer_whole(
                request, late, lambda: completion_body(gen, "".join(token_texts(gen.prompt_text, count)), reason, count)
            )
            if late is None:
                outcome = Outcome.COMPLETED
        except ConnectionError:
            pass
        finally:
            engine.finish(seq, outcome, reason)
        return response

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        engine = self._engine
        settings = engine.settings
        try:
            body, knobs = await self._intake(request)
            injected = await self._inject(request, knobs)
            if injected is not None:
                return injected
            req = parse_embedding(body, settings.model, engine.loras.serves)
        except WireError as err:
            engine.stats.failed += 1
            return error_response(err)
        late = knobs.fail if knobs.fail is not None and knobs.fail.kind in ("drop", "sse_error") else None
        seq = engine.new_sequence(req.model, split_words(" ".join(req.inputs)))
        response: web.StreamResponse = web.Response()
        outcome = Outcome.ABORTED
        try:
            await engine.admit(seq)
            await engine.prefill(seq, knobs)
            if late is not None:
                outcome = Outcome.FAILED
            response = await _answer_whole(request, late, lambda: embedding_body(req, settings.embedding_dim))
            if late is None:
                outcome = Outcome.COMPLETED
        except ConnectionError:
            pass
        finally:
            engine.finish(seq, outcome, "stop")
        return response


async def _answer_whole(
    request: web.Request, late: FailMode | None, body: Callable[[], bytes]
) -> web.StreamResponse:
    """Send a non-streamed answer: the injected late failure (a cut connection or a 500), else `body()`."""
    if late is not None and late.kind == "drop":
        await cut_connection(request, flush=False)
        return web.Response()
    if late is not None:
        response = error_response(injected_error(500))
    else:
        response = web.Response(body=body(), content_type="application/json")
    await response.prepare(request)
    await response.write_eof()
    return response
