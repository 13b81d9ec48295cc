"""Checks the fields of an OpenAI request body that the gateway relies on or that clients get wrong.

Hand-written rather than a pydantic model on purpose: it runs on every request and checks only the
handful of fields the gateway reads (model, stream, the prompt) plus common type mistakes, in about a
microsecond; everything else is passed through untouched for vLLM to judge.
"""

from __future__ import annotations

from typing import Any

from sluice.errors import InvalidRequest


def _bad(param: str, message: str) -> InvalidRequest:
    return InvalidRequest(message, param=param)


NUMBERS = ("temperature", "top_p", "presence_penalty", "frequency_penalty")
POSITIVE_INTEGERS = ("max_tokens", "max_completion_tokens", "n")
PROMPT_ITEMS = (str, int, list)  # strings, token ids, arrays of token ids


def _common(body: dict[str, Any]) -> None:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "'model' is required and must be a non-empty string (see GET /v1/models).")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad("stream", "'stream' must be true or false.")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise _bad("stream_options", "'stream_options' must be an object.")
        if not isinstance(options.get("include_usage", False), bool):
            raise _bad("stream_options", "'stream_options.include_usage' must be true or false.")
    get = body.get
    for name in NUMBERS:
        value = get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise _bad(name, f"'{name}' must be a number, got {type(value).__name__}.")
    for name in POSITIVE_INTEGERS:
        value = get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise _bad(name, f"'{name}' must be a positive integer.")


def check_chat(body: dict[str, Any]) -> None:
    _common(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "'messages' is required and must be a non-empty array of message objects.")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _bad("messages", f"'messages[{i}]' must be an object with a string 'role'.")
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise _bad("messages", f"'messages[{i}].content' must be a string or an array of content parts.")


def check_completion(body: dict[str, Any]) -> None:
    _common(body)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return
    if isinstance(prompt, list) and prompt and all(type(p) in PROMPT_ITEMS for p in prompt):  # not bools
        return
    raise _bad("prompt", "'prompt' is required and must be a string or an array of strings or token ids.")


def check_embedding(body: dict[str, Any]) -> None:
    _common(body)
    value = body.get("input")
    if isinstance(value, str) or (isinstance(value, list) and value):
        return
    raise _bad("input", "'input' is required and must be a string or a non-empty array.")


CHECKS = {"chat": check_chat, "completions": check_completion, "embeddings": check_embedding}
