"""Fleet simulator: how many device agents this machine holds connected with tokens refreshing.

Usage (from the repository root):
    python benchmarks/fleet.py                       # ramp 50, 100, 200, 400, 800, 1600 devices
    python benchmarks/fleet.py --steps 50,100 --hold 20 --token-lifetime 10 --budget 600
    python benchmarks/fleet.py --broker rabbitmq --steps 4000 --max 4000 --hold 120 --token-lifetime 120

With `--broker rabbitmq` the devices connect to a 2-node RabbitMQ cluster (lab/rabbitmq.py, Debian's
rabbitmq-server) instead of one mosquitto, half of them listing node 1 first and half node 2, each
with its outbox enabled. After the hold, every device queues a message in its outbox, node 1 goes away
(`--node-stop kill`: SIGKILL, a crash; `--node-stop stop`: SIGTERM, the clean stop of an operator's rolling
restart, which closes the node's connections and deletes its queues itself), every device queues a second
one, and the script reports how long until every device is online again, when the token service answered
again, whether every message reached an observer subscribed on node 2 (none lost, duplicates counted), and
the cluster's memory per connection.

Everything is real: one mosquitto with mutual TLS and the lab ACL (`lab.mosquitto`), one
`tether-station serve` (EST, two worker processes), the lab token service (`lab.tokens`, ES256 JWTs).
Each device is an `agent.runtime.Runtime` (the code `tether run` runs) with its own config, state
directory, key and one-time password; it enrolls over EST, connects over mTLS and keeps its token
fresh over MQTT. A `tether run` process costs ~30 MB, so devices run as threads inside worker
processes, which shares the interpreter but not the sessions, contexts or keys. A worker holds at most
`--per-worker` devices (default 1,000; 300 until issue 24: paho's own loop waited with `select()`,
which stops at descriptor 1,024, and agent/session.py now waits with epoll). The workers get the
environment agent/units/tether.service gives `tether run` (its GLIBC_TUNABLES).

`--pace N` powers the fleet on over time instead of at once: at most N devices booting, the next one
starting when one is online with its token. `--profile-memory` prints where the workers' memory is, per device.

For each step of N devices, all boot at once on a signal (the enrollment storm); then the fleet must
be online with a token within `--settle` seconds, and stay so for `--hold` seconds with every
device refreshing its token at least once. A step that fails ends the ramp, as does `--budget`.
Figures printed: storm time (all N enrolled), time until all online with a token, the minimum
online count seen during the hold, token refreshes during the hold, memory (workers' RSS / N, and
the marginal RSS per device above the workers' idle baseline), mosquitto's RSS per connection, and
the CPU the device processes and the broker used during the hold (% of one core).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from procstat import cpu_seconds, rss_kb, tree_cpu_seconds, tree_rss_kb  # noqa: E402  (benchmarks/procstat.py)

from agent.component import Component  # noqa: E402  (a plain base class with no imports of its own)

TRUST_DOMAIN = "fleet.tether"
OBSERVER = "tether-fleet-observer"  # a reserved id (station.toml) that may read every device's topics
MARKS = ("before", "after")         # the outbox messages of the failover: queued before and after the kill


def cpu_s(pid: int) -> float:
    return cpu_seconds(f"/proc/{pid}/stat")


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# -- worker process: many Runtimes, one thread each ------------------------------------------------------
def worker(spec_file: str) -> int:
    import logging

    from agent.compose import build
    from agent.config import load
    from agent.outbox import Outbox

    spec = json.loads(Path(spec_file).read_text())
    stats_file, go_file = Path(spec["stats"]), Path(spec["go"])
    if spec.get("profile") == "python":
        import tracemalloc

        tracemalloc.start()
    logging.basicConfig(level=logging.WARNING, filename=spec["log"],
                        format="%(asctime)s %(threadName)s %(name)s %(message)s")
    # as `tether run` builds them, without 4,000 local publish sockets ([outbox] enabled when spec["outbox"])
    runtimes = [build(load(c), publish_socket=False) for c in spec["configs"]]
    outboxes: list[Any] = [c for r in runtimes for c in r.components if isinstance(c, Outbox)]
    # when each device's current session came up, stamped by the device's own control loop: under a node
    # kill the devices' reconnecting threads can starve this process's reporting thread for seconds, so
    # "online again" is read from these stamps, not from when a report happened to show it
    clocks = [SessionClock() for _ in runtimes]
    for r, clock in zip(runtimes, clocks, strict=True):
        r.components.append(clock)
    marks_done: set[str] = set()
    memory_file = stats_file.with_suffix(".memory.json")
    enrolled_at: list[float | None] = [None] * len(runtimes)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())

    def device(i: int) -> None:
        runtime = runtimes[i]
        try:
            if runtime.boot():
                enrolled_at[i] = time.time()
                runtime.run()
        except Exception:  # one device's failure is a figure, not the end of the fleet
            logging.getLogger("fleet").exception("device %s stopped", runtime.config.device.id)

    def report(ready: bool) -> None:
        tokens = [r.token for r in runtimes if r.token is not None]
        write_json(stats_file, {
            "ready": ready, "devices": len(runtimes), "rss_kb": rss_kb(os.getpid()),
            "enrolled": sum(t is not None for t in enrolled_at),
            "enrolled_at": [t for t in enrolled_at if t is not None],
            "online": sum(r.session is not None for r in runtimes),
            "token_ok": sum(t.current() is not None for t in tokens),
            "refreshes": [t.refreshes for t in tokens],
            "threads": threading.active_count(),
            "outbox_pending": sum(o.store.count for o in outboxes if o.store is not None),
            "ports": [r.session.endpoint.port for r in runtimes if r.session is not None],
            "up_at": [c.up_at for c in clocks if c.up_at is not None], "at": time.time(),
            "marks": sorted(marks_done),
        })

    def queue_marks() -> None:
        """Each mark file the bench touches: every device queues one message `<mark>` in its outbox."""
        for mark in MARKS:
            if mark not in marks_done and (go_file.parent / f"mark-{mark}").exists():
                for o in outboxes:
                    o.publish("fleet", mark.encode(), 1)  # <id>/fleet: relative to the device's prefix
                marks_done.add(mark)

    report(ready=True)
    while not go_file.exists() and not stopping.is_set():
        time.sleep(0.01)
    threads = [threading.Thread(target=device, args=(i,), name=r.config.device.id, daemon=True)
               for i, r in enumerate(runtimes)]
    threading.Thread(target=power_on, args=(threads, runtimes, spec.get("pace") or len(runtimes), stopping),
                     name="power-on", daemon=True).start()
    while not stopping.wait(0.2 if (go_file.parent / "mark-before").exists() else 1.0):
        queue_marks()
        report(ready=True)
        if spec.get("profile") and (go_file.parent / "profile").exists() and not memory_file.exists():
            from memprofile import malloc_info, malloc_trim, smaps_by_kind, tracemalloc_top

            before = smaps_by_kind()
            heap = malloc_info()
            malloc_trim()
            python = tracemalloc_top(40) if spec["profile"] == "python" else []
            write_json(memory_file, {"smaps": before, "python": python, "malloc": heap,
                                     "trimmed": smaps_by_kind(), "devices": len(runtimes)})
    for r in runtimes:
        r.stop()
    deadline = time.monotonic() + 15
    for t in threads:
        if t.ident is not None:  # a paced fleet may stop before every device powered on
            t.join(max(0.0, deadline - time.monotonic()))
    return 0


class SessionClock(Component):
    """The bench's own component: the wall-clock time the device's current session came up (None while
    it has none). The runtime calls its hooks on the device's control loop, when the session changes."""

    name = "fleet-session-clock"

    def __init__(self) -> None:
        self.up_at: float | None = None

    def on_session_up(self) -> None:
        self.up_at = time.time()

    def on_session_down(self) -> None:
        self.up_at = None


