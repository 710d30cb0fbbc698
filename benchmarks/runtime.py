"""Runtime figures for the README (issue 9), each side by side with its baseline in one run.

1. Start-up: process start to CONNACK, CPU and peak RSS, `tether run` with credentials in place and a
   file key, against a minimal paho-mqtt mTLS client, in interleaved pairs (benchmarks/pairs.py), both
   from one clean venv holding the product's wheel (benchmarks/product_venv.py), both clocks stopped at
   the line each prints after CONNACK. Targets (issue 24): <= 1.15x in time and CPU, <= 1.10x in RSS.
2. First boot: keygen + CSR + EST enroll + connect on loopback, file key and TPM key. Targets: < 1 s
   and < 2 s.
3. Failover: after the active broker dies, connected to the next one. Target: < 2 s.
4. Idle: an online agent with nothing to do, wakeups per second and CPU seconds per hour, next to
   the bare client (paho's loop wakes once a second), both over the same window.

    python benchmarks/runtime.py [--pairs N] [--runs N] [--no-tpm] [--idle-seconds S] [--only SECTION]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pairs as pairs_  # noqa: E402  (benchmarks/pairs.py)
from procstat import cpu_seconds  # noqa: E402  (benchmarks/procstat.py)
from product_venv import product_venv  # noqa: E402

from lab.core import Lab, LabSettings  # noqa: E402
from lab.procs import Proc, wait_until  # noqa: E402
from lab.swtpm import SoftTpm  # noqa: E402

BARE = r'''
import ssl, sys
import paho.mqtt.client as mqtt
host, port, ca, cert, key, cid = sys.argv[1:7]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.minimum_version = ssl.TLSVersion.TLSv1_2
ctx.load_verify_locations(ca)
ctx.load_cert_chain(cert, key)
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid)
c.tls_set_context(ctx)
c.on_connect = lambda *a: print("CONNACK", flush=True)
c.connect(host, int(port))
c.loop_forever()
'''
# The floor: paho-mqtt doing the same mTLS connect, with its own network thread, nothing else. Its clock
# stops where Tether's does: at the line each prints once CONNACK has been read.


def timed(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one child process; the RSS comes from its own VmHWM at exit."""
    with tempfile.NamedTemporaryFile(prefix="rss-") as rss:
        probe = {"PYTHONPATH": f"{REPO / 'benchmarks' / 'rss_probe'}{os.pathsep}{REPO}", "TETHER_RSS_OUT": rss.name}
        start = time.perf_counter()
        done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO, check=False,
                              env={**os.environ, **(env or {}), **probe})
        elapsed = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(argv[:4])} failed: {done.stderr.decode()}")
        return elapsed, int(Path(rss.name).read_text() or 0) / 1024


