"""Every configuration key is documented in docs/configuration.md and shown in examples/sluice.yaml."""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from sluice.config import SluiceConfig

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = (ROOT / "docs" / "configuration.md").read_text()
EXAMPLE = (ROOT / "examples" / "sluice.yaml").read_text()


def sections(annotation: Any) -> Iterator[type[BaseModel]]:
    """The configuration models inside a field's type (through Optional, tuples, dicts, unions)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for argument in typing.get_args(annotation):
        yield from sections(argument)
    if isinstance(annotation, types.UnionType):
        for argument in annotation.__args__:
            yield from sections(argument)


def keys(model: type[BaseModel], path: str = "") -> Iterator[tuple[str, str]]:
    """(dotted path, key) for every key of `model` and of the sections below it."""
    for name, field in model.model_fields.items():
        dotted = f"{path}.{name}" if path else name
        yield dotted, name
        for section in sections(field.annotation):
            yield from keys(section, dotted)


def test_every_key_is_in_the_reference() -> None:
    missing = [path for path, name in keys(SluiceConfig) if not re.search(rf"`[^`\n]*\b{name}\b[^`\n]*`", REFERENCE)]
    assert not missing, f"docs/configuration.md does not mention: {missing}"


def test_every_key_is_in_the_example() -> None:
    missing = [path for path, name in keys(SluiceConfig) if not re.search(rf"^\s*#?\s*(- )?{name}:", EXAMPLE, re.M)]
    assert not missing, f"examples/sluice.yaml does not show: {missing}"