def unit_environment() -> dict[str, str]:
    """The memory settings agent/units/tether.service gives `tether run` (GLIBC_TUNABLES), so the workers'
    devices run as a device's agent does."""
    env = {}
    for line in (REPO / "agent" / "units" / "tether.service").read_text().splitlines():
        if line.startswith("Environment=GLIBC_TUNABLES="):
            env["GLIBC_TUNABLES"] = line.split("=", 2)[2]
    return env


PACE_GIVE_UP = 60.0  # a paced device still not online after this long frees its place for the next one


def power_on(threads: list[threading.Thread], runtimes: list[Any], window: int, stopping: threading.Event) -> None:
    """Start the devices' threads, at most `window` of them booting at a time: the next one powers on
    when one of those is online with its first token (or after PACE_GIVE_UP). Not at CONNACK: the token comes
    after it, and on RabbitMQ so does the SUBSCRIBE's queue declaration (when session queues were
    mirrored, a window freed at CONNACK let those pile up until they timed out). `window` = all of them: the storm."""
    def up(r: Any) -> bool:
        return r.session is not None and (r.token is None or r.token.current() is not None)

    booting: dict[int, float] = {}
    following = 0
    while following < len(threads) and not stopping.is_set():
        now = time.monotonic()
        booting = {i: t for i, t in booting.items()
                   if not up(runtimes[i]) and threads[i].is_alive() and now - t < PACE_GIVE_UP}
        while len(booting) < window and following < len(threads):
            threads[following].start()
            booting[following] = now
            following += 1
        stopping.wait(0.02)