def startup(lab: Lab, pairs: int) -> None:
    """`tether run` (the boot-time service, every component) against the bare paho client, both run by
    the same clean interpreter from the product's wheel, both clocks stopped at CONNACK."""
    venv = product_venv()
    config = lab.device("bench-start", manual_endpoints=True,
                        extra={"token": {"enabled": False}, "discovery": {"url": ""}})
    subprocess.run([str(venv / "bin" / "tether"), "--config", str(config), "check"], check=True,
                   capture_output=True, cwd=config.parent)
    host, port = lab.broker_urls[0].removeprefix("mqtts://").split(":")
    # a second identity for the bare client: one certificate twice would make the two evict each other
    bare_config = lab.device("bench-start-bare", manual_endpoints=True,
                             extra={"token": {"enabled": False}, "discovery": {"url": ""}})
    subprocess.run([str(venv / "bin" / "tether"), "--config", str(bare_config), "check"], check=True,
                   capture_output=True, cwd=bare_config.parent)
    bare_state = bare_config.parent / "state"
    bare = [str(venv / "bin" / "python"), "-c", BARE, host, port, str(lab.ca_file),
            str(bare_state / "certs" / "chain.pem"), str(bare_state / "keys" / "device.key.pem"), "bench-start-bare"]
    tether = [str(venv / "bin" / "tether"), "--config", str(config), "run"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE", "CACHE_DIRECTORY")}
    # the unit's CacheDirectory= (agent/units/tether.service): systemd makes it, 0700, and names it in
    # $CACHE_DIRECTORY; the agent keeps its parsed configuration there. The warm-up pair fills it.
    cache = config.parent / "cache"
    cache.mkdir(mode=0o700, exist_ok=True)
    tether_env = {**env, "CACHE_DIRECTORY": str(cache)}
    result = pairs_.run(("bare paho-mqtt mTLS connect", "tether run (every component)"),
                        lambda: pairs_.until_line(bare, b"CONNACK", cwd=config.parent, env=env),
                        lambda: pairs_.until_line(tether, b"session: connected", stream="stderr",
                                                  cwd=config.parent, env=tether_env),
                        pairs)
    print("\n== start-up: process start to CONNACK (file key, credentials in place, broker with TCP_NODELAY, "
          "$CACHE_DIRECTORY as the unit sets it)")
    print(f"both from {venv} (the wheel, as a device installs it)")
    pairs_.report(result, {"seconds": ("time ms", 1000, ".0f"), "cpu": ("CPU ms", 1000, ".0f"),
                           "rss_mb": ("peak RSS MB", 1, ".1f")},
                  target={"seconds": 1.15, "cpu": 1.15, "rss_mb": 1.10})


def first_boot(lab: Lab, runs: int, tpm_env: dict[str, str] | None, tcti: str | None) -> None:
    label = "TPM key" if tcti else "file key"
    times = []
    for i in range(runs):
        config = lab.device(f"bench-boot-{'tpm' if tcti else 'file'}-{i}", tpm_tcti=tcti, manual_endpoints=True,
                            extra={"token": {"enabled": False}})
        times.append(timed([sys.executable, "-m", "agent.cli", "--config", str(config), "check"], tpm_env)[0])
    target = 2.0 if tcti else 1.0
    print(f"first boot ({label}): median {statistics.median(times):.3f} s, max {max(times):.3f} s over {runs} "
          f"runs (target < {target:.0f} s; keygen + CSR + EST enroll + mTLS connect, process start to exit)")


def failover(lab: Lab, runs: int) -> None:
    config = lab.device("bench-failover", manual_endpoints=True,
                        extra={"token": {"enabled": False}, "mqtt": {"backoff_base": 0.2, "backoff_cap": 1.0}})
    status_file = config.parent / "state" / "status.json"
    agent = Proc("tether-run", [sys.executable, "-m", "agent.cli", "--config", str(config), "run"],
                 config.parent / "run.log", cwd=REPO)

    def status() -> dict[str, str]:
        try:
            return dict(json.loads(status_file.read_text()))
        except (OSError, ValueError):
            return {}
    times = []
    try:
        for _ in range(runs):
            current = wait_until(lambda: status().get("session") == "online" and status().get("endpoint"), 20,
                                 "online", describe=lambda: f"status.json {status()}")
            index = lab.broker_urls.index(current)
            killed = time.perf_counter()
            lab.brokers[index].kill()
            wait_until(lambda current=current: status().get("session") == "online"
                       and status().get("endpoint") != current, 20, "failover", interval=0.002,
                       describe=lambda: f"status.json {status()}")
            times.append(time.perf_counter() - killed)
            lab.restart_broker(index)
    finally:
        agent.stop()
    print(f"failover: median {statistics.median(times):.3f} s, max {max(times):.3f} s over {runs} broker kills "
          "(target < 2 s; kill -9 of the active broker to online on the next)")


def _cpu_and_wakeups(pid: int) -> tuple[float, int]:
    """(CPU seconds, voluntary context switches) of a process, summed over its threads: each
    voluntary switch is the thread going back to sleep, so their rate is the wakeup rate."""
    cpu, switches = 0.0, 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            cpu += cpu_seconds(task / "stat")
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    switches += int(line.split()[1])
        except OSError:  # a thread that ended between listing and reading
            continue
    return cpu, switches


def idle(lab: Lab, seconds: float) -> None:
    """What an online agent costs while nothing happens: CPU and wakeups per second, against the bare
    paho client's own `loop_forever` (it wakes once a second), token refresh off, keepalive 60 s."""
    # two identities: the broker takes the client id from the certificate, so two clients with one
    # certificate would throw each other off all the time
    config, bare_config = (lab.device(name, manual_endpoints=True, extra={
        "token": {"enabled": False}, "discovery": {"url": ""}, "mqtt": {"keepalive": 60}})
        for name in ("bench-idle", "bench-idle-bare"))
    for c in (config, bare_config):
        subprocess.run([sys.executable, "-m", "agent.cli", "--config", str(c), "check"], check=True,
                       capture_output=True, cwd=REPO)
    state, bare_state = config.parent / "state", bare_config.parent / "state"
    host, port = lab.broker_urls[0].removeprefix("mqtts://").split(":")
    bare_idle = BARE.replace('print("CONNACK"', 'print("CONNACK IDLE"')  # loop_forever: paho's 1 s select
    bare = Proc("bare-idle", [sys.executable, "-c", bare_idle, host, port, str(lab.ca_file),
                              str(bare_state / "certs" / "chain.pem"), str(bare_state / "keys" / "device.key.pem"),
                              "bench-idle-bare"], config.parent / "bare.log", cwd=REPO)
    agent = Proc("tether-idle", [sys.executable, "-m", "agent.cli", "--config", str(config), "run"],
                 config.parent / "run.log", cwd=REPO)
    status_file = state / "status.json"
    try:
        wait_until(lambda: "IDLE" in (config.parent / "bare.log").read_text(), 20, "the bare client online")
        wait_until(lambda: b'"online"' in status_file.read_bytes() if status_file.exists() else False, 20,
                   "the agent online")
        # both in the same window, so whatever else the machine does falls on both alike
        procs = (("bare paho (loop_forever)", bare), ("tether run (idle, online)", agent))
        before = [_cpu_and_wakeups(proc.pid) for _, proc in procs]
        t0 = time.monotonic()
        time.sleep(seconds)  # the measurement window itself, not a wait for something
        after = [_cpu_and_wakeups(proc.pid) for _, proc in procs]
        dt = time.monotonic() - t0
        rows = [(name, (a[1] - b[1]) / dt, (a[0] - b[0]) / dt * 3600)
                for (name, _), b, a in zip(procs, before, after, strict=True)]
    finally:
        agent.stop()
        bare.stop()
    print(f"\n== idle: an online agent with nothing to do, over {seconds:.0f} s")
    print(f"{'':36} {'wakeups/s':>9} {'CPU s/hour':>11}")
    for name, wakeups, cpu in rows:
        print(f"{name:36} {wakeups:9.1f} {cpu:11.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="runs of first boot and failover")
    parser.add_argument("--pairs", type=int, default=12, help="interleaved start-up pairs (at least 10)")
    parser.add_argument("--only", choices=("startup", "boot", "failover", "idle"), help="one section only")
    parser.add_argument("--no-tpm", action="store_true")
    parser.add_argument("--idle-seconds", type=float, default=20.0, help="length of the idle measurement")
    args = parser.parse_args()

    def want(section: str) -> bool:
        return args.only in (None, section)

    with tempfile.TemporaryDirectory(prefix="tether-bench-") as tmp, \
            Lab(Path(tmp) / "lab", LabSettings(brokers=2)) as lab:
        if want("startup"):
            startup(lab, args.pairs)
        if want("boot"):
            print("\n== first boot")
            first_boot(lab, args.runs, None, None)
            if not args.no_tpm:
                with SoftTpm(Path(tmp) / "tpm") as tpm:
                    first_boot(lab, args.runs, tpm.env, tpm.tcti)
        if want("failover"):
            failover(lab, args.runs)
        if want("idle"):
            idle(lab, args.idle_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
