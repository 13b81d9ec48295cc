"""One real vLLM engine for the whole test session, started as early as possible.

The engine takes about a minute to boot, so `tests/conftest.py` starts it when collection finishes (if
any e2e test was selected) and the other tests run meanwhile; e2e tests, which the same conftest moves
to the end of the run, wait for it through the `real_engine` fixture. It runs on CPU 1 with
`--max-num-seqs 4`, both demonstration adapters loaded.

`SLUICE_REQUIRE_ENGINE=1` (set by `make test`) turns "the engine is not prepared" from a skip into a
failure, so CI can never pass without having run the real engine.
"""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from sluice.engine.info import load_engine_info
from sluice.engine.launch import engine_url, start_engine, stop_engine, wait_healthy

ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = Path(os.environ.get("SLUICE_ENGINE_DATA", ROOT / "data" / "engine"))
BOOT_TIMEOUT = 420.0


@dataclass
class EngineSession:
    url: str = ""
    process: subprocess.Popen[bytes] | None = None
    problem: str = ""
    log: Path | None = None
    ready: bool = False

    def start(self) -> None:
        info = load_engine_info(DATA_DIR)
        if info is None:
            self.problem = f"the engine is not prepared in {DATA_DIR}: run `sluice engine prepare` (or `make test`)"
            return
        port = _free_port()
        self.log = DATA_DIR / "logs" / f"test-engine-{port}.log"
        cpus = "1" if (os.cpu_count() or 1) > 1 else None
        self.process = start_engine(info, port, max_num_seqs=4, cpus=cpus, lora=True, log_path=self.log)
        self.url = engine_url(port)

    def wait(self) -> str:
        if self.problem:
            raise RuntimeError(self.problem)
        if not self.ready:
            try:
                wait_healthy(self.url, BOOT_TIMEOUT, process=self.process)
            except Exception as exc:
                tail = self.log.read_text(errors="replace")[-3000:] if self.log and self.log.exists() else ""
                raise RuntimeError(f"{exc}\n--- engine log tail ---\n{tail}") from exc
            self.ready = True
        return self.url

    def stop(self) -> None:
        if self.process is not None:
            stop_engine(self.process)
            self.process = None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
