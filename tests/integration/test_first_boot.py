"""First boot, resumption after kill -9, expiry recovery and renewal, against the real station
(`tether-station serve`) and a mosquitto that trusts the station's CA."""

from __future__ import annotations

import datetime as dt
import json
import random
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from agent.config import load
from agent.identity import DeviceIdentity
from lab.mosquitto import BrokerFiles, Mosquitto
from lab.procs import Proc, wait_until
from provisioning import authority
from provisioning.authority import Issuer
from provisioning.certs import load_certificates, to_pem
from tests.agent_bed import Agent
from tests.conftest import REPO, run_tether, write_config
from tests.station.conftest import RunningStation, start_station, station_cli


@pytest.fixture
def day_station(station_dir: Path) -> Iterator[RunningStation]:
    """A station issuing device certificates that live one day (the shortest station.toml allows)."""
    settings = station_dir / "station.toml"
    settings.write_text(settings.read_text().replace("device_days = 365", "device_days = 1"))
    running = start_station(station_dir)
    yield running
    running.proc.stop()


@pytest.fixture
def station_broker(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Mosquitto]:
    station = request.getfixturevalue("day_station" if "day_station" in request.fixturenames else "station")
    out = tmp_path / "broker-cert"
    station_cli("server-cert", "--dir", str(station.directory), "--dns", "localhost", "--ip", "127.0.0.1",
                "--out", str(out))
    broker = Mosquitto(tmp_path / "broker", BrokerFiles(station.directory / "ca-chain.pem", out / "server.pem",
                                                        out / "server.key")).start()
    yield broker
    broker.stop()


def device_config(tmp_path: Path, station: RunningStation, broker: Mosquitto, device_id: str = "dev-001",
                  port: int | None = None, **sections: dict[str, object]) -> Path:
    """A device of `station` whose endpoint is `broker` (or `port` on localhost, a relay in front of it)."""
    otp_file = tmp_path / f"{device_id}.otp"
    otp_file.write_text(station.otp(device_id) + "\n")
    otp_file.chmod(0o600)
    sections.setdefault("token", {"enabled": False})
    sections.setdefault("mqtt", {"backoff_base": 0.2, "backoff_cap": 1.0, "connect_timeout": 3.0})
    return write_config(tmp_path / device_id, device_id,
                        est={"url": station.url, "ca_file": str(station.ca_file), "otp_file": str(otp_file)},
                        identity={"ca_file": str(station.ca_file)},
                        endpoints={"urls": [f"mqtts://localhost:{port or broker.port}"]}, **sections)


def test_first_boot_enrolls_stores_chain_and_connects(tmp_path: Path, station: RunningStation,
                                                      station_broker: Mosquitto) -> None:
    config = device_config(tmp_path, station, station_broker)
    out = run_tether("check", config=config)
    assert out.returncode == 0, out.stdout + out.stderr
    for step in ("key", "enroll", "connect"):
        assert f"ok   {step}" in out.stdout
    chain = tmp_path / "dev-001" / "state" / "certs" / "chain.pem"
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(station.ca_file), "-untrusted",
                             str(station.directory / "ca-chain.pem"), str(chain)], capture_output=True, text=True,
                            check=False)
    assert verify.returncode == 0, verify.stderr
    assert len(station.rows("dev-001")) == 1
    assert not (tmp_path / "dev-001.otp").exists(), "a spent one-time password is not kept"
    boot = json.loads((tmp_path / "dev-001" / "state" / "boot.json").read_text())
    assert boot["step"] == "ready" and boot["state"] == "done"


def test_first_boot_with_a_tpm_key(tmp_path: Path, station: RunningStation, station_broker: Mosquitto,
                                   softtpm: object) -> None:
    config = device_config(tmp_path, station, station_broker, "dev-tpm",
                           keys={"backend": "tpm", "tcti": "tabrmd:bus_type=session"})
    out = run_tether("check", config=config)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "dev-tpm" / "state" / "keys" / "device.tss2.pem").exists()
    assert len(station.rows("dev-tpm")) == 1


def test_kill_at_random_points_of_first_boot_resumes_without_duplicates(
        tmp_path: Path, station: RunningStation, station_broker: Mosquitto) -> None:
    rng = random.Random(7)
    for n in range(6):
        device_id = f"dev-kill-{n}"
        config = device_config(tmp_path, station, station_broker, device_id)
        proc = Proc("tether-check", [sys.executable, "-m", "agent.cli", "--config", str(config), "check"],
                    tmp_path / f"{device_id}.log", cwd=REPO)
        try:
            proc.popen.wait(rng.uniform(0.05, 0.5))  # somewhere in keygen, CSR, EST, store or connect
        except subprocess.TimeoutExpired:
            proc.kill()
        resumed = run_tether("check", config=config)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        keys = sorted(k.name for k in (tmp_path / device_id / "state" / "keys").glob("*.pem"))
        assert keys == ["device.key.pem"]
        assert DeviceIdentity(load(config)).chain_problems() == []
        assert len(station.rows(device_id)) == 1


def test_expired_certificate_recovers_through_the_bootstrap_path(tmp_path: Path, station: RunningStation,
                                                                 station_broker: Mosquitto) -> None:
    config = device_config(tmp_path, station, station_broker)
    assert run_tether("keygen", config=config).returncode == 0
    identity = DeviceIdentity(load(config))
    # the device slept past its certificate's life: write the expired chain as it would be on disk
    issuing_key = load_pem_private_key((station.directory / "issuing.key").read_bytes(), None)
    ca_chain = load_certificates((station.directory / "ca-chain.pem").read_bytes())
    leaf = authority.device_cert(Issuer(ca_chain[0], issuing_key), identity.keystore.public_key("device"),
                                 "dev-001", "test.tether", not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=3),
                                 lifetime=dt.timedelta(days=1))
    certs = tmp_path / "dev-001" / "state" / "certs"
    certs.mkdir(parents=True)
    (certs / "chain.pem").write_bytes(to_pem([leaf, *ca_chain]))
    out = run_tether("check", "--verbose", config=config)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "expired" in out.stderr and "recovering through the bootstrap path" in out.stderr
    assert identity.chain_problems() == []