# -- the bed: station, broker, token service --------------------------------------------------------------
class Bed:
    def __init__(self, root: Path, station_workers: int, token_lifetime: float, broker: str = "mosquitto",
                 keepalive: int = 60, connect_timeout: float = 20.0, backoff: tuple[float, float] = (0.5, 5.0)) -> None:
        from lab.mosquitto import BrokerFiles, Mosquitto
        from lab.procs import Proc, read_port_file
        from lab.tokens import SERVICE_ID, JwtSigner, TokenService

        self.root = root
        self.kind = broker
        self.keepalive, self.connect_timeout, self.backoff = keepalive, connect_timeout, backoff
        self.station_dir = root / "station"
        self.cli("init", "--trust-domain", TRUST_DOMAIN)
        settings = self.station_dir / "station.toml"
        settings.write_text(settings.read_text().replace('reserved_ids = "', f'reserved_ids = "{OBSERVER},'))
        self.cli("server-cert", "--dns", "localhost", "--ip", "127.0.0.1", "--out", str(root / "broker-cert"))
        self.cli("issue", SERVICE_ID, "--service", "--out", str(root / "token-service"))
        self.cli("issue", OBSERVER, "--service", "--out", str(root / "observer"))
        files = BrokerFiles(self.station_dir / "ca-chain.pem", root / "broker-cert" / "server.pem",
                            root / "broker-cert" / "server.key")
        self.broker: Any = None
        self.cluster: Any = None
        self.auth: Any = None
        if broker == "rabbitmq":
            from lab.rabbitauth import AuthServer, Decider
            from lab.rabbitmq import RabbitCluster
            from provisioning.station.ca import Station

            services = Station(self.station_dir).settings.reserved
            self.auth = AuthServer(Decider(services=services)).start()
            self.cluster = RabbitCluster(root / "rabbitmq", files, f"http://127.0.0.1:{self.auth.port}/auth",
                                         services=services).start()
            self.ports = [n.mqtt_port for n in self.cluster.nodes]
        else:
            self.broker = Mosquitto(root / "broker", files,
                                    # the token service is one subscriber taking every device's s/uat: at
                                    # mosquitto's default of 1,000 queued messages a storm loses requests
                                    extra="max_keepalive 120\nmax_queued_messages 100000").start()
            self.ports = [self.broker.port]
        self.idle_broker_kb = self.broker_kb()
        self.station = Proc("tether-station", [sys.executable, "-m", "provisioning.station.cli", "serve", "--dir",
                                               str(self.station_dir), "--listen", "127.0.0.1:0",
                                               "--port-file", str(root / "station.ports.json"),
                                               "--workers", str(station_workers), "--log-level", "warning",
                                               # every simulated device comes from 127.0.0.1: no per-address cap
                                               # and no per-address handshake budget; 4,000 devices at once
                                               "--max-per-client", "0", "--handshake-cpu", "0",
                                               "--max-connections", "0"],
                            root / "station.log", cwd=REPO)
        self.port = read_port_file(root / "station.ports.json", self.station)["est"]
        from agent.tls import client_context
        from hal.keys import TlsKey

        ctx = client_context(root / "token-service" / "device.pem", TlsKey(str(root / "token-service" / "device.key")),
                             cafile=str(self.station_dir / "ca.pem"))
        signer = JwtSigner.load_or_create(root / "jwt.key")
        self.tokens = TokenService("localhost", self.ports[0], ctx, signer, token_lifetime,
                                   fallbacks=tuple(("localhost", p) for p in self.ports[1:])).start()

    def broker_pids(self) -> list[int]:
        if self.cluster is not None:
            return [n.proc.pid for n in self.cluster.nodes if n.alive()]
        return [self.broker.proc.pid] if self.broker.proc else []

    def broker_kb(self) -> int:
        """Resident memory of the broker (every node of the cluster, its Erlang VM included)."""
        return sum(tree_rss_kb(pid) for pid in self.broker_pids())

    def broker_cpu(self) -> float:
        return sum(tree_cpu_seconds(pid) for pid in self.broker_pids())

    def cli(self, *args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "provisioning.station.cli", *args, "--dir", str(self.station_dir)],
                             capture_output=True, text=True, cwd=REPO, check=False, timeout=120)
        if out.returncode != 0:
            raise SystemExit(f"tether-station {args[0]} failed: {out.stderr}")
        return out.stdout

    def devices(self, directory: Path, ids: list[str]) -> list[str]:
        """Configs for `ids`, each with a fresh one-time password in the station's ledger."""
        from provisioning.station.ca import Station
        from provisioning.station.otp import new_otp, otp_hash
        from provisioning.tomlfmt import to_toml

        ledger = Station(self.station_dir).open_ledger()
        configs = []
        try:
            now = int(time.time())
            for index, device_id in enumerate(ids):
                first = index % len(self.ports)
                d = directory / device_id
                d.mkdir(parents=True)
                otp = new_otp()
                ledger.add_otp(device_id, otp_hash(device_id, otp), now, now + 3600)
                (d / "otp").write_text(otp + "\n")
                sections: dict[str, dict[str, Any]] = {
                    "device": {"id": device_id, "state_dir": str(d / "state"), "trust_domain": TRUST_DOMAIN},
                    "est": {"url": f"https://127.0.0.1:{self.port}", "ca_file": str(self.station_dir / "ca.pem"),
                            "otp_file": str(d / "otp"), "timeout": 60.0},
                    "identity": {"ca_file": str(self.station_dir / "ca.pem")},
                    # a cluster's devices spread over its nodes: each lists them from a different one
                    "endpoints": {"urls": [f"mqtts://localhost:{p}" for p in self.ports[first:] + self.ports[:first]]},
                    "outbox": {"enabled": self.cluster is not None},
                    "mqtt": {"keepalive": self.keepalive, "backoff_base": self.backoff[0],
                             "backoff_cap": self.backoff[1], "connect_timeout": self.connect_timeout},
                    "token": {"timeout": 15.0},
                }
                (d / "tether.toml").write_text(to_toml(sections))
                configs.append(str(d / "tether.toml"))
        finally:
            ledger.close()
        return configs

    def stop(self) -> None:
        """Stop everything; a part that is slow to stop is reported, not raised (the figures are printed
        after this)."""
        parts = [self.tokens.stop, self.station.stop]
        if self.broker is not None:
            parts.append(self.broker.stop)
        if self.cluster is not None:
            parts += [self.cluster.stop, self.auth.stop]
        for stop in parts:
            try:
                stop()
            except Exception as exc:  # one part's slow stop must not hide the figures
                print(f"stopping the bed: {exc}", flush=True)


