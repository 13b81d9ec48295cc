"""`engine.json`: what `sluice engine prepare` produced, and where `sluice engine start` finds it.

The file lives in the data directory (default `data/engine/engine.json`) and records absolute paths, so
the engine can be started from any working directory.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sluice.engine.errors import EngineError

INFO_FILE = "engine.json"
FORMAT = 1


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """A prepared engine: the interpreter to run vLLM with, the model folder and the LoRA adapters."""

    python: Path
    venv: Path
    model_dir: Path
    served_model_name: str
    gguf_sha256: str
    adapters: dict[str, Path] = field(default_factory=dict)
    max_lora_rank: int = 8
    versions: dict[str, str] = field(default_factory=dict)
    prepared_at: str = ""

    def to_json(self) -> str:
        data = asdict(self)
        data["format"] = FORMAT
        for key in ("python", "venv", "model_dir"):
            data[key] = str(data[key])
        data["adapters"] = {name: str(path) for name, path in self.adapters.items()}
        return json.dumps(data, indent=2) + "\n"


def info_path(data_dir: Path) -> Path:
    return data_dir / INFO_FILE


def save_engine_info(data_dir: Path, info: EngineInfo) -> Path:
    """Write `engine.json` atomically (a reader never sees half a file)."""
    path = info_path(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(info.to_json())
    temporary.replace(path)
    return path


def load_engine_info(data_dir: Path) -> EngineInfo | None:
    """The prepared engine in `data_dir`, or None when `sluice engine prepare` has not been run there."""
    path = info_path(data_dir)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise EngineError(f"cannot read {path}: {exc}; re-run `sluice engine prepare`") from exc
    try:
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
        return EngineInfo(
            python=Path(data["python"]),
            venv=Path(data["venv"]),
            model_dir=Path(data["model_dir"]),
            served_model_name=str(data["served_model_name"]),
            gguf_sha256=str(data["gguf_sha256"]),
            adapters={str(name): Path(folder) for name, folder in data["adapters"].items()},
            max_lora_rank=int(data["max_lora_rank"]),
            versions={str(key): str(value) for key, value in data["versions"].items()},
            prepared_at=str(data["prepared_at"]),
        )
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise EngineError(f"{path} is not a valid engine description ({exc}); re-run `sluice engine prepare`") from exc


def missing_files(info: EngineInfo) -> list[Path]:
    """What `info` names that is no longer on disk (a moved or deleted venv, model or adapter)."""
    wanted = [
        info.python,
        info.model_dir / "config.json",
        *(folder / "adapter_config.json" for folder in info.adapters.values()),
    ]
    return [path for path in wanted if not path.exists()]
