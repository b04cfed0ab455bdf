"""CPU time of process trees and of the whole machine, from /proc.

A server's CPU time is that of its whole process tree (a uvicorn worker manager and its workers, a
proxy's helper processes): utime + stime of every live process in it, plus cutime + cstime (the
children it has reaped), from ``/proc/<pid>/stat``. A delta between two snapshots counts each CPU
second once. Read every tree from one ``snapshot`` so that all are taken at the same moment.
"""

from __future__ import annotations

import os
from pathlib import Path

Stat = tuple[int, int, int, int, int]  # ppid, utime, stime, cutime, cstime (clock ticks)


def stat_fields(pid: int) -> Stat:
    """(ppid, utime, stime, cutime, cstime) of ``pid`` from ``/proc/<pid>/stat``."""
    rest = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(rest[1]), int(rest[11]), int(rest[12]), int(rest[13]), int(rest[14])


def snapshot() -> dict[int, Stat]:
    """Every process's stat fields, by pid."""
    stats: dict[int, Stat] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stats[int(entry)] = stat_fields(int(entry))
            except (OSError, ValueError, IndexError):
                pass  # it exited while we looked
    return stats


def tree_cpu_s(root: int, stats: dict[int, Stat], ticks_per_s: int | None = None) -> float:
    """CPU seconds so far of ``root`` and all its descendants in ``stats`` (0.0 when root is gone)."""
    children: dict[int, list[int]] = {}
    for pid, fields in stats.items():
        children.setdefault(fields[0], []).append(pid)
    total, todo, seen = 0, [root] if root in stats else [], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        _, utime, stime, cutime, cstime = stats[pid]
        total += utime + stime + cutime + cstime
        todo.extend(children.get(pid, []))
    return total / (ticks_per_s or os.sysconf("SC_CLK_TCK"))


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy so far (all but idle and iowait), from ``/proc/stat``."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
