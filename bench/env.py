"""The bench machine: required tools, CPU pinning plan and a description for the reports."""

from __future__ import annotations

import datetime as dt
import importlib.util
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

INSTALL_HINTS = {
    "wrk": "wrk not found: apt-get install -y wrk",
    "nginx": "nginx not found: apt-get install -y nginx-light",
    "taskset": "taskset not found: apt-get install -y util-linux",
}


class BenchError(Exception):
    """A failure the harness reports as one clear line instead of a traceback."""


@dataclass(frozen=True, slots=True)
class Tools:
    """Absolute paths of the external programs the suite drives."""

    wrk: str
    nginx: str
    taskset: str


@dataclass(frozen=True, slots=True)
class CpuPlan:
    """Which CPU runs the proxy under test and which runs everything else."""

    proxy: int
    rest: int

    @property
    def shared(self) -> bool:
        return self.proxy == self.rest

    def describe(self) -> str:
        if self.shared:
            return f"only one CPU available: everything on CPU {self.proxy} (numbers are not comparable)"
        return f"proxy under test on CPU {self.proxy}; upstream and load generator on CPU {self.rest}"


@dataclass(frozen=True, slots=True)
class Machine:
    """What the numbers were measured on."""

    cpu_model: str
    cores: int
    kernel: str
    python: str
    date: str

    def describe(self) -> str:
        return f"{self.cpu_model}, {self.cores} cores, Linux {self.kernel}, Python {self.python}, {self.date}"


def find_tools() -> Tools:
    """Locate wrk, nginx and taskset or fail naming the first one missing."""
    found: dict[str, str] = {}
    for name, hint in INSTALL_HINTS.items():
        path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)
        if path is None:
            raise BenchError(hint)
        found[name] = path
    return Tools(**found)


def require_modules(*names: str) -> None:
    """Fail naming the first Python module that is not importable."""
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise BenchError(f"Python module {name!r} not found: pip install -r bench/requirements.txt")


def missing_modules(*names: str) -> list[str]:
    """The modules among ``names`` that are not importable."""
    return [name for name in names if importlib.util.find_spec(name) is None]


def cpu_plan() -> CpuPlan:
    """Proxy on the first allowed CPU, everything else on the second (or the same if only one)."""
    cpus = sorted(os.sched_getaffinity(0))
    return CpuPlan(proxy=cpus[0], rest=cpus[1] if len(cpus) > 1 else cpus[0])


def machine() -> Machine:
    """Describe this machine from /proc/cpuinfo and the platform module."""
    model = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return Machine(
        cpu_model=model,
        cores=os.cpu_count() or 1,
        kernel=platform.release(),
        python=platform.python_version(),
        date=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    )
