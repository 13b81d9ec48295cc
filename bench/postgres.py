"""A throwaway PostgreSQL server for the audit part, pinned with the upstream and load generator.

The machine's PostgreSQL could run on the gateway's core and take its CPU, which would be charged to the
audit log; in production the database has a host of its own. So the lab starts its own server in a
temporary folder (`initdb`, then `postgres` in the foreground), pinned to the other core. PostgreSQL
refuses to run as root: as root, both run as the `postgres` user through `runuser`.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from bench.env import BenchError
from bench.procs import LOCALHOST, Service, free_port, start, wait_tcp


def postgres_binary(name: str) -> str:
    """A PostgreSQL server program (initdb, pg_ctl, postgres): on PATH or in Debian's versioned folder."""
    found = shutil.which(name)
    if found:
        return found
    for folder in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (folder / name).exists():
            return str(folder / name)
    raise BenchError(f"{name} is not installed (apt-get install -y postgresql)")


def start_postgres(workdir: Path, *, taskset: str, cpu: int) -> tuple[str, Service, Path]:
    """A new, empty server: its URL (database `postgres`, trust auth), its service and its data folder (a
    folder of its own under the temporary directory: the `postgres` user cannot enter the lab's)."""
    folder = Path(tempfile.mkdtemp(prefix="sluice-bench-pg-"))
    runner: list[str] = []
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError as exc:
            raise BenchError("running as root needs a `postgres` user to run PostgreSQL as") from exc
        os.chown(folder, owner.pw_uid, owner.pw_gid)
        runner = ["runuser", "-u", "postgres", "--"]
    data = folder / "data"
    done = subprocess.run(
        [*runner, postgres_binary("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"initdb failed: {done.stderr.strip() or done.stdout.strip()}")
    port = free_port()
    argv = [*runner, postgres_binary("postgres"), "-D", str(data), "-p", str(port), "-k", str(folder),
            "-c", f"listen_addresses={LOCALHOST}"]  # fmt: skip
    service = start(f"postgres-{port}", argv, cpu=cpu, taskset=taskset, logdir=workdir)
    wait_tcp(service, port)
    return f"postgresql://postgres@{LOCALHOST}:{port}/postgres", service, folder
