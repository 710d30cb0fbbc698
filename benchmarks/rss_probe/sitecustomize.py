"""Loaded by benchmark children (PYTHONPATH): at exit, write this process's peak RSS (VmHWM, per address
space, reset by exec) to $TETHER_RSS_OUT. rusage cannot be used: a child forked from a large benchmark
process inherits its parent's high-water mark across exec."""

import atexit
import os


def _write_peak() -> None:
    with open("/proc/self/status") as status:
        peak = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    with open(os.environ["TETHER_RSS_OUT"], "w") as out:
        out.write(peak)


if os.environ.get("TETHER_RSS_OUT"):
    atexit.register(_write_peak)
