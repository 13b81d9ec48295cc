"""Memory and file descriptors of the gateway over time: the supervisor and every worker, every few seconds.

Each sample reads `/proc/<pid>/status` (VmRSS) and counts `/proc/<pid>/fd` for the supervisor and its
descendants (the workers, found afresh each time so a restarted worker is followed). `window` sums the
processes at each instant and summarises one stretch of the run (a minute, in the full soak).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import descendants


@dataclass(frozen=True, slots=True)
class Sample:
    at_s: float  # since the load started
    pid: int
    role: str  # supervisor | worker
    rss_kib: int
    fds: int


@dataclass(frozen=True, slots=True)
class Window:
    """One stretch of the run: the gateway's total RSS (all processes) and open descriptors (all processes)."""

    label: str
    start_s: float
    end_s: float
    instants: int
    rss_mib_mean: float
    rss_mib_max: float
    fds_mean: float
    fds_max: int
    workers: int  # distinct worker pids seen (more than configured: a worker died and was replaced)
    kinds_max: dict[str, int]  # the largest count of each kind of descriptor (fd_kinds) in the window


def rss_kib(pid: int) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time the processes have used so far (those still alive)."""
    ticks = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of proc(5)
    return ticks / os.sysconf("SC_CLK_TCK")


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) CPU time of the whole machine so far, from the first line of /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values) - idle, sum(values)


def _tcp_peers() -> dict[str, tuple[int, int]]:
    """Socket inode -> (local port, remote port) of every TCP socket, from /proc/net/tcp and tcp6."""
    peers: dict[str, tuple[int, int]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            peers[inode] = (int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16))
    return peers


def fd_kinds(pids: list[int], listen_port: int, peers_by_port: dict[int, str]) -> Counter[str]:
    """What the processes' descriptors are: `clients` (accepted on `listen_port`), a peer's name from
    `peers_by_port` (connections to that port), `listener`, `other tcp`, `unix socket`, `pipe`, `file`, `anon`
    (epoll, eventfd, signalfd…)."""
    tcp = _tcp_peers()
    kinds: Counter[str] = Counter()
    for pid in pids:
        try:
            names = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for name in names:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{name}")
            except OSError:
                continue
            if target.startswith("socket:["):
                ports = tcp.get(target[8:-1])
                if ports is None:
                    kinds["unix socket"] += 1
                elif ports[1] == 0:
                    kinds["listener"] += 1
                elif ports[0] == listen_port:
                    kinds["clients"] += 1
                else:
                    kinds[peers_by_port.get(ports[1], "other tcp")] += 1
            elif target.startswith("pipe:"):
                kinds["pipe"] += 1
            elif target.startswith("anon_inode:"):
                kinds["anon"] += 1
            else:
                kinds["file"] += 1
    return kinds


@dataclass(slots=True)
class ProcessSampler:
    root_pid: int
    started: float  # time.monotonic() when the load started
    interval_s: float = 2.0
    listen_port: int = 0  # the gateway's: descriptors accepted on it are clients
    peers_by_port: dict[int, str] = field(default_factory=dict)  # names for connections to these ports
    samples: list[Sample] = field(default_factory=list)
    kinds: list[tuple[float, Counter[str]]] = field(default_factory=list)  # fd_kinds at each instant

    def pids(self) -> list[int]:
        return [self.root_pid, *descendants(self.root_pid)]

    def sample_once(self) -> None:
        at = time.monotonic() - self.started
        pids = self.pids()
        for pid in pids:
            rss, fds = rss_kib(pid), open_fds(pid)
            if rss is not None and fds is not None:
                self.samples.append(Sample(at, pid, "supervisor" if pid == self.root_pid else "worker", rss, fds))
        self.kinds.append((at, fd_kinds(pids, self.listen_port, self.peers_by_port)))

    async def run(self, stop: asyncio.Event) -> None:
        """Sample every `interval_s` until `stop` is set (one last sample then)."""
        while not stop.is_set():
            await asyncio.to_thread(self.sample_once)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)
        await asyncio.to_thread(self.sample_once)

    def window(self, label: str, start_s: float, end_s: float) -> Window | None:
        """The samples taken in [start_s, end_s), summed over processes at each instant; None when empty."""
        by_instant: dict[float, list[Sample]] = defaultdict(list)
        workers: set[int] = set()
        for sample in self.samples:
            if start_s <= sample.at_s < end_s:
                by_instant[sample.at_s].append(sample)
                if sample.role == "worker":
                    workers.add(sample.pid)
        if not by_instant:
            return None
        kinds_max: Counter[str] = Counter()
        for at, kinds in self.kinds:
            if start_s <= at < end_s:
                kinds_max |= kinds  # Counter union: the maximum of each count
        rss = [sum(s.rss_kib for s in group) / 1024 for group in by_instant.values()]
        fds = [sum(s.fds for s in group) for group in by_instant.values()]
        return Window(
            label=label,
            start_s=start_s,
            end_s=end_s,
            instants=len(by_instant),
            rss_mib_mean=sum(rss) / len(rss),
            rss_mib_max=max(rss),
            fds_mean=sum(fds) / len(fds),
            fds_max=max(fds),
            workers=len(workers),
            kinds_max=dict(sorted(kinds_max.items())),
        )
