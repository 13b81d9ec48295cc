"""Reads the YAML configuration: `${ENV}` substitution, strict validation, errors naming key and line.

`${NAME}` is replaced by the environment variable NAME (an error if unset), `${NAME:-default}` falls
back to the default. Substitution happens on parsed string values, so a variable can never change the
structure of the file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from sluice.config import ENV_REFERENCE, SluiceConfig

Location = tuple[str | int, ...]


class ConfigError(Exception):
    """The configuration is invalid; the message names the file, key and line of each problem."""


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> SluiceConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration file: {exc.strerror}") from None
    return parse_config(text, source=str(path), env=os.environ if env is None else env)


def parse_config(text: str, source: str = "<config>", env: Mapping[str, str] | None = None) -> SluiceConfig:
    env = os.environ if env is None else env
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    if node is None:
        raise ConfigError(f"{source}: the file is empty; see examples/sluice.yaml for a complete example")
    lines: dict[Location, int] = {}
    _index_lines(node, (), lines)
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections (server, backends, ...)")
    problems: list[str] = []
    data = _substitute(data, (), env, problems, lines, source)
    if problems:
        raise ConfigError("\n".join(problems))
    try:
        return SluiceConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, lines, source)) from None


def _index_lines(node: yaml.Node, loc: Location, lines: dict[Location, int]) -> None:
    lines[loc] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            lines[(*loc, key)] = key_node.start_mark.line + 1
            _index_lines(value_node, (*loc, key), lines)
            lines[(*loc, key)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index_lines(item, (*loc, i), lines)


def _substitute(
    value: Any, loc: Location, env: Mapping[str, str], problems: list[str], lines: dict[Location, int], source: str
) -> Any:
    if isinstance(value, dict):
        return {k: _substitute(v, (*loc, k), env, problems, lines, source) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, (*loc, i), env, problems, lines, source) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def replace(match: Any) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return str(default)
        problems.append(
            f"{_where(loc, lines, source)}: environment variable {name} is not set "
            f"(export it, or write ${{{name}:-default}})"
        )
        return ""

    return ENV_REFERENCE.sub(replace, value)


def _where(loc: Location, lines: dict[Location, int], source: str) -> str:
    key = _dotted(loc)
    probe = loc
    while probe and probe not in lines:
        probe = probe[:-1]
    line = lines.get(probe)
    return f"{source}:{line}: {key}" if line else f"{source}: {key}"


def _dotted(loc: Location) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _describe(exc: ValidationError, lines: dict[Location, int], source: str) -> str:
    messages = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        if error["type"] == "extra_forbidden":
            text = "unknown key (check its spelling against docs/configuration.md)"
        elif error["type"] == "missing":
            text = "required key is missing"
        else:
            text = error["msg"].removeprefix("Value error, ")
        messages.append(f"{_where(loc, lines, source)}: {text}")
    return "\n".join(messages)