# -- one step of the ramp ---------------------------------------------------------------------------------
def run_step(bed: Bed, n: int, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    step_dir = root / f"step-{n}"
    ids = [f"fleet-{n}-{i:05d}" for i in range(n)]
    configs = bed.devices(step_dir, ids)
    workers = max(1, -(-n // args.per_worker))
    go = step_dir / "go"
    procs, stats = [], []
    for w in range(workers):
        spec = step_dir / f"worker-{w}.json"
        stats.append(step_dir / f"worker-{w}.stats.json")
        write_json(spec, {"configs": configs[w::workers], "stats": str(stats[-1]), "go": str(go),
                          "log": str(step_dir / f"worker-{w}.log"), "outbox": bed.cluster is not None,
                          "pace": -(-args.pace // workers) if args.pace else 0,
                          "profile": args.profile_memory and ("python" if args.profile_python else "smaps")})
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", str(spec)], cwd=REPO,
                                      env={**os.environ, **unit_environment()},
                                      stdin=subprocess.DEVNULL, start_new_session=True))
    result: dict[str, Any] = {"n": n, "held": False, "why": ""}

    def sample() -> list[dict[str, Any]]:
        return [read_json(s) or {} for s in stats]

    def total(samples: list[dict[str, Any]], key: str) -> int:
        return sum(int(s.get(key, 0)) for s in samples)

    try:
        deadline = time.monotonic() + 120
        while not all(s.get("ready") for s in sample()):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                result["why"] = "workers did not start"
                return result
            time.sleep(0.1)
        baseline = sum(rss_kb(p.pid) for p in procs)

        def cpu_now() -> dict[str, float]:
            # who spends the storm's CPU: the simulated devices, the station, the broker, the token service
            return {"devices": sum(cpu_s(p.pid) for p in procs), "station": tree_cpu_seconds(bed.station.pid),
                    "broker": bed.broker_cpu(), "tokens": cpu_s(os.getpid())}

        cpu0 = cpu_now()
        # the machine is shared: the 1-minute load average at each stage says how loaded it was
        result["load"] = {"power-on": os.getloadavg()[0]}
        go.touch()
        t0 = time.time()
        # storm: every device enrolled
        deadline = time.monotonic() + args.settle
        while (s := sample()) and total(s, "enrolled") < n:
            if time.monotonic() > deadline:
                result["why"] = f"only {total(s, 'enrolled')}/{n} enrolled within {args.settle:.0f} s"
                return result
            time.sleep(0.2)
        times = sorted(t - t0 for w in s for t in w.get("enrolled_at", []))
        cpu1 = cpu_now()
        result["storm_cpu"] = {k: cpu1[k] - cpu0[k] for k in cpu0}
        result["storm_s"] = times[-1]
        result["storm_p50_s"] = times[len(times) // 2]
        # settle: every device online with a token
        while (s := sample()) and (total(s, "online") < n or total(s, "token_ok") < n):
            if time.monotonic() > deadline:
                result["why"] = (f"{total(s, 'online')}/{n} online, {total(s, 'token_ok')}/{n} with a token "
                                 f"{args.settle:.0f} s after boot")
                return result
            time.sleep(0.2)
        result["online_s"] = time.time() - t0
        result["load"]["all online"] = os.getloadavg()[0]
        if args.hold == 0:  # storm only
            result["held"] = True
            if bed.cluster is not None:
                result.update(failover(bed, n, step_dir, sample, total, args.node_stop))
            return result
        # hold: stay online, keep refreshing
        time.sleep(1.5)  # let every worker write a fresh sample
        start = [r for w in sample() for r in w.get("refreshes", [])]
        cpu_start = (sum(cpu_s(p.pid) for p in procs), bed.broker_cpu(), time.monotonic())
        hold_end = time.monotonic() + args.hold
        min_online, min_token = n, n
        while time.monotonic() < hold_end:
            s = sample()
            min_online = min(min_online, total(s, "online"))
            min_token = min(min_token, total(s, "token_ok"))
            time.sleep(0.5)
        time.sleep(1.2)
        s = sample()
        end = [r for w in s for r in w.get("refreshes", [])]
        per_device = [b - a for a, b in zip(start, end, strict=False)]
        rss = sum(rss_kb(p.pid) for p in procs)
        if args.profile_memory:
            result["memory"] = memory_profile(step_dir, stats, n)
        held_s = time.monotonic() - cpu_start[2]
        result["load"]["end of hold"] = os.getloadavg()[0]
        # the fleet's idle cost: CPU the device processes and the broker used while holding, in % of one core
        result.update(agents_cpu=100 * (sum(cpu_s(p.pid) for p in procs) - cpu_start[0]) / held_s,
                      broker_cpu=100 * (bed.broker_cpu() - cpu_start[1]) / held_s)
        result.update(min_online=min_online, min_token=min_token, refreshes=sum(per_device),
                      least_refreshes=min(per_device) if per_device else 0,
                      rss_mb=rss / 1024, rss_per_device_kb=rss / n, marginal_kb=(rss - baseline) / n,
                      broker_kb=bed.broker_kb() / n,
                      broker_marginal_kb=(bed.broker_kb() - bed.idle_broker_kb) / n,
                      threads=total(s, "threads"))
        if min_online < n or min_token < n:
            result["why"] = f"during the hold: as few as {min_online}/{n} online, {min_token}/{n} with a token"
        elif len(per_device) < n or min(per_device) < 1:
            result["why"] = "a device did not refresh its token during the hold"
        else:
            result["held"] = True
        if result["held"] and bed.cluster is not None:
            result.update(failover(bed, n, step_dir, sample, total, args.node_stop))
        return result
    finally:
        stop_workers(procs)


def stop_workers(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every worker, SIGKILL whatever is left after 60 s; never raises, so a slow teardown of
    10,000 devices (a loaded machine) cannot lose the step's figures."""
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(max(0.1, deadline - time.monotonic()))
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(30)


def memory_profile(step_dir: Path, stats: list[Path], n: int) -> dict[str, Any]:
    """Ask every worker where its memory is (after the hold) and add them up, per device."""
    files = [s.with_suffix(".memory.json") for s in stats]
    (step_dir / "profile").touch()
    deadline = time.monotonic() + 120
    while not all(f.exists() for f in files) and time.monotonic() < deadline:
        time.sleep(0.2)
    kinds: dict[str, float] = {}
    trimmed: dict[str, float] = {}
    heap: dict[str, float] = {}
    sites: dict[str, list[float]] = {}
    for f in files:
        data = read_json(f) or {}
        for kind, kb in data.get("smaps", {}).items():
            kinds[kind] = kinds.get(kind, 0.0) + kb / n
        for kind, kb in data.get("trimmed", {}).items():
            trimmed[kind] = trimmed.get(kind, 0.0) + kb / n
        for key, kb in data.get("malloc", {}).items():
            heap[key] = heap.get(key, 0.0) + kb / n
        for site in data.get("python", []):
            kb_count = sites.setdefault(site["where"], [0.0, 0.0])
            kb_count[0] += site["kb"] / n
            kb_count[1] += site["count"] / n
    return {"smaps_kb_per_device": kinds, "malloc_kb_per_device": heap, "trimmed_kb_per_device": trimmed,
            "python_kb_per_device": sorted(([w, kb, c] for w, (kb, c) in sites.items()), key=lambda x: -x[1])[:30]}


NODE_STOPS = ("kill", "stop")
NODE_STOP_TIMEOUT = 300.0  # a clean stop closing 2,000 connections on a loaded machine; then SIGKILL, and said


def take_node_down(bed: Bed, how: str) -> dict[str, Any]:
    """Node 1 goes away: `kill` (SIGKILL) at once; `stop` (SIGTERM, which the node's script turns into
    RabbitMQ's clean shutdown, as `rabbitmqctl shutdown` does) in a thread, since the node takes a while to
    close its connections and the bench measures meanwhile. The dict fills in `stopped_s` (and `exit`)
    when the node has exited."""
    if how == "kill":
        bed.cluster.kill_node(0)
        return {"stopped_s": 0.0}
    done: dict[str, Any] = {}
    began = time.monotonic()

    def stop() -> None:
        bed.cluster.stop_node(0, timeout=NODE_STOP_TIMEOUT)
        done["exit"] = bed.cluster.nodes[0].proc.popen.returncode  # -9: it did not stop and was killed
        done["stopped_s"] = time.monotonic() - began

    threading.Thread(target=stop, name="node-stop", daemon=True).start()
    return done


def failover(bed: Bed, n: int, step_dir: Path, sample: Any, total: Any, how: str = "kill") -> dict[str, Any]:
    """Take RabbitMQ node 1 away (`how`: NODE_STOPS) under the held fleet with one outbox message per device
    queued before and one after: how long until every device is online again, when the token service
    answered again, and whether every message reached the observer."""
    import paho.mqtt.client as mqtt

    from agent.tls import client_context
    from hal.keys import TlsKey

    seen: dict[tuple[str, bytes], int] = {}
    lock = threading.Lock()

    def got(client: Any, userdata: Any, msg: Any) -> None:
        with lock:
            key = (msg.topic, bytes(msg.payload))
            seen[key] = seen.get(key, 0) + 1

    observer = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=OBSERVER)
    observer.tls_set_context(client_context(bed.root / "observer" / "device.pem",
                                            TlsKey(str(bed.root / "observer" / "device.key")),
                                            cafile=str(bed.station_dir / "ca.pem")))
    observer.max_inflight_messages_set(1000)
    subscribed = threading.Event()
    observer.on_message = got
    observer.on_subscribe = lambda *a: subscribed.set()
    observer.on_connect = lambda c, *a: c.subscribe("+/fleet", 1)
    observer.connect("localhost", bed.ports[1], keepalive=60)  # on the node that stays
    observer.loop_start()

    def delivered(mark: str) -> int:
        with lock:
            return sum(1 for (_, payload) in seen if payload == mark.encode())

    def wait(what: str, done: Any, timeout: float) -> float | None:
        start = time.monotonic()
        while not done():
            if time.monotonic() - start > timeout:
                print(f"   failover: gave up waiting for {what} after {timeout:.0f} s", flush=True)
                return None
            time.sleep(0.1)
        return time.monotonic() - start

    try:
        if not subscribed.wait(30):
            return {"failover_why": "the observer could not subscribe"}
        (step_dir / "mark-before").touch()
        if wait("the messages queued before the kill", lambda: delivered("before") >= n, 300) is None:
            return {"failover_why": f"only {delivered('before')}/{n} messages before the kill"}
        node_kb = bed.broker_kb()
        on_victim = sum(1 for w in sample() for port in w.get("ports", []) if port == bed.ports[0])
        killed, killed_at = time.monotonic(), time.time()  # before: a session up after this is a new one
        down = take_node_down(bed, how)
        (step_dir / "mark-after").touch()

        def moved(samples: list[dict[str, Any]]) -> list[float]:
            """Seconds from the kill to each session that came up after it."""
            return [t - killed_at for w in samples for t in w.get("up_at", []) if t > killed_at]

        # every device of the dead node has a new session, and all n are online, in reports written after
        # the kill; the figure is the last of those sessions' own start, not when a report showed it
        said = killed
        while time.monotonic() - killed < 600:
            s = sample()
            if (all(w.get("at", 0) > killed_at for w in s) and total(s, "online") >= n
                    and len(moved(s)) >= on_victim):
                break
            if time.monotonic() - said >= 30:  # a run that does not recover says how far it got
                said = time.monotonic()
                print(f"   failover +{said - killed:.0f} s: {total(s, 'online')}/{n} online, {len(moved(s))} new "
                      f"sessions, {total(s, 'token_ok')} with a valid token, "
                      f"{sum(1 for _, t in list(bed.tokens.issued) if t > killed_at)} tokens answered since, "
                      f"{total(s, 'outbox_pending')} outbox messages queued, load {os.getloadavg()[0]:.1f}", flush=True)
            time.sleep(0.1)
        else:
            print("   failover: gave up waiting for every device to be online again after 600 s", flush=True)
        again = moved(s)
        all_online = max(again) if total(s, "online") >= n and len(again) >= on_victim and again else None
        load_online = os.getloadavg()[0]
        all_delivered = wait("every message", lambda: delivered("before") >= n and delivered("after") >= n
                             and total(sample(), "outbox_pending") == 0, 600)
        wait("the node to stop", lambda: "stopped_s" in down, NODE_STOP_TIMEOUT + 30)
        with lock:
            received = sum(seen.values())
            distinct = len(seen)
        # the token service runs in this process: its answers after the node went away, and to how many devices
        answered = [(d, t - killed_at) for d, t in list(bed.tokens.issued) if t > killed_at]
        return {"failover_how": how, "failover_node_stopped_s": down.get("stopped_s"),
                "failover_survivor_log": survivor_log(bed),
                "failover_node_exit": down.get("exit"),
                "failover_token_first_s": min((t for _, t in answered), default=None),
                "failover_token_devices": len({d for d, _ in answered}),
                "failover_dropped": len(again), "failover_on_victim": on_victim,
                "failover_online_s": all_online,
                "failover_delivered_s": None if all_delivered is None else time.monotonic() - killed,
                "failover_load": load_online,
                "failover_lost": 2 * n - distinct, "failover_duplicates": received - distinct,
                "cluster_kb_per_connection": node_kb / n}
    finally:
        observer.disconnect()
        observer.loop_stop()


def survivor_log(bed: Bed) -> dict[str, Any]:
    """What node 2 said about the node loss (its log, written to the cluster's directory): its clean-up of
    the dead node's transient queues, connections closed on a refused publish, and its error lines (crash
    reports are several each). Counts, and only of what the log kept (under a storm RabbitMQ's console log
    drops lines, and says so)."""
    text = bed.cluster.nodes[1].proc.output()
    cleanups = [line.split("] ", 1)[-1] for line in text.splitlines()
                if "transient queues from an old incarnation" in line]
    return {"cleanups": cleanups, "nack_closes": text.count("{mqtt_unexpected_msg,{'basic.nack'"),
            "error_lines": sum(1 for line in text.splitlines() if "[error]" in line),
            "dropped_log": "drop mode" in text}


def table(results: list[dict[str, Any]]) -> str:
    head = (f"{'N':>6} {'held':>5} {'storm s':>8} {'p50 s':>6} {'online s':>9} {'min on':>7} {'refreshes':>9} "
            f"{'RSS MB':>7} {'KB/dev':>7} {'marg KB':>8} {'broker KB':>9} {'CPU%':>5} {'brk%':>5}  note")
    lines = [head, "-" * len(head)]
    for r in results:
        def f(key: str, fmt: str, r: dict[str, Any] = r) -> str:
            return format(r[key], fmt) if key in r else "-"
        lines.append(f"{r['n']:>6} {'yes' if r['held'] else 'NO':>5} {f('storm_s', '8.1f')} {f('storm_p50_s', '6.1f')} "
                     f"{f('online_s', '9.1f')} {f('min_online', '7d')} {f('refreshes', '9d')} {f('rss_mb', '7.0f')} "
                     f"{f('rss_per_device_kb', '7.0f')} {f('marginal_kb', '8.0f')} {f('broker_kb', '9.1f')} "
                     f"{f('agents_cpu', '5.0f')} {f('broker_cpu', '5.0f')}  "
                     f"{r['why']}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", default="50,100,200,400,800,1600", help="fleet sizes to try, in order")
    p.add_argument("--max", type=int, default=1600, help="largest N to try")
    p.add_argument("--hold", type=float, default=20.0,
                   help="seconds each step must stay connected (0: stop once the storm is online)")
    p.add_argument("--settle", type=float, default=180.0, help="seconds to enroll and come online")
    p.add_argument("--token-lifetime", type=float, default=10.0, help="JWT lifetime; refresh at half of it")
    p.add_argument("--per-worker", type=int, default=1000, help="devices per worker process")
    p.add_argument("--station-workers", type=int, default=2)
    p.add_argument("--budget", type=float, default=900.0, help="stop ramping after this many seconds")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs) afterwards")
    p.add_argument("--broker", choices=("mosquitto", "rabbitmq"), default="mosquitto",
                   help="one mosquitto, or a 2-node RabbitMQ cluster with a node taken away after the hold")
    p.add_argument("--node-stop", choices=NODE_STOPS, default="kill",
                   help="with --broker rabbitmq, how node 1 goes away after the hold: kill (SIGKILL, a crash) or "
                        "stop (SIGTERM: RabbitMQ's clean shutdown, as in a rolling restart)")
    p.add_argument("--profile-memory", action="store_true",
                   help="after the hold, print where the workers' memory is per device (kinds of mapping from "
                        "smaps, glibc's mallinfo2)")
    p.add_argument("--pace", type=int, default=0,
                   help="at most this many devices booting at once across the fleet; the next powers on when "
                        "one is online with a token (0: all at once, the storm)")
    p.add_argument("--keepalive", type=int, default=60, help="the devices' MQTT keepalive, seconds")
    p.add_argument("--connect-timeout", type=float, default=20.0, help="the devices' [mqtt] connect_timeout")
    p.add_argument("--backoff", default="0.5,5",
                   help="the devices' [mqtt] backoff_base,backoff_cap in seconds (the bench's 0.5,5 by default; the "
                        "product's defaults, agent/core/defaults.py, are 1,60)")
    p.add_argument("--profile-python", action="store_true",
                   help="with --profile-memory: also the Python allocation sites (tracemalloc, which slows the "
                        "storm and adds its own memory to the figures)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker)
    if 0 < args.hold < args.token_lifetime:
        p.error("--hold must be at least --token-lifetime so every device refreshes during it (0: storm only)")
    try:
        base, cap = (float(x) for x in args.backoff.split(","))
    except ValueError:
        p.error(f"--backoff: expected BASE,CAP in seconds, got {args.backoff!r}")
    if not 0 < base <= cap:
        p.error(f"--backoff: BASE must be > 0 and CAP >= BASE ([mqtt] backoff_base, backoff_cap), got {args.backoff!r}")
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # mosquitto and the workers inherit it
    steps = [n for n in (int(x) for x in args.steps.split(",")) if n <= args.max]
    root = Path(tempfile.mkdtemp(prefix="tether-fleet-"))
    started = time.monotonic()
    results: list[dict[str, Any]] = []
    bed = Bed(root, args.station_workers, args.token_lifetime, args.broker, args.keepalive, args.connect_timeout,
              (base, cap))
    try:
        for n in steps:
            if time.monotonic() - started > args.budget:
                print(f"time budget of {args.budget:.0f} s spent; stopping before N={n}", flush=True)
                break
            print(f"== N={n}: booting, enrolling, connecting, holding {args.hold:.0f} s", flush=True)
            results.append(run_step(bed, n, args, root))
            print(table(results[-1:]).splitlines()[-1], flush=True)
            if not results[-1]["held"]:
                break
    finally:
        bed.stop()
        if not args.keep:
            import shutil

            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"work directory kept: {root}")
    print()
    print(f"fleet on {os.cpu_count()} CPUs, token lifetime {args.token_lifetime:.0f} s, hold {args.hold:.0f} s, "
          f"reconnect backoff {base:g} s doubling to {cap:g} s (full jitter), "
          f"up to {args.per_worker} devices per process, station with {args.station_workers} workers")
    print(table(results))
    held = [r for r in results if r["held"]]
    for r in results:
        if "storm_cpu" in r:
            cpu = r["storm_cpu"]
            print(f"storm N={r['n']}: CPU seconds until the last device enrolled: " +
                  ", ".join(f"{k} {v:.1f}" for k, v in cpu.items()) +
                  f"; sum {sum(cpu.values()):.1f} on {os.cpu_count()} CPUs = at least "
                  f"{sum(cpu.values()) / (os.cpu_count() or 1):.1f} s of wall time")
    for r in results:
        if "failover_online_s" in r or "failover_why" in r:
            def secs(key: str, r: dict[str, Any] = r) -> str:
                return "never" if r.get(key) is None else f"{r[key]:.1f} s"
            how = {"kill": "killed with SIGKILL", "stop": "stopped with SIGTERM"}[args.node_stop]
            exited = ("" if r.get("failover_how") != "stop" else
                      f"; the node exited {secs('failover_node_stopped_s')} after the SIGTERM"
                      + (" (killed: it had not stopped)" if r["failover_node_exit"] == -signal.SIGKILL else ""))
            print(f"failover N={r['n']} ({bed.kind}, node 1 {how}): "
                  + (r["failover_why"] if "failover_why" in r else
                     f"{r['failover_on_victim']} devices on it ({r['failover_dropped']} sessions came up again after "
                     f"it went){exited}, every device online again after "
                     f"{secs('failover_online_s')}, first token answered after {secs('failover_token_first_s')} "
                     f"({r['failover_token_devices']} devices answered since), every outbox message delivered after "
                     f"{secs('failover_delivered_s')}: {r['failover_lost']} lost, {r['failover_duplicates']} "
                     f"duplicates; cluster RSS {r['cluster_kb_per_connection']:.0f} KB per connection "
                     f"(both nodes; {r.get('broker_marginal_kb', 0):.0f} KB above the idle cluster)"), flush=True)
    for r in results:
        if "failover_survivor_log" in r:
            said = r["failover_survivor_log"]
            print(f"node 2's log N={r['n']}: {said['nack_closes']} connections closed on a refused publish "
                  f"(basic.nack), "
                  f"{said['error_lines']} error lines"
                  + (" (the log dropped lines)" if said["dropped_log"] else "")
                  + "".join(f"; {c}" for c in said["cleanups"]))
    for r in results:
        if "load" in r:
            stages = dict(r["load"])
            if "failover_load" in r:
                stages["online again after node 1 went"] = r["failover_load"]
            print(f"load average N={r['n']} (1 min): " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()))
    for r in results:
        if "memory" in r:
            mem = r["memory"]
            def kinds(found: dict[str, float]) -> str:
                return ", ".join(f"{k} {v:.1f}" for k, v in sorted(found.items(), key=lambda kv: -kv[1]) if v >= 0.1)
            print(f"memory N={r['n']}, KB per device by kind of mapping (/proc/<worker>/smaps): "
                  + kinds(mem["smaps_kb_per_device"]))
            print("  the same after malloc_trim(0): " + kinds(mem["trimmed_kb_per_device"]))
            print("  glibc malloc, KB per device (mallinfo2): " + ", ".join(
                f"{k} {v:.1f}" for k, v in mem["malloc_kb_per_device"].items()))
            if mem["python_kb_per_device"]:
                print("  Python allocations per device (tracemalloc, KB, objects):")
            for where, kb, count in mem["python_kb_per_device"]:
                print(f"  {kb:8.2f} {count:7.1f}  {where}")
    print(f"\nlargest N held: {held[-1]['n'] if held else 0}")
    if len(held) >= 2:  # the per-device cost without the fixed cost of interpreters and imports
        a, b = held[-2], held[-1]
        dn = b["n"] - a["n"]
        print(f"memory per device between N={a['n']} and N={b['n']}: agents "
              f"{(b['rss_mb'] - a['rss_mb']) * 1024 / dn:.0f} KB, mosquitto "
              f"{(b['broker_kb'] * b['n'] - a['broker_kb'] * a['n']) / dn:.0f} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