class Gate:
    """A TCP relay in front of the broker that admits `admit` connections and then refuses new ones
    (nothing listens on its port) until `open()`; connections already admitted keep working.

    It holds back the session that would prove a renewed pair without touching the one in use: the
    proving attempt meets a refused connection (unreachable, which says nothing about the pair).
    """

    def __init__(self, target: int, admit: int = 1) -> None:
        self.target, self.admit, self.admitted = target, admit, 0
        self.port = 0
        self.listener: socket.socket | None = None
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()

    def start(self) -> Gate:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self.port = listener.getsockname()[1]
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def open(self) -> None:
        """Admit every connection from now on, on the same port."""
        with self.lock:
            self.admit = -1
        self.start()

    def close(self) -> None:
        with self.lock:
            if self.listener is not None:
                self.listener.close()
                self.listener = None
            for sock in self.sockets:
                sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed: nothing listens, so connections are refused
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()  # the broker itself is gone (teardown): the client sees a closed connection
                continue
            with self.lock:
                self.admitted += 1
                self.sockets += [client, upstream]
                full = self.admitted == self.admit
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()
            if full:
                with self.lock:
                    listener.close()
                    self.listener = None
                return

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # either side closed


@pytest.mark.parametrize("new_key", [False, True], ids=["same-key", "new-key"])
def test_renewal_is_promoted_only_after_a_session_with_the_new_pair(
        tmp_path: Path, day_station: RunningStation, station_broker: Mosquitto, new_key: bool) -> None:
    station = day_station
    gate = Gate(station_broker.port, admit=1).start()  # the first session passes; the proving one waits
    # device certificates live 1 day from 60 s before issue: 86330 s before expiry is 10 s after issue
    config = device_config(tmp_path, station, station_broker, port=gate.port,
                           renewal={"threshold": "86330s", "new_key": new_key})
    agent = Agent(config)
    try:
        agent.wait_status(session="online")
        certs = tmp_path / "dev-001" / "state" / "certs"
        chain = (certs / "chain.pem").read_bytes()
        first_serial = json.loads((certs / "chain.json").read_text())["serial"]
        keyfile = tmp_path / "dev-001" / "state" / "keys" / "device.key.pem"
        first_key = keyfile.read_bytes()
        renewal = certs.parent / "renewal.json"

        # renewed and staged, and a session with it tried and held back at least once (a second try began)
        wait_until(lambda: agent.log().count("session: proving the renewed certificate") >= 2, 60,
                   "two attempts to prove the renewed certificate",
                   describe=lambda: f"renewal.json {renewal.read_text() if renewal.exists() else None}; "
                                    f"log:\n{agent.log()[-3000:]}")
        assert json.loads(renewal.read_text())["state"] == "staged"
        assert (certs / "chain.next.pem").exists()
        assert (certs / "chain.pem").read_bytes() == chain, "promoted before any session worked with the new pair"
        assert json.loads((certs / "chain.json").read_text())["serial"] == first_serial
        assert keyfile.read_bytes() == first_key
        assert "renewal: new certificate promoted" not in agent.log()
        assert len(station.rows("dev-001")) == 2

        gate.open()  # the broker is reachable again: the next attempt proves the pair
        wait_until(lambda: json.loads((certs / "chain.json").read_text())["serial"] != first_serial, 60,
                   "the renewed certificate to be promoted",
                   describe=lambda: f"renewal.json {renewal.read_text()}; status.json {agent.status()}")
        agent.wait_status(session="online")
        assert gate.admitted >= 2  # the first session, then the one that proved the new pair
        assert (certs / "chain.pem").read_bytes() != chain
        assert (certs / "chain.prev.pem").read_bytes() == chain
        assert not (certs / "chain.next.pem").exists()
        assert (keyfile.read_bytes() != first_key) is new_key
        wait_until(lambda: "renewal: new certificate promoted" in agent.log(), 10, "the promotion log line")
        identity = DeviceIdentity(load(config))
        assert identity.chain_problems() == []
    finally:
        agent.stop()
        gate.close()


def test_failed_renewal_keeps_the_current_pair_and_retries(tmp_path: Path, day_station: RunningStation,
                                                           station_broker: Mosquitto) -> None:
    station = day_station
    config = device_config(tmp_path, station, station_broker, renewal={"threshold": "86335s", "retry": 1.0})
    agent = Agent(config)
    try:
        agent.wait_status(session="online")
        chain = (tmp_path / "dev-001" / "state" / "certs" / "chain.pem").read_bytes()
        station.proc.stop()  # the station is down when renewal comes due
        renewal = tmp_path / "dev-001" / "state" / "renewal.json"
        wait_until(lambda: renewal.exists() and json.loads(renewal.read_text()).get("error"), 30,
                   "a failed renewal attempt recorded")
        # the log line follows the state write: wait for it rather than race it
        wait_until(lambda: "the current certificate stays in use" in agent.log(), 10, "the renewal failure log line")
        assert (tmp_path / "dev-001" / "state" / "certs" / "chain.pem").read_bytes() == chain
        assert agent.status()["session"] == "online"
    finally:
        agent.stop()
