"""Process sampling for the soak (``loadtest/soak.py``): one ``Sample`` a second, read from /proc.

A sample sums VmRSS, open fds and threads over the gateway's process tree (the gateway and any children it
has), and records the fake engine's RSS, the CPU seconds of the gateway, the engine, the client and the
machine, and the client's progress file as last written.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest.overhead import Popen


@dataclass(frozen=True)
class Sample:
    stage: str  # "idle-before" (no client yet), "run" (the client process is up) or "idle-after"
    at: float  # wall clock (epoch seconds)
    gateway_rss_mb: float  # the gateway and its children, summed
    gateway_fds: int
    gateway_threads: int
    gateway_procs: int
    engine_rss_mb: float
    cpu: dict[str, float]  # CPU seconds so far: gateway, engine, client, machine
    client: dict[str, Any]  # the client's progress file as last written


def _children(pid: int) -> list[int]:
    """``pid`` and all its descendants, from the parent fields of /proc/*/stat."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, frontier = [pid], [pid]
    while frontier:
        frontier = [c for c, p in parents.items() if p in frontier]
        tree += frontier
    return tree


def _status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "Threads"):
            out[key] = int(value.split()[0])
    return out


def _cpu_s(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")


def _machine_cpu_s() -> float:
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def sample(stage: str, gateway: Popen, engine: Popen, client: Popen | None, progress: Path) -> Sample:
    rss_kb = threads = fds = procs = 0
    for pid in _children(gateway.pid):
        try:
            status = _status(pid)
            fds += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            continue  # it exited between the listing and the read
        rss_kb, threads, procs = rss_kb + status.get("VmRSS", 0), threads + status.get("Threads", 0), procs + 1
    cpu = {"gateway": _cpu_s(gateway.pid), "engine": _cpu_s(engine.pid), "machine": _machine_cpu_s()}
    if client is not None and client.poll() is None:
        cpu["client"] = _cpu_s(client.pid)
    try:
        state = json.loads(progress.read_text())
    except (OSError, ValueError):
        state = {}
    engine_rss = _status(engine.pid).get("VmRSS", 0) * 1024 / 1e6
    return Sample(stage, time.time(), rss_kb * 1024 / 1e6, fds, threads, procs, engine_rss, cpu, state)
