"""Reads the JSON body of an admin request into a pydantic model; errors are 400s that name the field."""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError

from sluice.errors import InvalidJSON, InvalidRequest

Model = TypeVar("Model", bound=BaseModel)


def parse_body(raw: bytes, model: type[Model]) -> Model:
    try:
        body: Any = orjson.loads(raw or b"null")
    except orjson.JSONDecodeError as exc:
        raise InvalidJSON(f"The request body is not valid JSON: {exc}.") from None
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise InvalidRequest(f"{where}: {first['msg']}", param=where) from None
