"""The firmware on a real network: MicroPython's unix port (mbedTLS, sockets, an enforced heap)
against the lab's mosquitto brokers with mTLS and per-device ACLs, deployed as a board runs it:
the .mpy files ``firmware/build.py`` writes on the PyPI port, and the firmware frozen into a 32-bit
build of the vendored source (conftest's ``deploy``). The full cycle also runs on every deployment
(frozen 64-bit and the ROMFS image too) at its budget heap, unix_port.HEAPSIZE.

Every wait polls the board's ``tether: <event>`` lines with a generous deadline; the figures
(heap high-water mark, reconnect time after kill -9) are printed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab.core import Lab, LabSettings, station_cli
from lab.mosquitto import BrokerFiles, Mosquitto
from lab.procs import wait_until
from tests.firmware import unix_port
from tests.firmware.unix_port import Board, Deployment, port_of

pytestmark = pytest.mark.broker

TOKEN_LIFETIME = 6.0  # refresh at 3 s: the half-life refresh happens inside a test


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with Lab(tmp_path / "lab", LabSettings(brokers=2, token_lifetime=TOKEN_LIFETIME)) as running:
        yield running


def board_config(lab: Lab, device_id: str, endpoints: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    config = {"device_id": device_id, "endpoints": endpoints or lab.broker_urls, "topic_prefix": device_id,
              "client_id_prefix": "", "keepalive": 4, "heartbeat_interval": 2, "token_timeout": 5,
              "backoff_base": 1, "backoff_cap": 2, "connect_timeout": 3, "heap_report": True}
    config.update(extra)
    return config


def start_board(lab: Lab, tmp_path: Path, deploy: Deployment, device_id: str, **config: Any) -> Board:
    creds = unix_port.issue_der(lab, device_id, tmp_path / f"{device_id}-creds")
    root = deploy.board_dir(tmp_path / device_id, creds, board_config(lab, device_id, **config))
    return deploy.board(root)


def broker_index(lab: Lab, url: str) -> int:
    return [b.port for b in lab.brokers].index(port_of(url))


class Watcher:
    """A subscriber with the lab's OTA service identity (allowed everywhere by the ACL)."""

    def __init__(self, lab: Lab, broker: Mosquitto, topic: str) -> None:
        import paho.mqtt.client as mqtt

        from agent.tls import client_context
        from hal.keys import TlsKey
        from lab.ota import OTA_SERVICE

        certfile, keyfile = lab._service_cert(OTA_SERVICE)
        self.messages: list[bytes] = []
        self.subscribed = False
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=OTA_SERVICE)
        self.client.tls_set_context(client_context(certfile, TlsKey(str(keyfile)), cafile=str(lab.ca_file)))
        self.client.on_connect = lambda c, u, f, rc, p=None: c.subscribe(topic, 1)
        self.client.on_subscribe = lambda *a: setattr(self, "subscribed", True)
        self.client.on_message = lambda c, u, m: self.messages.append(m.payload)
        self.client.connect("localhost", broker.port, keepalive=30)
        self.client.loop_start()
        wait_until(lambda: self.subscribed, 15, f"subscription to {topic}")

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.parametrize("name", unix_port.DEPLOYMENTS)
def test_board_connects_gets_a_token_refreshes_at_half_life_and_sends_heartbeats(
        lab: Lab, tmp_path: Path, deployments: Any, name: str) -> None:
    # at the deployment's budget heap: the cycle completing there is what holds the budget
    deploy = deployments(name)
    watchers = [Watcher(lab, b, "fw-cycle/s/us") for b in lab.brokers]
    board = start_board(lab, tmp_path, deploy, "fw-cycle")
    try:
        ready = board.wait_event("ready", 30)[0][1]
        first, _ = board.wait_event("token", 30, count=2)
        refresh_at = float(first[1].split()[0].split("=")[1])
        expires_at = float(first[1].split()[1].split("=")[1])
        requests = [float(d) for _, d in board.events("token_requested")]
        # the second request comes at half life, not before it and not after expiry
        assert refresh_at <= requests[1] < expires_at, (first, requests)
        served = lab.token_services[broker_index(lab, ready)].requests_from("fw-cycle")
        assert len(served) >= 2
        heartbeats = wait_until(lambda: [m for w in watchers for m in w.messages], 20, "a heartbeat at the broker")
        assert heartbeats[0].startswith(b"117,")  # type: ignore[index]
        board.wait_event("published", 20)  # the broker acknowledged the QoS 1 heartbeat
        peak = board.heap_peak()
        print(f"{name}: heap high-water mark over connect, token, refresh, heartbeats at -X heapsize="
              f"{deploy.heapsize}: {peak} bytes")
        assert board.proc.poll() is None
    finally:
        board.stop()
        for w in watchers:
            w.stop()


