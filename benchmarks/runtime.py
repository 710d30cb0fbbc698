"""Runtime figures for the README (issue 9), each side by side with its baseline in one run.

1. Start-up: process start to CONNACK (and exit) and peak RSS, `tether check` with credentials in
   place and a file key, against a minimal script that only does a paho-mqtt mTLS connect and one
   QoS 1 publish. Target: at most 1.25x the floor in time and in peak RSS.
2. First boot: keygen + CSR + EST enroll + connect on loopback, file key and TPM key. Targets: < 1 s
   and < 2 s.
3. Failover: after the active broker dies, connected to the next one. Target: < 2 s.
4. Idle: an online agent with nothing to do, wakeups per second and CPU seconds per hour, next to
   the bare client (paho's loop_start wakes once a second).

    python benchmarks/runtime.py [--runs N] [--no-tpm] [--idle-seconds S]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from procstat import cpu_seconds  # noqa: E402  (benchmarks/procstat.py)

from lab.core import Lab, LabSettings  # noqa: E402
from lab.procs import Proc, wait_until  # noqa: E402

BARE = r'''
import ssl, sys, threading
import paho.mqtt.client as mqtt
host, port, ca, cert, key, cid = sys.argv[1:7]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.minimum_version = ssl.TLSVersion.TLSv1_2
ctx.load_verify_locations(ca)
ctx.load_cert_chain(cert, key)
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid)
c.tls_set_context(ctx)
c.on_connect = lambda *a: print("CONNACK", flush=True)
done = threading.Event()
c.on_publish = lambda *a: done.set()
c.connect(host, int(port))
c.loop_start()
c.publish(f"{cid}/bench", b"x", qos=1)
done.wait(10)
c.disconnect()
c.loop_stop()
'''


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


def compile_bytecode() -> None:
    """Write .pyc files first, as `pip install` does on a device: with PYTHONDONTWRITEBYTECODE set
    (as on some CI machines) every run would otherwise recompile the agent from source while paho,
    installed by pip, loads its bytecode: an unfair comparison."""
    import compileall

    for package in ("agent", "hal", "provisioning"):
        compileall.compile_dir(REPO / package, quiet=1)


def until_connack(argv: list[str], connected: Callable[[subprocess.Popen[bytes]], bool],
                  stop: bool) -> tuple[float, float]:
    """(seconds from spawn to CONNACK, peak RSS in MB at exit) of one child process."""
    with tempfile.NamedTemporaryFile(prefix="rss-") as rss:
        probe = {"PYTHONPATH": f"{REPO / 'benchmarks' / 'rss_probe'}{os.pathsep}{REPO}", "TETHER_RSS_OUT": rss.name}
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
                                env={**os.environ, **probe})
        while not connected(proc):
            if proc.poll() is not None:
                raise SystemExit(f"{' '.join(argv[:5])} exited with {proc.returncode} before connecting")
        elapsed = time.perf_counter() - start
        if stop:
            proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
        return elapsed, int(Path(rss.name).read_text() or 0) / 1024


def startup(lab: Lab, runs: int) -> None:
    """`tether run` (the boot-time service, all components attached) against the floor."""
    compile_bytecode()
    config = lab.device("bench-start", manual_endpoints=True,
                        extra={"token": {"enabled": False}, "discovery": {"url": ""}})
    subprocess.run([sys.executable, "-m", "agent.cli", "--config", str(config), "check"], check=True,
                   capture_output=True, cwd=REPO)
    state = config.parent / "state"
    host, port = lab.broker_urls[0].removeprefix("mqtts://").split(":")
    bare = [sys.executable, "-c", BARE, host, port, str(lab.ca_file), str(state / "certs" / "chain.pem"),
            str(state / "keys" / "device.key.pem"), "bench-start"]
    tether = [sys.executable, "-m", "agent.cli", "--config", str(config), "run"]

    def bare_connected(proc: subprocess.Popen[bytes]) -> bool:
        assert proc.stdout is not None
        return proc.stdout.readline().startswith(b"CONNACK")

    def run_online(proc: subprocess.Popen[bytes]) -> bool:
        # logged right after CONNACK; reading the pipe blocks, so the measurement takes no CPU from the agent
        assert proc.stderr is not None
        return b"session: connected" in proc.stderr.readline()

    names = ("bare paho mTLS connect + publish", "tether run (all components)")
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for _ in range(runs):
        results[names[0]].append(until_connack(bare, bare_connected, stop=False))
        results[names[1]].append(until_connack(tether, run_online, stop=True))
    print("\n== start-up: process start to CONNACK, peak RSS (file key, credentials in place)")
    print(f"{'':36} {'median s':>9} {'peak RSS MB':>12}")
    med = {}
    for name, values in results.items():
        med[name] = (statistics.median(v[0] for v in values), statistics.median(v[1] for v in values))
        print(f"{name:36} {med[name][0]:9.3f} {med[name][1]:12.1f}")
    base, ours = med[names[0]], med[names[1]]
    print(f"{'ratio (target <= 1.25)':36} {ours[0] / base[0]:9.2f} {ours[1] / base[1]:12.2f}")


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
    bare_idle = BARE.replace("done.wait(10)", "done.wait(10)\nimport time; print('IDLE', flush=True); "
                                               "time.sleep(1e6)")
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
        rows = []
        for name, proc in (("bare paho (loop_start)", bare), ("tether run (idle, online)", agent)):
            cpu0, sw0 = _cpu_and_wakeups(proc.pid)
            t0 = time.monotonic()
            time.sleep(seconds)  # the measurement window itself, not a wait for something
            cpu1, sw1 = _cpu_and_wakeups(proc.pid)
            dt = time.monotonic() - t0
            rows.append((name, (sw1 - sw0) / dt, (cpu1 - cpu0) / dt * 3600))
    finally:
        agent.stop()
        bare.stop()
    print(f"\n== idle: an online agent with nothing to do, over {seconds:.0f} s")
    print(f"{'':36} {'wakeups/s':>9} {'CPU s/hour':>11}")
    for name, wakeups, cpu in rows:
        print(f"{name:36} {wakeups:9.1f} {cpu:11.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--no-tpm", action="store_true")
    parser.add_argument("--idle-seconds", type=float, default=20.0, help="length of the idle measurement")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tether-bench-") as tmp, \
            Lab(Path(tmp) / "lab", LabSettings(brokers=2)) as lab:
        startup(lab, args.runs)
        print("\n== first boot and failover")
        first_boot(lab, args.runs, None, None)
        if not args.no_tpm:
            from lab.swtpm import SoftTpm

            with SoftTpm(Path(tmp) / "tpm") as tpm:
                first_boot(lab, args.runs, tpm.env, tpm.tcti)
        failover(lab, args.runs)
        idle(lab, args.idle_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
