"""Station instructions per enrollment under valgrind (callgrind), against the floor counted the same way.

    python benchmarks/station_instructions.py [--devices 300] [--small 50] [--phases 200]
    python benchmarks/station_instructions.py --threads 8 --no-floors --phases 0   # the station with a pool of 8

A figure the machine's load does not move (issue 24 item 3): CPU time of one process moves 15-20 %
between runs on a shared machine, the instructions it executes do not.

- station: `tether-station serve --workers 1` under callgrind; one client process outside valgrind
  enrolls `--small` devices, then (a second station run over the same ledger and CA) `--devices`
  devices, each over a new TLS connection as `enroll_rate.py` does (POST /simpleenroll, HTTP Basic,
  `Connection: close`). The difference of the two runs' totals over the difference of the counts is
  one enrollment with start-up and shutdown taken out.
- floor, the same way: `openssl s_server` with the station's certificate, key and TLS settings (no
  tickets, no session cache, groups X25519:P-256:P-384, as `enroll_rate.py`'s floor) under callgrind,
  a Python client outside making `--small`, then `--devices` full handshakes; plus one ECDSA P-256
  verification and one signature as `openssl speed ecdsap256` makes them (inclusive instructions per
  call of EVP_PKEY_verify and EVP_PKEY_sign, counted under callgrind).
- phases: `station_phases.py --marks` under callgrind (the station's code for `--phases` devices in
  one thread, each phase run through a C function of its own, `callgrind.MarkedPhases`): each phase's
  instructions per enrollment; the whole process less their sum is the worker's loop (accept, the
  selector, the hand-off to a pool thread, closing) and whatever else the harness does not see.
- system calls: the kernel's share, which valgrind does not count: the same two station runs under
  `strace -f -c` (when strace is installed), the difference per enrollment by call.
- the Python floor (`python_floor.py`, as `enroll_rate.py --server bare,bare-ledger` runs it): the
  cheapest station Python can be, counted the same way (runs of `--small` and `--devices`), without
  and with its one fsync'd SQLite insert per enrollment, instructions and system calls: what any
  station written in Python executes, against which the station's own part is the difference.
`enroll_rate.py` keeps measuring CPU time. Prints figures only; needs valgrind and a C compiler.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import callgrind  # noqa: E402  (benchmarks/callgrind.py)
from enroll_rate import TRUST_DOMAIN, connects, prepare  # noqa: E402  (benchmarks/enroll_rate.py)
from station_phases import ORDER  # noqa: E402  (benchmarks/station_phases.py)

from lab.procs import Proc, read_port_file, wait_until  # noqa: E402
from provisioning.station.ca import init_station  # noqa: E402

SLOW = 600.0  # seconds: everything under valgrind runs 20-100x slower


def enroll(port: int, ca_file: str, jobs: list[tuple[str, str, bytes]]) -> int:
    """Enroll each device over its own new TLS connection, one after another; the number that failed."""
    ctx = ssl.create_default_context(cafile=ca_file)
    failed = 0
    for device_id, otp, body in jobs:
        auth = base64.b64encode(f"{device_id}:{otp}".encode()).decode()
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=SLOW)
        try:
            conn.request("POST", "/.well-known/est/simpleenroll", body=body,
                         headers={"Content-Type": "application/pkcs10", "Authorization": f"Basic {auth}",
                                  "Connection": "close"})
            response = conn.getresponse()
            failed += response.status != 200 or not response.read()
        finally:
            conn.close()
    return failed


def serve_and_enroll(directory: Path, jobs: list[tuple[str, str, bytes]], wrapper: list[str], label: str,
                     server: str = "loop", threads: int = 0) -> None:
    """One `serve --workers 1` (or the Python floor, `server` "bare" or "bare-ledger") under `wrapper`
    (valgrind or strace), enrolling `jobs`, stopped with SIGTERM (both tools write their output on the
    way out)."""
    port_file = directory / "ports.json"
    port_file.unlink(missing_ok=True)
    argv = [*wrapper, sys.executable, "-m", "provisioning.station.cli", "serve",
            "--dir", str(directory), "--listen", "127.0.0.1:0", "--port-file", str(port_file), "--workers", "1",
            "--log-level", "warning", "--handshake-cpu", "0", "--threads", str(threads)]
    if server != "loop":
        argv = [*wrapper, sys.executable, str(REPO / "benchmarks" / "python_floor.py"), "--dir", str(directory),
                "--port-file", str(port_file), "--workers", "1", *(["--ledger"] if server == "bare-ledger" else [])]
    proc = Proc(f"tether-station ({label})", argv, directory / "serve.log", cwd=REPO)
    try:
        port = read_port_file(port_file, proc, timeout=SLOW)["est"]
        failed = enroll(port, str(directory / "ca.pem"), jobs)
    finally:
        proc.stop(timeout=SLOW)
    if failed:
        raise SystemExit(f"{failed} of {len(jobs)} enrollments failed ({label}); see {directory / 'serve.log'}")


def station_run(directory: Path, jobs: list[tuple[str, str, bytes]], out: Path,
                server: str = "loop", threads: int = 0) -> callgrind.Profile:
    """The station's (or the Python floor's) instructions for `jobs`, under callgrind."""
    serve_and_enroll(directory, jobs, callgrind.valgrind_argv(out), "callgrind", server, threads)
    return callgrind.Profile.read(out)


def syscall_run(directory: Path, jobs: list[tuple[str, str, bytes]], out: Path,
                server: str = "loop", threads: int = 0) -> dict[str, int]:
    """The station's (or the Python floor's) system calls for `jobs` by name, under `strace -f -c` (the
    kernel's share of the CPU, which callgrind does not count)."""
    serve_and_enroll(directory, jobs, ["strace", "-f", "-c", "-o", str(out)], "strace", server, threads)
    calls: dict[str, int] = {}
    for line in out.read_text().splitlines():  # % time, seconds, usecs/call, calls, [errors], syscall
        parts = line.split()
        if len(parts) >= 5 and parts[-1] != "total" and parts[3].isdigit():
            calls[parts[-1]] = int(parts[3])
    return calls


def handshakes(port: int, ca_file: str, count: int) -> None:
    ctx = ssl.create_default_context(cafile=ca_file)
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port), timeout=SLOW) as raw:
            ctx.wrap_socket(raw, server_hostname="localhost")  # the full handshake; closed without close_notify,
            # as `openssl s_time -new` closes


