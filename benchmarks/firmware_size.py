"""Print the firmware's figures: total .mpy size (mpy-cross) and peak session heap (MicroPython).

Usage: ``python benchmarks/firmware_size.py`` from the repository root, after ``npm ci`` in
firmware/. The heap figure is the peak ``gc.mem_alloc()`` above the post-import baseline during a
full cycle (failover connect, subscribe, token, 100 QoS 1 publishes, half-life refresh) in the
MicroPython WebAssembly port, with a collection after every session step as firmware/main.py does.
Budgets (issue 7): .mpy under 40 KB, heap under 64 KB. Figures only; the tests hold the budgets.
"""

import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "firmware"), os.path.join(REPO, "tests", "firmware")]

import build  # noqa: E402  firmware/build.py

from tests.firmware.test_session import run_cycle_in_micropython  # noqa: E402


def main():
    with tempfile.TemporaryDirectory() as out:
        sizes = build.build(out)
    for path, size in sizes:
        print(f"{size:7d}  {path}")
    total = sum(size for _, size in sizes)
    print(f"{total:7d}  total .mpy bytes (budget {build.BUDGET_BYTES})")
    r = run_cycle_in_micropython()
    print(f"{r['heap_peak_over_base']:7d}  peak heap bytes over baseline during a session cycle (budget 65536)")
    print(f"{r['heap_base']:7d}  baseline heap bytes after importing the modules from source")
    print(f"{r['acked']:7d}  QoS 1 publishes acknowledged in the cycle")


if __name__ == "__main__":
    main()
