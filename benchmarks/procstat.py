"""CPU and memory of processes, read from /proc (Linux), for the benchmark scripts."""

from __future__ import annotations

import os
from pathlib import Path


def cpu_seconds(stat: str | Path) -> float:
    """CPU seconds (user + system) used so far by the process or thread whose `stat` file this is
    (`/proc/<pid>/stat`, `/proc/<pid>/task/<tid>/stat`); 0.0 once it is gone."""
    try:
        fields = Path(stat).read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def tree(pid: int) -> list[int]:
    """`pid` and every live descendant (a station's workers, a RabbitMQ node's Erlang VM under its script)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and every live descendant."""
    return sum(cpu_seconds(f"/proc/{p}/stat") for p in tree(pid))


def tree_system_seconds(pid: int) -> float:
    """CPU seconds spent in the kernel (system time) by a process and every live descendant."""
    total = 0
    for p in tree(pid):
        try:
            total += int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[12])
        except (OSError, IndexError, ValueError):
            continue
    return total / os.sysconf("SC_CLK_TCK")


def tree_rss_kb(pid: int) -> int:
    """Resident memory of a process and every live descendant, in KB."""
    return sum(rss_kb(p) for p in tree(pid))


def rss_kb(pid: int) -> int:
    """Resident memory of a process in KB (VmRSS); 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0