def floor_run(directory: Path, count: int, out: Path) -> callgrind.Profile:
    """`openssl s_server` as enroll_rate.py's floor runs it, under callgrind, for `count` handshakes."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    server = subprocess.Popen([*callgrind.valgrind_argv(out), "openssl", "s_server", "-accept", f"127.0.0.1:{port}",
                               "-cert", str(directory / "server.pem"), "-cert_chain", str(directory / "server.pem"),
                               "-key", str(directory / "server.key"),
                               "-www", "-quiet", "-num_tickets", "0", "-no_cache", "-groups", "X25519:P-256:P-384"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: connects(port), SLOW, "openssl s_server listening (callgrind)", interval=0.5)
        handshakes(port, str(directory / "ca.pem"), count)
    finally:
        server.terminate()  # valgrind writes its output on the signal's way out
        server.wait(SLOW)
    return callgrind.Profile.read(out)


def ecdsa_run(out: Path) -> tuple[float, float]:
    """(verify, sign): inclusive instructions per call of EVP_PKEY_verify and EVP_PKEY_sign in
    `openssl speed ecdsap256` under callgrind."""
    profile = callgrind.run(["openssl", "speed", "-seconds", "1", "ecdsap256"], out)
    return profile.per_call("EVP_PKEY_verify"), profile.per_call("EVP_PKEY_sign")


def phases_run(directory: Path, devices: int, out: Path, log_level: str = "warning") -> dict[str, float]:
    """`station_phases.py --marks` under callgrind: instructions per enrollment by phase."""
    marks = callgrind.Marks(directory)
    mapping = directory / "marks.json"
    profile = callgrind.run([sys.executable, str(REPO / "benchmarks" / "station_phases.py"), "--devices", str(devices),
                             "--marks", str(marks.path), "--marks-out", str(mapping), "--log-level", log_level],
                            out, cwd=REPO)
    found = json.loads(mapping.read_text())
    if found["failures"]:
        raise SystemExit(f"station_phases.py: {found['failures']} enrollments failed")
    parent = {int(k): v for k, v in found["parent"].items()}
    phase = {int(k): v for k, v in found["phase"].items()}
    own = callgrind.own_costs(profile, parent, phase, found["calibration"])
    return {name: cost / devices for name, cost in own.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=300, help="enrollments (and floor handshakes) in the long run")
    parser.add_argument("--small", type=int, default=50, help="... and in the short run, subtracted")
    parser.add_argument("--phases", type=int, default=200, help="devices through station_phases.py (0: skip)")
    parser.add_argument("--phases-only", action="store_true", help="only the phase table (while changing the code)")
    parser.add_argument("--log-level", default="warning", help="station_phases.py's log level (serve's default: info)")
    parser.add_argument("--no-floors", action="store_true", help="skip the Python floor (python_floor.py)")
    parser.add_argument("--threads", type=int, default=0, help="the station's --threads (0, serve's default: each "
                        "request computed in the loop thread, its ledger writes by a commit thread; N: a pool of N)")
    args = parser.parse_args()
    if args.devices <= args.small:
        parser.error("--devices must be more than --small")
    for tool in ("valgrind", "cc", "openssl"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} not found (apt-get install valgrind gcc openssl)")
    directory = Path(tempfile.mkdtemp(prefix="station-instructions-"))
    if args.phases_only:
        try:
            phases = phases_run(directory, args.phases, directory / "phases.out", args.log_level)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        for name in ORDER:
            print(f"  {name:<44}{phases.get(name, 0.0) / 1e6:>10.3f} M")
        print(f"  {'sum of the phases':<44}{sum(phases.values()) / 1e6:>10.3f} M")
        return 0
    try:
        station_dir = directory / "station"
        init_station(station_dir, TRUST_DOMAIN)
        devices = [(d, o, b) for d, o, b, _ in prepare(station_dir, args.small + args.devices)]
        short = station_run(station_dir, devices[: args.small], directory / "station-short.out", threads=args.threads)
        long = station_run(station_dir, devices[args.small:], directory / "station-long.out", threads=args.threads)
        counted = args.devices - args.small
        station = (long.total - short.total) / counted
        f_short = floor_run(station_dir, args.small, directory / "floor-short.out")
        f_long = floor_run(station_dir, args.devices, directory / "floor-long.out")
        handshake = (f_long.total - f_short.total) / counted
        verify, sign = ecdsa_run(directory / "speed.out")
        syscalls: dict[str, float] = {}
        if shutil.which("strace") is not None:
            more = [(d, o, b) for d, o, b, _ in prepare(station_dir, args.small + args.devices)]
            s_short = syscall_run(station_dir, more[: args.small], directory / "strace-short.txt", threads=args.threads)
            s_long = syscall_run(station_dir, more[args.small:], directory / "strace-long.txt", threads=args.threads)
            syscalls = {name: (s_long.get(name, 0) - s_short.get(name, 0)) / counted for name in s_long}
        floors: dict[str, tuple[float, dict[str, float]]] = {}
        for name in () if args.no_floors else ("bare", "bare-ledger"):
            jobs = [(d, o, b) for d, o, b, _ in prepare(station_dir, args.small + args.devices)]
            short = station_run(station_dir, jobs[: args.small], directory / f"{name}-short.out", name)
            long = station_run(station_dir, jobs[args.small:], directory / f"{name}-long.out", name)
            calls: dict[str, float] = {}
            if shutil.which("strace") is not None:
                c_short = syscall_run(station_dir, jobs[: args.small], directory / f"{name}-short.txt", name)
                c_long = syscall_run(station_dir, jobs[args.small:], directory / f"{name}-long.txt", name)
                calls = {k: (c_long.get(k, 0) - c_short.get(k, 0)) / counted for k in c_long}
            floors[name] = ((long.total - short.total) / counted, calls)
        phases = phases_run(directory, args.phases, directory / "phases.out", args.log_level) if args.phases else {}
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    floor = handshake + verify + sign

    def m(x: float) -> str:
        return f"{x / 1e6:.3f} M"

    print(f"callgrind instructions (user space); {os.cpu_count()} CPU(s); load average {os.getloadavg()[0]:.2f} "
          "(does not move these figures)")
    print(f"station: tether-station serve --workers 1 --threads {args.threads}, runs of {args.small} and "
          f"{args.devices} enrollments (new TLS connection each): {m(station)} instructions per enrollment "
          f"({m(long.total)} - {m(short.total)}) / {counted}")
    for fn in ("SSL_do_handshake", "SSL_read", "SSL_write", "sqlite3_step", "sqlite3_prepare_v2"):
        if fn in long.inclusive and fn in short.inclusive:
            share = (long.inclusive[fn] - short.inclusive[fn]) / counted
            print(f"  of which inside {fn}: {m(share)}")
    print(f"floor: openssl s_server handshake {m(handshake)} (runs of {args.small} and {args.devices}), "
          f"ECDSA P-256 verify {m(verify)}, sign {m(sign)} (openssl speed): {m(floor)} per enrollment")
    print(f"station / floor: {station / floor:.2f}x")
    if syscalls:
        top = sorted(syscalls.items(), key=lambda kv: -kv[1])
        print(f"system calls per enrollment (strace -f -c, same runs): {sum(syscalls.values()):.1f}; "
              + ", ".join(f"{name} {n:.1f}" for name, n in top[:14] if n >= 0.5))
    for name, (count, calls) in floors.items():
        label = "Python floor" + (" + ledger (one fsync'd insert)" if name == "bare-ledger" else "")
        top = ", ".join(f"{k} {n:.1f}" for k, n in sorted(calls.items(), key=lambda kv: -kv[1])[:10] if n >= 0.5)
        print(f"{label} (python_floor.py, one process): {m(count)} instructions per enrollment, "
              f"{count / floor:.2f}x the floor; the station {station / count:.2f}x it"
              + (f"; system calls {sum(calls.values()):.1f}: {top}" if calls else ""))
    if phases:
        total = sum(phases.values())
        print(f"phases (station_phases.py --marks, {args.phases} devices, one thread; the marks' own cost taken out):")
        print(f"  {'phase':<44}{'instructions':>14}{'share':>8}")
        for name in ORDER:
            print(f"  {name:<44}{m(phases.get(name, 0.0)):>14}{phases.get(name, 0.0) / station:>8.0%}")
        print(f"  {'sum of the phases':<44}{m(total):>14}{total / station:>8.0%}")
        rest = station - total
        print(f"  {'the rest: loop, threads, sockets, close':<44}{m(rest):>14}{rest / station:>8.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