def test_board_fails_over_when_its_broker_is_killed(lab: Lab, tmp_path: Path, deploy: Deployment) -> None:
    board = start_board(lab, tmp_path, deploy, "fw-kill")
    try:
        first = board.wait_event("ready", 30)[0][1]
        board.wait_event("token", 30)
        killed = time.monotonic()
        lab.brokers[broker_index(lab, first)].kill()
        t_ready, second = board.wait_event("ready", 60, since=killed)[0]
        assert second != first
        board.wait_event("disconnected", 1, since=killed)
        board.wait_event("token", 30, since=t_ready)
        print(f"reconnect time after kill -9 of the broker: {t_ready - killed:.2f} s")
        assert t_ready - killed < 30
    finally:
        board.stop()


def test_board_reconnects_when_its_only_broker_restarts(lab: Lab, tmp_path: Path, deploy: Deployment) -> None:
    only = lab.broker_urls[0]
    board = start_board(lab, tmp_path, deploy, "fw-restart", endpoints=[only])
    try:
        board.wait_event("token", 30)
        restarted = time.monotonic()
        lab.restart_broker(0)
        board.wait_event("disconnected", 30, since=restarted)
        t_ready, again = board.wait_event("ready", 60, since=restarted)[0]
        assert again == only
        board.wait_event("token", 60, since=t_ready)
    finally:
        board.stop()


def test_board_leaves_a_stalled_broker_and_returns_when_it_resumes(
        lab: Lab, tmp_path: Path, deploy: Deployment) -> None:
    # heartbeats rarer than keepalive, so a PINGREQ goes out and its missing answer is noticed
    board = start_board(lab, tmp_path, deploy, "fw-stall", heartbeat_interval=60)
    stalled = None
    try:
        first = board.wait_event("ready", 30)[0][1]
        board.wait_event("token", 30)
        a = lab.brokers[broker_index(lab, first)]
        b = lab.brokers[1 - broker_index(lab, first)]
        assert a.proc is not None
        stalled = a.proc.pid
        t_stop = time.monotonic()
        os.kill(stalled, signal.SIGSTOP)
        lost = board.wait_event("disconnected", 60, since=t_stop)[0][1]
        assert "PINGRESP" in lost
        board.wait_event("ready", 60, since=t_stop, match=b.url.rsplit(":", 1)[1])
        # with the other broker gone too, the stalled one costs a handshake deadline, not a hang
        t_kill = time.monotonic()
        b.kill()
        board.wait_event("connect_failed", 60, since=t_kill, match="timeout")
        os.kill(stalled, signal.SIGCONT)
        stalled = None
        t_cont = time.monotonic()
        board.wait_event("ready", 60, since=t_cont, match=str(a.port))
        board.wait_event("token", 60, since=t_cont)
    finally:
        if stalled is not None:
            os.kill(stalled, signal.SIGCONT)
        board.stop()


def _another_ca(out: Path) -> Path:
    """The root of another station: DER, well-formed, and not the one that signs the brokers."""
    station_cli("init", "--dir", str(out / "station"), "--trust-domain", "other.test")
    station_cli("issue", "stranger", "--format", "der", "--out", str(out / "creds"), "--dir", str(out / "station"))
    return out / "creds" / "ca.crt.der"


def test_board_with_the_wrong_ca_refuses_every_broker_and_keeps_trying(
        lab: Lab, tmp_path: Path, deploy: Deployment) -> None:
    creds = unix_port.issue_der(lab, "fw-wrong-ca", tmp_path / "creds")
    (creds / "ca.crt.der").write_bytes(_another_ca(tmp_path / "other").read_bytes())
    root = deploy.board_dir(tmp_path / "board", creds, board_config(lab, "fw-wrong-ca"))
    with deploy.board(root) as board:
        failures = board.wait_event("connect_failed", 60, count=3)
        assert all("verify:" in detail and "not correctly signed" in detail for _, detail in failures), failures
        board.wait_event("round_failed", 30)
        board.wait_event("backoff", 30)
        assert not board.events("ready")
        assert board.proc.poll() is None  # no crash: it goes on trying


def test_board_refuses_a_broker_whose_certificate_names_another_host(
        lab: Lab, tmp_path: Path, deploy: Deployment) -> None:
    out = tmp_path / "impostor"
    station_cli("server-cert", "--dns", "broker.invalid", "--cn", "impostor", "--out", str(out),
                *lab.station_args())
    files = BrokerFiles(lab.ca_chain_file, out / "server.pem", out / "server.key")
    with Mosquitto(tmp_path / "impostor-broker", files, name="impostor") as impostor:
        url = impostor.url.replace("127.0.0.1", "localhost")
        with start_board(lab, tmp_path, deploy, "fw-wrong-host", endpoints=[url]) as board:
            failure = board.wait_event("connect_failed", 60)[0][1]
            assert "verify:" in failure and "CN" in failure, failure
            board.wait_event("backoff", 30)
            board.wait_event("connect_failed", 30, count=2)
            assert not board.events("ready")
            assert board.proc.poll() is None


