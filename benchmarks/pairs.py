"""Interleaved pairs: the one way the benchmarks compare Tether with a baseline (issue 24).

A figure taken on a shared machine moves with whatever else runs. Timing the baseline once before (or
after) the measured side lets that drift into the ratio. So every comparison here runs in pairs, baseline
and measured side back to back, the order alternating from pair to pair, and reports min / median / max of
each side and of the per-pair ratio, with the load average before and after. Medians, never the best run.

Both sides of a pair are measured by the same function: `until_line` for "process start to the line that
marks the event", `whole_process` for "process start to exit".
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

Measure = Callable[[], dict[str, float]]


@dataclass(frozen=True)
class Pairs:
    """Results of `run`: one dict of figures per side per pair."""

    names: tuple[str, str]
    baseline: list[dict[str, float]]
    measured: list[dict[str, float]]
    load_before: float
    load_after: float

    def column(self, side: int, key: str) -> list[float]:
        return [r[key] for r in (self.baseline, self.measured)[side]]

    def ratios(self, key: str) -> list[float]:
        return [m[key] / b[key] for b, m in zip(self.baseline, self.measured, strict=True) if b[key]]

    def median_ratio(self, key: str) -> float:
        return statistics.median(self.ratios(key))


def run(names: tuple[str, str], baseline: Measure, measured: Measure, pairs: int,
        warmup: int = 1) -> Pairs:
    """`pairs` interleaved pairs after `warmup` unrecorded ones (page cache, bytecode); the side that goes
    first alternates, so neither always runs on the other's warm caches."""
    for _ in range(warmup):
        baseline()
        measured()
    load_before = os.getloadavg()[0]
    base: list[dict[str, float]] = []
    ours: list[dict[str, float]] = []
    for i in range(pairs):
        if i % 2:
            ours.append(measured())
            base.append(baseline())
        else:
            base.append(baseline())
            ours.append(measured())
    return Pairs(names, base, ours, load_before, os.getloadavg()[0])


def _mmm(values: Sequence[float], scale: float, fmt: str) -> str:
    if not values:
        return "-"
    return "/".join(format(v * scale, fmt) for v in (min(values), statistics.median(values), max(values)))


def report(result: Pairs, columns: Mapping[str, tuple[str, float, str]],
           target: Mapping[str, float] | None = None) -> None:
    """Print min/median/max per side and of the per-pair ratio, for each column.

    `columns`: key -> (heading, scale, format), e.g. {"seconds": ("time ms", 1000, ".0f")}."""
    cpus = os.cpu_count() or 1
    print(f"{len(result.baseline)} interleaved pairs; load average {result.load_before:.2f} before, "
          f"{result.load_after:.2f} after, on {cpus} CPU(s); each cell min/median/max")
    width = max(len(n) for n in (*result.names, "ratio (per pair)")) + 2
    print(f"{'':{width}}" + "".join(f"{h:>24}" for h, _, _ in columns.values()))
    for side, name in enumerate(result.names):
        print(f"{name:{width}}" + "".join(f"{_mmm(result.column(side, k), s, f):>24}"
                                         for k, (_, s, f) in columns.items()))
    print(f"{'ratio (per pair)':{width}}" + "".join(f"{_mmm(result.ratios(k), 1, '.2f'):>24}" for k in columns))
    if target:
        verdicts = [f"{columns[k][0]} {result.median_ratio(k):.2f}x (target <= {t:.2f}x: "
                    f"{'met' if result.median_ratio(k) <= t else 'NOT met'})" for k, t in target.items()]
        print("median ratio: " + "; ".join(verdicts))


def _vm_hwm_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def until_line(argv: Sequence[str], marker: bytes, *, stream: str = "stdout", cwd: Path | None = None,
               env: Mapping[str, str] | None = None, timeout: float = 30.0) -> dict[str, float]:
    """Spawn `argv`, stop the clock at the first line on `stream` containing `marker`, then read the
    process's peak RSS (its own VmHWM: rusage's maxrss would carry over the parent's across vfork+exec) and
    kill it; CPU is the kernel's account of the process (every thread) up to that moment, from wait4.

    Returns {"seconds", "cpu", "rss_mb"}. Both sides of a comparison are taken this way."""
    pipes = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, stream: subprocess.PIPE}
    start = time.perf_counter()
    proc = subprocess.Popen(list(argv), stdout=pipes["stdout"], stderr=pipes["stderr"], cwd=cwd,
                            env=dict(env) if env is not None else None)
    out = proc.stdout if stream == "stdout" else proc.stderr
    assert out is not None
    deadline = start + timeout
    seen: list[bytes] = []
    try:
        while True:
            line = out.readline()  # blocks: the waiting parent takes no CPU from the child
            if marker in line:
                break
            seen.append(line)
            if not line or time.perf_counter() > deadline:
                raise SystemExit(f"{' '.join(argv[:4])}: no {marker!r} line (exit {proc.poll()}):\n"
                                 + b"".join(seen[-20:]).decode(errors="replace"))
        seconds = time.perf_counter() - start
        rss_kb = _vm_hwm_kb(proc.pid)
    finally:
        proc.send_signal(signal.SIGKILL)
    _, _, usage = os.wait4(proc.pid, 0)
    proc.returncode = -9
    out.close()
    return {"seconds": seconds, "cpu": usage.ru_utime + usage.ru_stime, "rss_mb": rss_kb / 1024}


def whole_process(argv: Sequence[str], *, cwd: Path | None = None,
                  env: Mapping[str, str] | None = None) -> tuple[dict[str, float], bytes]:
    """Spawn `argv` and wait for it to exit: ({"seconds", "cpu"}, stdout). CPU covers the process and every
    descendant it waited for (wait4's rusage: `bash -c 'curl | tee >(sha256sum)'` counts all three). A
    non-zero exit is an error: a failed run is not a figure."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(list(argv), stdout=out, stderr=err, cwd=cwd,
                                env=dict(env) if env is not None else None)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(argv[:4])} failed ({proc.returncode}): "
                             f"{err.read().decode(errors='replace')[-2000:]}")
        return {"seconds": seconds, "cpu": usage.ru_utime + usage.ru_stime}, out.read()
