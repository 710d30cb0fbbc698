"""`tether run` / `tether check` against real mosquitto brokers and a Greengrass-shaped discovery
server: connect, fail over, re-discover after a CA rotation, report handshake refusals, stop cleanly."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.core.events import ACKED, DISCONNECTED, Event
from lab.discovery import DiscoveryServer, greengrass_document
from lab.mosquitto import BrokerFiles, Mosquitto
from lab.procs import wait_until
from tests.agent_bed import Agent, provisioned_device
from tests.conftest import run_tether
from tests.pki import Pki


@pytest.fixture
def agents() -> list[Agent]:
    started: list[Agent] = []
    yield started
    for a in started:
        a.stop()


def start_agent(agents: list[Agent], config: Path) -> Agent:
    agent = Agent(config)
    agents.append(agent)
    return agent


NO_TOKEN = {"enabled": False}
# [est] url set, so the runtime gets its Renewal as `tether run` builds it; the chain is fresh, so
# nothing is ever sent there (the tests stage the renewed pair themselves)
RENEWS = {"url": "https://127.0.0.1:9"}


def test_run_connects_reports_online_and_stops_cleanly(tmp_path: Path, pki: Pki, broker: Mosquitto,
                                                       agents: list[Agent]) -> None:
    config = provisioned_device(tmp_path, pki, endpoints={"urls": [f"mqtts://localhost:{broker.port}"]},
                                token=NO_TOKEN)
    agent = start_agent(agents, config)
    status = agent.wait_status(session="online")
    assert status["endpoint"] == f"mqtts://localhost:{broker.port}"
    assert agent.terminate() == 0
    assert agent.status()["session"] == "stopped"
    # a clean DISCONNECT, not a dropped socket
    wait_until(lambda: "Client dev-001 disconnected." in broker.log(), 5, "the DISCONNECT in the broker log")


def test_fails_over_when_the_active_broker_dies(tmp_path: Path, pki: Pki,
                                               broker_factory: Callable[..., Mosquitto], agents: list[Agent]) -> None:
    a, b = broker_factory("core-a"), broker_factory("core-b")
    config = provisioned_device(tmp_path, pki, token=NO_TOKEN,
                                endpoints={"urls": [f"mqtts://localhost:{a.port}", f"mqtts://localhost:{b.port}"]})
    agent = start_agent(agents, config)
    agent.wait_status(session="online", endpoint=f"mqtts://localhost:{a.port}")
    killed = time.monotonic()
    a.kill()
    agent.wait_status(session="online", endpoint=f"mqtts://localhost:{b.port}", timeout=10)
    assert time.monotonic() - killed < 10
    assert "session: lost" in agent.log()


def test_last_good_endpoint_is_tried_first_on_next_boot(tmp_path: Path, pki: Pki,
                                                        broker_factory: Callable[..., Mosquitto],
                                                        agents: list[Agent]) -> None:
    a, b = broker_factory("core-a"), broker_factory("core-b")
    config = provisioned_device(tmp_path, pki, token=NO_TOKEN,
                                endpoints={"urls": [f"mqtts://localhost:{a.port}", f"mqtts://localhost:{b.port}"]})
    agent = start_agent(agents, config)
    agent.wait_status(session="online", endpoint=f"mqtts://localhost:{a.port}")
    a.kill()
    agent.wait_status(session="online", endpoint=f"mqtts://localhost:{b.port}")
    agent.terminate()
    a.start()  # core A is back, but B worked last
    second = start_agent(agents, config)
    second.wait_status(session="online", endpoint=f"mqtts://localhost:{b.port}")


def test_a_last_good_endpoint_a_drop_in_removed_is_not_dialled(tmp_path: Path, pki: Pki,
                                                               broker_factory: Callable[..., Mosquitto],
                                                               agents: list[Agent]) -> None:
    a, b = broker_factory("core-a"), broker_factory("core-b")
    config = provisioned_device(tmp_path, pki, token=NO_TOKEN, endpoints={"urls": [f"mqtts://localhost:{b.port}",
                                                                                   f"mqtts://localhost:{a.port}"]})
    agent = start_agent(agents, config)
    agent.wait_status(session="online", endpoint=f"mqtts://localhost:{b.port}")
    agent.terminate()
    dropins = config.parent / "config.d"
    dropins.mkdir()
    (dropins / "50-move-off-core-b.toml").write_text(f'[endpoints]\nurls = ["mqtts://localhost:{a.port}"]\n')
    second = start_agent(agents, config)  # core B still runs and worked last, but is no longer configured
    second.wait_status(session="online", endpoint=f"mqtts://localhost:{a.port}")
    assert f"the last good endpoint mqtts://localhost:{b.port} is no longer configured" in second.log()
    assert f"localhost:{b.port}" not in second.log().split("no longer configured", 1)[1]


def test_handshake_refusal_reason_is_logged_and_in_status(tmp_path: Path, pki: Pki, agents: list[Agent]) -> None:
    other = Pki.create(tmp_path / "other-pki", "Other")
    certfile, keyfile = other.server_files("stranger")
    stranger = Mosquitto(tmp_path / "stranger", BrokerFiles(other.ca_chain_file, certfile, keyfile)).start()
    wrong_name_cert, wrong_name_key = pki.server_files("misnamed", dns=("other.example",), ips=())
    misnamed = Mosquitto(tmp_path / "misnamed", BrokerFiles(pki.ca_chain_file, wrong_name_cert, wrong_name_key)).start()
    try:
        config = provisioned_device(tmp_path, pki, token=NO_TOKEN, endpoints={"urls": [
            f"mqtts://localhost:{stranger.port}", f"mqtts://localhost:{misnamed.port}"]})
        agent = start_agent(agents, config)

        def both_reported() -> dict[str, str] | None:
            errors = agent.status().get("endpoint_errors", {})
            return errors if len(errors) == 2 else None
        errors = wait_until(both_reported, 20, "both endpoint errors in status.json",
                            describe=lambda: f"status.json {agent.status()}")
        assert "unknown CA" in errors[f"mqtts://localhost:{stranger.port}"]  # type: ignore[index]
        assert "hostname mismatch" in errors[f"mqtts://localhost:{misnamed.port}"]  # type: ignore[index]
        assert "unknown CA" in agent.log() and "hostname mismatch" in agent.log()
        out = run_tether("status", config=config)
        assert "last error" in out.stdout
    finally:
        stranger.stop()
        misnamed.stop()


def discovery_bed(tmp_path: Path, pki: Pki, document: object) -> DiscoveryServer:
    certfile, keyfile = pki.server_files("discovery")
    return DiscoveryServer(certfile, keyfile, pki.ca_chain_file, document).start()  # type: ignore[arg-type]


def test_discovered_core_is_used_with_the_returned_ca(tmp_path: Path, pki: Pki, broker: Mosquitto,
                                                      agents: list[Agent]) -> None:
    doc = greengrass_document([("127.0.0.1", 1), ("localhost", broker.port)], [pki.root_file.read_text()])
    server = discovery_bed(tmp_path, pki, doc)
    try:
        config = provisioned_device(tmp_path, pki, token=NO_TOKEN, discovery={"url": server.url})
        out = run_tether("check", config=config)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "discovery" in out.stdout and f"mqtts://localhost:{broker.port}" in out.stdout
        assert server.requests == ["dev-001"]
        cached = json.loads((tmp_path / "dev-001" / "state" / "discovery.json").read_text())
        assert cached["GGGroups"][0]["Cores"][1]["Connectivity"][0]["PortNumber"] == broker.port
    finally:
        server.stop()


def test_rediscovers_when_the_broker_ca_rotates(tmp_path: Path, pki: Pki, agents: list[Agent]) -> None:
    old = Pki.create(tmp_path / "core-ca-1", "Core CA 1")
    new = Pki.create(tmp_path / "core-ca-2", "Core CA 2")
    cert, key = old.server_files("core")
    broker = Mosquitto(tmp_path / "core", BrokerFiles(pki.ca_chain_file, cert, key)).start()
    server = discovery_bed(tmp_path, pki, greengrass_document([("localhost", broker.port)],
                                                              [old.root_file.read_text()]))
    try:
        config = provisioned_device(tmp_path, pki, token=NO_TOKEN, discovery={"url": server.url})
        agent = start_agent(agents, config)
        agent.wait_status(session="online")
        # Greengrass rotates the core's CA: new broker certificate, discovery returns the new CA
        broker.stop()
        cert, key = new.server_files("core")
        broker = Mosquitto(tmp_path / "core", BrokerFiles(pki.ca_chain_file, cert, key), port=broker.port).start()
        server.document = greengrass_document([("localhost", broker.port)], [new.root_file.read_text()])
        # "online" may still be the old session's until the agent notices the broker went away: wait for the
        # refusal of the new certificate first (logged after the session was marked lost), then for online
        wait_until(lambda: "no longer verifies" in agent.log(), 20, "the rotated CA to be noticed")
        agent.wait_status(session="online", timeout=20)
        assert len(server.requests) >= 2
    finally:
        server.stop()
        broker.stop()


@pytest.mark.parametrize("body", [
    b"not json", b'{"GGGroups": "x"}', b'{"GGGroups": []}',
    json.dumps({"GGGroups": [{"GGGroupId": "g", "CAs": ["nope"], "Cores": []}]}).encode(),
    b"[" * 100 + b"]" * 100, b" " * (2 << 20),
], ids=["not-json", "groups-not-list", "no-groups", "bad-ca-pem-no-cores", "nested-lists", "huge-body"])
def test_bad_discovery_document_falls_back_to_manual_endpoints(tmp_path: Path, pki: Pki, broker: Mosquitto,
                                                               body: bytes) -> None:
    server = discovery_bed(tmp_path, pki, body)
    try:
        config = provisioned_device(tmp_path, pki, token=NO_TOKEN, discovery={"url": server.url},
                                    endpoints={"urls": [f"mqtts://localhost:{broker.port}"]})
        out = run_tether("check", config=config)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "FAIL  discovery" in out.stdout
        assert "discovery failed" in out.stderr and "using the cached and manual endpoints" in out.stderr
        assert not (tmp_path / "dev-001" / "state" / "discovery.json").exists()
    finally:
        server.stop()


def test_check_fails_with_a_reason_when_nothing_is_reachable(tmp_path: Path, pki: Pki) -> None:
    from lab.procs import refusing_port

    with refusing_port() as port:  # held for the whole test: nothing else can listen there
        config = provisioned_device(tmp_path, pki, token=NO_TOKEN, endpoints={"urls": [f"mqtts://localhost:{port}"]})
        out = run_tether("check", config=config)
    assert out.returncode == 1
    assert "cannot reach" in out.stdout and "FAIL" in out.stdout


def test_mqtt5_session_on_request(tmp_path: Path, pki: Pki, broker: Mosquitto) -> None:
    config = provisioned_device(tmp_path, pki, token=NO_TOKEN, mqtt={"protocol": "5"},
                                endpoints={"urls": [f"mqtts://localhost:{broker.port}"]})
    out = run_tether("check", config=config)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "MQTT 5" in out.stdout
    wait_until(lambda: "(p5, c1" in broker.log(), 5, "an MQTT 5 CONNECT in the broker log")


def test_unreachable_discovery_server_falls_back_to_the_cached_document(tmp_path: Path, pki: Pki,
                                                                        broker: Mosquitto) -> None:
    doc = greengrass_document([("localhost", broker.port)], [pki.root_file.read_text()])
    server = discovery_bed(tmp_path, pki, doc)
    config = provisioned_device(tmp_path, pki, token=NO_TOKEN, discovery={"url": server.url, "timeout": 2.0})
    try:
        assert run_tether("check", config=config).returncode == 0  # caches the document
    finally:
        server.stop()
    offline = run_tether("check", config=config)  # the discovery server is gone: an offline boot
    assert offline.returncode == 0, offline.stdout + offline.stderr
    assert "FAIL  discovery" in offline.stdout and f"mqtts://localhost:{broker.port}" in offline.stdout


def test_stalled_discovery_server_times_out_and_falls_back(tmp_path: Path, pki: Pki, broker: Mosquitto) -> None:
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # accepts TCP, never answers TLS: a misbehaving server
    try:
        config = provisioned_device(tmp_path, pki, token=NO_TOKEN,
                                    discovery={"url": f"https://localhost:{silent.getsockname()[1]}", "timeout": 1.0},
                                    endpoints={"urls": [f"mqtts://localhost:{broker.port}"]})
        out = run_tether("check", config=config)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "timed out" in out.stderr
    finally:
        silent.close()


# -- the Runtime in-process, against real brokers: the supervisor's decisions with real sockets ----------
class InProcess:
    """A `Runtime` running its control loop in a thread of the test process."""

    def __init__(self, config: Path) -> None:
        import threading

        from agent.compose import build
        from agent.config import load

        self.runtime = build(load(config))  # as `tether run` builds it: renewal when [est] url is set
        self.result: list[int] = []
        self.thread = threading.Thread(target=lambda: self.result.append(self.runtime.run()), daemon=True)

    def __enter__(self) -> InProcess:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.runtime.stop()
        self.thread.join(15)
        assert not self.thread.is_alive(), "the control loop did not stop"

    def status(self) -> dict:
        path = Path(self.runtime.config.state_dir) / "status.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def wait_status(self, timeout: float = 20.0, **expected: object) -> dict:
        return wait_until(lambda: (s := self.status()) and all(s.get(k) == v for k, v in expected.items()) and s,
                          timeout, f"status {expected}", describe=lambda: f"status.json {self.status()}")


def stage(config: Path, chain: list) -> bytes:
    """Put a renewed chain beside the current one as a renewal would (renewal.json: staged)."""
    from provisioning.certs import to_pem

    state = config.parent / "state"
    data = to_pem(chain)
    (state / "certs" / "chain.next.pem").write_bytes(data)
    (state / "renewal.json").write_text(json.dumps({"state": "staged", "key": "device"}))
    return data


def test_in_process_runtime_fails_over_between_real_brokers(tmp_path: Path, pki: Pki,
                                                            broker_factory: Callable[..., Mosquitto]) -> None:
    a, b = broker_factory("core-a"), broker_factory("core-b")
    config = provisioned_device(tmp_path, pki, token=NO_TOKEN,
                                endpoints={"urls": [f"mqtts://localhost:{a.port}", f"mqtts://localhost:{b.port}"]})
    with InProcess(config) as agent:
        agent.wait_status(session="online", endpoint=f"mqtts://localhost:{a.port}")
        supervisor = agent.runtime.supervisor
        assert supervisor is not None
        on_a = supervisor.epoch
        a.kill()
        agent.wait_status(session="online", endpoint=f"mqtts://localhost:{b.port}")
        on_b = supervisor.epoch
        assert on_b > on_a
        # Late news of a's dead session (its close, a PUBACK) must be dropped, not end b's session: b's
        # packet ids restart at 1, so a stale acknowledgement would otherwise pass for one of b's.
        dropped = supervisor.dropped
        agent.runtime.post(Event(DISCONNECTED, on_a, "a's connection closed late"))
        agent.runtime.post(Event(ACKED, on_a, 1))
        wait_until(lambda: supervisor.dropped >= dropped + 2, 10, "the two stale events to be dropped",
                   describe=lambda: f"dropped {supervisor.dropped}, state {supervisor.state}, status {agent.status()}")
        assert supervisor.epoch == on_b and supervisor.state == "online"
        assert agent.status()["session"] == "online" and agent.status()["endpoint"] == f"mqtts://localhost:{b.port}"
    assert agent.result == [0]


def test_renewed_pair_the_broker_refuses_is_never_promoted_and_the_old_pair_keeps_working(
        tmp_path: Path, pki: Pki, broker: Mosquitto) -> None:
    from agent.config import load
    from agent.identity import DeviceIdentity

    config = provisioned_device(tmp_path, pki, token=NO_TOKEN, est=RENEWS,
                                endpoints={"urls": [f"mqtts://localhost:{broker.port}"]})
    certs = tmp_path / "dev-001" / "state" / "certs"
    current = (certs / "chain.pem").read_bytes()
    # a renewed chain from a CA the broker does not trust: a session with it is refused
    stranger = Pki.create(tmp_path / "stranger", name="Stranger")
    identity = DeviceIdentity(load(config))
    stage(config, stranger.device_chain(identity.keystore.public_key("device"), "dev-001"))
    with InProcess(config) as agent:
        agent.wait_status(session="online")
        renewal = json.loads((tmp_path / "dev-001" / "state" / "renewal.json").read_text())
    assert (certs / "chain.pem").read_bytes() == current  # promoting at staging would have replaced it
    assert not (certs / "chain.next.pem").exists()
    assert renewal["state"] == "idle"
    assert "the renewed certificate did not establish a session" in renewal["error"]
    assert agent.result == [0]


def test_renewed_pair_is_promoted_only_once_a_session_with_it_is_up(tmp_path: Path, pki: Pki,
                                                                    broker: Mosquitto) -> None:
    from agent.config import load
    from agent.identity import DeviceIdentity

    config = provisioned_device(tmp_path, pki, token=NO_TOKEN, est=RENEWS,
                                endpoints={"urls": [f"mqtts://localhost:{broker.port}"]})
    certs = tmp_path / "dev-001" / "state" / "certs"
    identity = DeviceIdentity(load(config))
    renewed = stage(config, pki.device_chain(identity.keystore.public_key("device"), "dev-001"))
    seen: list[tuple[bool, bool]] = []
    agent = InProcess(config)
    rt = agent.runtime
    assert rt.renewal is not None
    proven = rt.renewal.proven

    def watching() -> None:  # what held when the runtime promoted: a live session with the new pair?
        seen.append((rt.session is not None and rt.session.client.is_connected(),
                     (certs / "chain.pem").read_bytes() != renewed))
        proven()

    rt.renewal.proven = watching
    with agent:
        agent.wait_status(session="online")
        assert rt.supervisor is not None and rt.supervisor.online()
    assert seen == [(True, True)]
    assert (certs / "chain.pem").read_bytes() == renewed
    assert json.loads((certs / "chain.json").read_text())["serial"] != ""


def test_an_idle_session_pings_and_notices_a_frozen_broker(tmp_path: Path, pki: Pki,
                                                           broker_factory: Callable[..., Mosquitto],
                                                           agents: list[Agent]) -> None:
    # The network thread sleeps until traffic, a queued packet or its next keepalive look: the pings
    # must still go out on time while nothing else happens, and an unanswered ping (a broker that is
    # alive but frozen, so no socket closes) must end the session and fail over.
    a = broker_factory("core-a", extra="log_type debug")
    b = broker_factory("core-b")
    config = provisioned_device(tmp_path, pki, token=NO_TOKEN, mqtt={"keepalive": 5},
                                endpoints={"urls": [f"mqtts://localhost:{a.port}", f"mqtts://localhost:{b.port}"]})
    agent = start_agent(agents, config)
    online = agent.wait_status(session="online", endpoint=f"mqtts://localhost:{a.port}")
    wait_until(lambda: a.log().count("Received PINGREQ from dev-001") >= 2, 30,
               "two keepalive pings from the idle agent")
    assert agent.status()["connected_at"] == online["connected_at"], "the idle session was dropped and reopened"
    assert "exceeded timeout" not in a.log(), a.log()
    assert a.proc is not None
    os.kill(a.proc.pid, signal.SIGSTOP)
    try:
        agent.wait_status(session="online", endpoint=f"mqtts://localhost:{b.port}", timeout=40)
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)


def test_a_boot_retry_waits_the_backoff_even_when_the_clock_moves_between_reads(tmp_path: Path) -> None:
    """The delay before the next boot attempt is the backoff's, measured from one reading of the clock: a
    clock that moved between two readings once gave a negative delay ('retrying in -49.0 s') and a retry
    with no wait at all."""
    import threading

    from agent.compose import build
    from agent.config import load
    from tests.conftest import write_config

    otp = tmp_path / "otp"
    tmp_path.mkdir(exist_ok=True)
    otp.write_text("secret-otp-123456\n")
    otp.chmod(0o600)
    config = write_config(tmp_path, est={"url": "https://127.0.0.1:9", "otp_file": str(otp)},
                          mqtt={"backoff_base": 2, "backoff_cap": 2},
                          endpoints={"urls": ["mqtts://127.0.0.1:9"]})
    runtime = build(load(config))
    now = [1000.0]

    def clock() -> float:  # every reading is 50 s after the one before it
        now[0] += 50
        return now[0]

    waits: list[float | None] = []

    class StopAfterOneWait(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            waits.append(timeout)
            self.set()
            return True

    runtime.clock = clock
    runtime.loop.stopping = StopAfterOneWait()
    assert runtime.boot() is False  # the station's port is closed: a retryable failure, then stopped
    assert len(waits) == 1 and waits[0] is not None
    assert 0 < waits[0] <= 2, f"boot retry waited {waits[0]} s; the backoff is at most 2 s"