def test_board_with_another_devices_key_stops_with_one_line(lab: Lab, tmp_path: Path, deploy: Deployment) -> None:
    creds = unix_port.issue_der(lab, "fw-key", tmp_path / "creds")
    other = unix_port.issue_der(lab, "fw-key-other", tmp_path / "other")
    (creds / "device.key.der").write_bytes((other / "device.key.der").read_bytes())
    root = deploy.board_dir(tmp_path / "board", creds, board_config(lab, "fw-key"))
    board = deploy.board(root)
    assert board.wait_exit(30) == 0
    assert board.output().splitlines() == [
        "tether: cannot start: ./device.key.der: not the key of device.crt.der (its public key is not in the "
        "certificate); copy both from the same `tether-station issue`"]


def test_boot_path_is_the_build_directory_alone(tmp_path: Path) -> None:
    # what `python firmware/build.py` writes is what gets copied: main.py is the only source file
    build_out = unix_port.build(tmp_path / "build")
    files = sorted(str(p.relative_to(build_out)) for p in build_out.rglob("*") if p.is_file())
    assert "main.py" in files and "tether_main.mpy" in files
    assert [f for f in files if f.endswith(".py")] == ["main.py"]
    assert "import tether_main" in (build_out / "main.py").read_text()


def test_main_stub_starts_the_compiled_agent(tmp_path: Path, deploy: Deployment) -> None:
    # no tether.json: the agent (tether_main.mpy, or frozen) says so in one line; nothing from the
    # repo is on its path
    root = deploy.board_dir(tmp_path / "board", tmp_path / "none", {})
    (root / "tether.json").unlink()
    board = deploy.board(root)
    assert board.wait_exit(30) == 0
    assert board.output().splitlines() == [
        "tether: cannot start: tether.json: missing; write it with at least device_id and endpoints "
        "(docs/firmware.md)"]


def test_unix_port_is_the_pinned_micropython() -> None:
    unix_port.check_port()
    done = subprocess.run([*unix_port.micropython_argv("64K", "-c"), "import sys; print(sys.implementation.name)"],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.stdout.strip() == "micropython", done.stdout + done.stderr


WHERE = {"mpy-64": "tether_main.mpy", "frozen-32": "tether_main.py", "frozen-64": "tether_main.py",
         "romfs-64": "/rom/tether_main.mpy", "romfs-32": "/rom/tether_main.mpy"}


@pytest.mark.parametrize("name", unix_port.DEPLOYMENTS)
def test_each_deployment_runs_the_firmware_from_where_a_board_does(
        tmp_path: Path, deployments: Any, name: str) -> None:
    # frozen: from the image (a frozen module's __file__ is its bare name and it is not on the
    # filesystem); ROMFS: from the image mounted at /rom; .mpy: from the filesystem
    deploy = deployments(name)
    root = deploy.board_dir(tmp_path / "board", tmp_path / "none", {})
    script = "import sys, tether_main, os; print(tether_main.__file__, sys.maxsize > 2**32, os.listdir('.'))"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([*deploy.argv(deploy.heapsize, "-c"), script], cwd=root, capture_output=True, text=True,
                          timeout=30, check=False, env={**env, **deploy.env(), "MICROPYPATH": ".frozen"})
    where, wide, listing = done.stdout.split(" ", 2)
    assert where == WHERE[name], done.stdout + done.stderr
    assert wide == ("False" if name.endswith("-32") else "True")
    assert ("tether_main.mpy" in listing) is (name == "mpy-64")


def test_a_stale_mpy_on_the_filesystem_shadows_the_romfs_image(tmp_path: Path, deployments: Any) -> None:
    # what docs/firmware.md warns of when switching a board from .mpy files to ROMFS: '' (the
    # filesystem) comes before /rom on sys.path, so a leftover tether_main.mpy is what runs
    deploy = deployments("romfs-64")
    root = deploy.board_dir(tmp_path / "board", tmp_path / "none", {})
    stale = unix_port.build(tmp_path / "old-mpy-build")
    (root / "tether_main.mpy").write_bytes((stale / "tether_main.mpy").read_bytes())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    script = "import sys, tether_main; print(tether_main.__file__, sys.path)"
    done = subprocess.run([*deploy.argv(deploy.heapsize, "-c"), script], cwd=root, capture_output=True,
                          text=True, timeout=30, check=False,
                          env={**env, **deploy.env(), "MICROPYPATH": ".frozen"})
    assert done.stdout.startswith("tether_main.mpy "), done.stdout + done.stderr
    assert done.stdout.index("'/rom'") > done.stdout.index("''"), done.stdout
