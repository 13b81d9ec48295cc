"""What the fake vLLM reads and writes on the wire: request validation and response bodies.

Validation follows vLLM's order: the body must parse and match the schema (400 `BadRequestError`), then
the model must be served (404 `NotFoundError`), then the prompt must fit the context window (400).
Response bodies carry vLLM's extra fields (`stop_reason`, `prompt_logprobs`, `kv_transfer_params`, ...).
Stream chunks are assembled from a per-request byte prefix, because they are the hot path.
"""

from __future__ import annotations

import base64
import math
import os
import random
import re
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import orjson

Kind = Literal["chat", "completion"]

# fmt: off
WORDS = (
    "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "while", "seven", "silver",
    "rivers", "carry", "bright", "stones", "toward", "an", "ancient", "quiet", "harbor", "where",
    "patient", "sailors", "mend", "their", "nets", "and", "sing", "about", "distant", "green",
    "islands", "under", "evening", "stars", "so", "every", "lantern", "glows", "warm", "against",
    "cold", "northern", "wind", "tonight",
)
# fmt: on
DONE = b"data: [DONE]\n\n"
TEXT_WORDS = re.compile(r"\w+")


class WireError(Exception):
    """A request vLLM would refuse, rendered as `{"error": {...}}` with `status`."""

    def __init__(self, status: int, message: str, err_type: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type
        self.param = param

    def body(self) -> bytes:
        return error_body(self.status, self.message, self.err_type, self.param)


def error_body(status: int, message: str, err_type: str, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": err_type, "param": param, "code": status}})


def bad_request(message: str, param: str | None = None) -> WireError:
    return WireError(400, message, "BadRequestError", param)


def missing(field: str, schema: str) -> WireError:
    return bad_request(f"1 validation error for {schema}\n{field}\n  Field required", field)


def parse_json(raw: bytes) -> object:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"JSON decode error: {exc}") from None


def random_id(prefix: str) -> str:
    return prefix + os.urandom(16).hex()


def split_words(text: str) -> list[str]:
    return text.split()


@dataclass(frozen=True, slots=True)
class GenRequest:
    """A validated chat or text completion request."""

    kind: Kind
    model: str
    stream: bool
    include_usage: bool
    max_tokens: int | None
    prompt_text: str
    prompt_words: list[str]

    @property
    def prompt_tokens(self) -> int:
        return max(1, len(self.prompt_words))


def _opt_int(body: dict[str, Any], key: str, minimum: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"{key}: Input should be a valid integer", key)
    if value < minimum:
        raise bad_request(f"{key} must be at least {minimum}, got {value}.", key)
    return value


def _message_text(message: object) -> str:
    if not isinstance(message, dict):
        raise bad_request("messages: each message must be an object", "messages")
    content = message.get("content")
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    raise bad_request("messages: content must be a string or a list of parts", "messages")


def _prompt_text(prompt: object) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return " ".join(prompt)
        if all(isinstance(p, int) for p in prompt):
            return " ".join(map(str, prompt))  # token ids: one word per token
        if all(isinstance(p, list) and all(isinstance(t, int) for t in p) for p in prompt):
            return " ".join(" ".join(map(str, p)) for p in prompt)
    raise bad_request("prompt: Input should be a string, a list of strings or a list of token ids", "prompt")


def model_of(body: object, default: str) -> str:
    """The `model` a body asks for; vLLM treats an absent model as its first served model."""
    model = body.get("model") if isinstance(body, dict) else None
    return model if isinstance(model, str) else default


def parse_generation(
    kind: Kind, body: object, base_model: str, max_model_len: int, serves: Callable[[str], bool]
) -> GenRequest:
    """Validate a chat/completions body like vLLM; raise WireError."""
    schema = "ChatCompletionRequest" if kind == "chat" else "CompletionRequest"
    if not isinstance(body, dict):
        raise bad_request(f"1 validation error for {schema}\n  Input should be a valid dictionary")
    if kind == "chat":
        messages = body.get("messages")
        if messages is None:
            raise missing("messages", schema)
        if not isinstance(messages, list):
            raise bad_request("messages: Input should be a valid list", "messages")
        text = "\n".join(_message_text(m) for m in messages)
    else:
        if "prompt" not in body:
            raise missing("prompt", schema)
        text = _prompt_text(body["prompt"])
    model = body.get("model", base_model)
    if model is not None and not isinstance(model, str):
        raise bad_request("model: Input should be a valid string", "model")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("stream: Input should be a valid boolean", "stream")
    options = body.get("stream_options")
    if options is not None and not stream:
        raise bad_request("Stream options can only be defined when `stream=True`.", "stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    max_tokens = _opt_int(body, "max_tokens", 1)
    if kind == "chat":
        max_tokens = _opt_int(body, "max_completion_tokens", 1) or max_tokens
    model = model or base_model
    if not serves(model):
        raise WireError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
    words = split_words(text)
    prompt_tokens = max(1, len(words))
    if prompt_tokens >= max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, your request has "
            f"{prompt_tokens} input tokens. Please reduce the length of the input messages."
        )
    if max_tokens is not None and prompt_tokens + max_tokens > max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the "
            "completion). Please reduce the length of the messages or completion.",
            "max_tokens",
        )
    return GenRequest(kind, model, stream, include_usage, max_tokens, text, words)


