"""Where a process's resident memory is, for the fleet benchmark's `--profile-memory`: /proc/self/smaps
sorted into kinds (thread stacks, malloc arenas, the main heap, shared libraries) and the Python
allocations tracemalloc attributes to source lines."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

_HEADER = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \d+\s*(.*)$")


def smaps_by_kind(pid: int | str = "self") -> dict[str, int]:
    """Resident KB per kind of mapping: `thread stacks` (an anonymous mapping directly above a guard
    page, whatever its size), `malloc arenas` (glibc's per-thread heaps, 64 MB-aligned), `[heap]`,
    `files` (libraries, mmapped files) and `other anonymous` (Python's obmalloc arenas, large
    allocations, OpenSSL's mmaps)."""
    kinds: dict[str, int] = {}
    entries: list[tuple[int, int, str, str, dict[str, int]]] = []
    current: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        m = _HEADER.match(line)
        if m:
            current = {}
            entries.append((int(m.group(1), 16), int(m.group(2), 16), m.group(3), m.group(4).strip(), current))
        elif ":" in line:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                current[key] = int(parts[0])
    previous_guard_end = -1
    for start, end, perms, name, fields in entries:
        guard = perms.startswith("---") and name == "" and end - start <= 64 * 1024
        if name.startswith("/"):
            kind = "files"
        elif name == "[heap]":
            kind = "[heap]"
        elif name.startswith("["):
            kind = name
        elif start == previous_guard_end:
            kind = "thread stacks"
        elif start % (64 * 1024 * 1024) == 0:
            kind = "malloc arenas"
        else:
            kind = "other anonymous"
        if guard:
            previous_guard_end = end
        kinds[kind] = kinds.get(kind, 0) + fields.get("Rss", 0)
    return kinds


def tracemalloc_top(limit: int = 25) -> list[dict[str, Any]]:
    """The biggest Python allocation sites (file:line), tracemalloc must be running."""
    import tracemalloc

    stats = tracemalloc.take_snapshot().filter_traces((
        tracemalloc.Filter(False, tracemalloc.__file__),)).statistics("lineno")
    return [{"where": f"{s.traceback[0].filename}:{s.traceback[0].lineno}", "kb": s.size / 1024, "count": s.count}
            for s in stats[:limit]]


def malloc_info() -> dict[str, int]:
    """glibc's own account (mallinfo2, KB): `arena` taken from the system by brk and the arenas' heaps,
    `in_use` by live allocations, `free` held in its free lists, `mmapped` large blocks."""
    import ctypes

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = Mallinfo2
    info = libc.mallinfo2()
    return {"arena": info.arena // 1024, "in_use": info.uordblks // 1024, "free": info.fordblks // 1024,
            "mmapped": info.hblkhd // 1024}


def malloc_trim() -> None:
    """Give glibc's free pages in every arena back to the system (what could be reclaimed)."""
    import ctypes

    ctypes.CDLL(None).malloc_trim(0)