def plan_tokens(gen: GenRequest, default: int, forced: bool, max_model_len: int) -> tuple[int, str]:
    """How many tokens to generate and the finish reason.

    Without `X-Fake-Tokens`, `max_tokens` is generated when given (finish `length`), else the server
    default (finish `stop`). With it, exactly that many, still capped by `max_tokens`.
    """
    room = max_model_len - gen.prompt_tokens
    want = default if forced or gen.max_tokens is None else gen.max_tokens
    cap = min(room, gen.max_tokens) if gen.max_tokens is not None else room
    count = min(want, cap)
    return count, ("length" if count >= cap else "stop")


def token_texts(seed_text: str, count: int) -> list[str]:
    """Deterministic tokens, each a word followed by a space, seeded by the prompt."""
    seed = zlib.crc32(seed_text.encode())
    size = len(WORDS)
    return [WORDS[(seed + i * 7919) % size] + " " for i in range(count)]


def usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
        "prompt_tokens_details": None,
    }


def completion_body(gen: GenRequest, text: str, finish: str, completion_tokens: int) -> bytes:
    common: dict[str, Any] = {"index": 0}
    if gen.kind == "chat":
        rid, obj = random_id("chatcmpl-"), "chat.completion"
        common["message"] = {
            "role": "assistant",
            "content": text,
            "refusal": None,
            "annotations": None,
            "audio": None,
            "function_call": None,
            "tool_calls": [],
            "reasoning_content": None,
        }
        common.update(logprobs=None, finish_reason=finish, stop_reason=None)
    else:
        rid, obj = random_id("cmpl-"), "text_completion"
        common.update(text=text, logprobs=None, finish_reason=finish, stop_reason=None, prompt_logprobs=None)
    body: dict[str, Any] = {
        "id": rid,
        "object": obj,
        "created": int(time.time()),
        "model": gen.model,
        "choices": [common],
        "service_tier": None,
        "system_fingerprint": None,
        "usage": usage(gen.prompt_tokens, completion_tokens),
    }
    if gen.kind == "chat":
        body["prompt_logprobs"] = None
    body["kv_transfer_params"] = None
    return orjson.dumps(body)


class StreamEncoder:
    """Builds one request's SSE events, each a complete `data: {...}\\n\\n`."""

    def __init__(self, gen: GenRequest) -> None:
        self._chat = gen.kind == "chat"
        rid = random_id("chatcmpl-" if self._chat else "cmpl-")
        obj = "chat.completion.chunk" if self._chat else "text_completion"
        self._prefix = (
            b'data: {"id":"'
            + rid.encode()
            + b'","object":"'
            + obj.encode()
            + b'","created":'
            + str(int(time.time())).encode()
            + b',"model":'
            + orjson.dumps(gen.model)
            + b',"choices":'
        )

    def role(self) -> bytes:
        return self._prefix + (
            b'[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}\n\n'
        )

    def token(self, text: str) -> bytes:
        if self._chat:
            return (
                self._prefix
                + b'[{"index":0,"delta":{"content":'
                + orjson.dumps(text)
                + b'},"logprobs":null,"finish_reason":null}]}\n\n'
            )
        return (
            self._prefix
            + b'[{"index":0,"text":'
            + orjson.dumps(text)
            + b',"logprobs":null,"finish_reason":null,"stop_reason":null}]}\n\n'
        )

    def finish(self, reason: str) -> bytes:
        reason_json = orjson.dumps(reason)
        if self._chat:
            return (
                self._prefix
                + b'[{"index":0,"delta":{"content":""},"logprobs":null,"finish_reason":'
                + reason_json
                + b',"stop_reason":null}]}\n\n'
            )
        return (
            self._prefix
            + b'[{"index":0,"text":"","logprobs":null,"finish_reason":'
            + reason_json
            + b',"stop_reason":null}]}\n\n'
        )

    def usage(self, prompt: int, completion: int) -> bytes:
        return self._prefix + b'[],"usage":' + orjson.dumps(usage(prompt, completion)) + b"}\n\n"

    @staticmethod
    def error(message: str) -> bytes:
        return b"data: " + error_body(500, message, "InternalServerError") + b"\n\n"


@dataclass(frozen=True, slots=True)
class EmbedRequest:
    model: str
    inputs: list[str]
    base64: bool
    dimensions: int | None

    @property
    def prompt_tokens(self) -> int:
        return sum(max(1, len(text.split())) for text in self.inputs)


def parse_embedding(body: object, base_model: str, serves: Callable[[str], bool]) -> EmbedRequest:
    if not isinstance(body, dict):
        raise bad_request("1 validation error for EmbeddingRequest\n  Input should be a valid dictionary")
    if "input" not in body:
        raise missing("input", "EmbeddingRequest")
    raw = body["input"]
    if isinstance(raw, str):
        inputs = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(x, str) for x in raw):
        inputs = list(raw)
    elif isinstance(raw, list) and raw and all(isinstance(x, int) for x in raw):
        inputs = [" ".join(map(str, raw))]
    elif isinstance(raw, list) and raw and all(isinstance(x, list) for x in raw):
        inputs = [_prompt_text(x) for x in raw]
    else:
        raise bad_request("input: Input should be a string, a list of strings or token ids", "input")
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise bad_request("encoding_format: Input should be 'float' or 'base64'", "encoding_format")
    dimensions = _opt_int(body, "dimensions", 1)
    model = body.get("model") or base_model
    if not isinstance(model, str):
        raise bad_request("model: Input should be a valid string", "model")
    if not serves(model):
        raise WireError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
    return EmbedRequest(model, inputs, fmt == "base64", dimensions)


def embedding_vector(text: str, dim: int) -> list[float]:
    """A deterministic unit vector for `text` (same words, same vector, in every process).

    Like an uncased embedding model (all-MiniLM-L6-v2 is one), case and punctuation do not change the
    vector: "What is X?" and "what is x" embed alike, any other change gives an unrelated vector.
    """
    words = " ".join(TEXT_WORDS.findall(text.lower()))
    rng = random.Random(zlib.crc32(words.encode()) ^ (dim << 32))
    values = [rng.gauss(0.0, 1.0) for _ in range(dim)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def embedding_body(req: EmbedRequest, default_dim: int) -> bytes:
    dim = req.dimensions or default_dim
    data: list[dict[str, Any]] = []
    for index, text in enumerate(req.inputs):
        vector = embedding_vector(text, dim)
        encoded: Any = base64.b64encode(struct.pack(f"<{dim}f", *vector)).decode() if req.base64 else vector
        data.append({"index": index, "object": "embedding", "embedding": encoded})
    return orjson.dumps(
        {
            "id": random_id("embd-"),
            "object": "list",
            "created": int(time.time()),
            "model": req.model,
            "data": data,
            "usage": usage(req.prompt_tokens, 0),
        }
    )
