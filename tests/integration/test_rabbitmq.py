"""Issue 26 item 3: RabbitMQ as the devices' broker cluster, against the real thing.

`Lab(broker="rabbitmq")` starts a 2-node cluster from Debian's `rabbitmq-server` 3.10 (`rabbitmq_mqtt`,
mTLS with `ssl_cert_login`) on loopback, with its own node names, ports, cookie and epmd, and the lab's
`rabbitmq_auth_backend_http` answers (lab/rabbitauth.py). Devices are real `tether run` processes that
enroll at the real station. One cluster serves the whole module (a node boots in 10-30 s); the test
that stops a node runs last.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from agent.tls import client_context
from hal.keys import TlsKey
from lab.core import Lab, LabSettings, station_cli
from lab.procs import port_open, wait_until
from lab.rabbitmq import RABBITMQ_SERVER
from tests.agent_bed import Agent

pytestmark = pytest.mark.broker


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if not Path(RABBITMQ_SERVER).exists():
        pytest.fail("rabbitmq-server is not installed: run scripts/install-deps.sh (CI does)", pytrace=False)
    with Lab(tmp_path_factory.mktemp("rabbit") / "lab", LabSettings(brokers=2, broker="rabbitmq",
                                                                    token_lifetime=600)) as running:
        yield running


def test_the_debian_package_left_no_system_node_or_epmd_running(lab: Lab) -> None:
    """scripts/install-deps.sh keeps rabbitmq-server's service and epmd from starting: nothing holds
    RabbitMQ's or epmd's standard ports, and the lab's epmd and nodes listen on loopback ports of their own."""
    for port in (4369, 5672, 25672):
        assert not port_open("127.0.0.1", port), f"something listens on {port}: a system RabbitMQ or epmd?"
    assert lab.cluster.epmd_port not in (0, 4369) and port_open("127.0.0.1", lab.cluster.epmd_port)


@dataclass
class Client:
    """A paho client with some identity's certificate, and what it was told."""

    client: Any
    connack: list[Any] = field(default_factory=list)
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    suback: list[Any] = field(default_factory=list)
    disconnected: threading.Event = field(default_factory=threading.Event)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def credentials(lab: Lab, name: str) -> tuple[Path, Path]:
    """A certificate and key the station issued for `name` (a device, or a reserved service id)."""
    out = lab.dir / "issued" / name
    if not (out / "device.pem").exists():
        service = ["--service"] if name in lab.services else []
        station_cli("issue", name, *service, "--format", "pem", "--out", str(out), *lab.station_args())
    return out / "device.pem", out / "device.key"


def connect(lab: Lab, name: str, node: int = 0, client_id: str | None = None, username: str | None = None,
            password: str | None = None) -> Client:
    """Connect as `name` (its certificate) to `node`; waits for the CONNACK, whatever it says."""
    certfile, keyfile = credentials(lab, name)
    paho = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or name)
    paho.tls_set_context(client_context(certfile, TlsKey(str(keyfile)), cafile=str(lab.ca_file)))
    if username is not None:
        paho.username_pw_set(username, password)
    c = Client(paho)
    paho.on_connect = lambda cl, u, flags, rc, props=None: c.connack.append(rc)
    paho.on_message = lambda cl, u, msg: c.messages.append((msg.topic, bytes(msg.payload)))
    paho.on_subscribe = lambda cl, u, mid, codes, props=None: c.suback.append(list(codes))
    paho.on_disconnect = lambda *a: c.disconnected.set()
    port = int(lab.broker_urls[node].rsplit(":", 1)[1])
    paho.reconnect_delay_set(60, 60)  # a refused client must not come back during the test
    paho.connect("localhost", port, keepalive=30)
    paho.loop_start()
    wait_until(lambda: c.connack or c.disconnected.is_set(), 30, f"CONNACK for {name}")
    return c


def refused(c: Client) -> bool:
    return bool(c.connack) and c.connack[0].is_failure


@pytest.fixture(scope="module")
def device(lab: Lab) -> Iterator[Agent]:
    """A lab device running `tether run` on the cluster, online with a token."""
    agent = Agent(lab.device("rmq-dev-a"))
    try:
        agent.wait_status(session="online", timeout=90)
        wait_until(lambda: (agent.status().get("token") or {}).get("present"), 60, "a token for rmq-dev-a",
                   describe=lambda: f"status.json {agent.status()}")
        yield agent
    finally:
        agent.stop()


def test_a_device_enrolls_connects_with_its_certificate_and_gets_a_token(lab: Lab, device: Agent) -> None:
    status = device.status()
    assert status["session"] == "online" and status["endpoint"].startswith("mqtts://")
    assert lab.tokens.requests_from("rmq-dev-a")
    assert not lab.auth.denied("topic", "rmq-dev-a") and not lab.auth.denied("user", "rmq-dev-a")


def test_the_service_identities_are_checked_in_the_node_and_never_over_http(lab: Lab, device: Agent) -> None:
    """The service identities are the nodes' internal users (lab/rabbitmq.py SERVICE_BACKEND): the token
    service's login, its subscription and every answer it published to a device's `s/dat` (a topic check
    per routing key) were answered in the node, none by the lab's HTTP server, which a 4,000-device storm
    kept busy (issue 26); the device's own questions still go there."""
    probe = connect(lab, "tether-ota-service", node=1, client_id="tether-ota-service-probe")
    try:
        assert not refused(probe), probe.connack
        probe.client.subscribe("rmq-dev-a/s/#", 0)
        wait_until(lambda: probe.suback, 30, "SUBACK for the OTA service")
        probe.client.publish("rmq-dev-a/s/ds", b"511,probe", qos=1).wait_for_publish(30)
        wait_until(lambda: probe.messages, 30, "the OTA service's own publish back")
    finally:
        probe.stop()
    assert probe.suback[0][0].value == 0 and probe.messages == [("rmq-dev-a/s/ds", b"511,probe")]
    assert lab.tokens.requests_from("rmq-dev-a")
    asked = {(q, fields.get("username")) for q, fields, _ in lab.auth.answers}
    assert {(q, u) for q, u in asked if u in lab.services} == set()
    assert ("topic", "rmq-dev-a") in asked and ("user", "rmq-dev-a") in asked


def test_a_service_identity_declares_only_its_own_session_queue(lab: Lab) -> None:
    """The internal users' permissions (lab/rabbitmq.py service_definitions) cover the exchange and the
    service's own `mqtt-subscription-<id>[-suffix]` queues: a subscription under another client id is
    refused (RabbitMQ closes the connection) and no queue of that name is made."""
    squatter = connect(lab, "tether-ota-service", node=0, client_id="rmq-nobody")
    try:
        squatter.client.subscribe("rmq-nobody/s/#", 0)
        wait_until(squatter.disconnected.is_set, 30, "the broker to close the squatter's connection")
    finally:
        squatter.stop()
    assert not squatter.suback or squatter.suback[0][0].is_failure, squatter.suback
    assert not [name for name in lab.cluster.queues(0) if "rmq-nobody" in name]


def test_a_password_login_as_a_service_identity_is_refused(lab: Lab) -> None:
    """The internal users have no password: a CONNECT naming a service with any password is refused."""
    for password in ("x", ""):
        impostor = connect(lab, "rmq-dev-b", client_id="tether-token-service-x", username="tether-token-service",
                           password=password)
        impostor.stop()
        assert refused(impostor), (password, impostor.connack)



def test_rabbitmqs_default_guest_user_does_not_exist_so_guest_guest_is_refused(lab: Lab) -> None:
    """The internal backend answers first and the plugin prefers CONNECT's user name and password to the
    certificate: a `guest` user (RabbitMQ's default, `.*` on everything) would let any certificate holder
    read every device's topics. The nodes load the lab's definitions at boot and create no default user."""
    impostor = connect(lab, "rmq-dev-b", client_id="rmq-dev-b", username="guest", password="guest")
    impostor.stop()
    assert refused(impostor), impostor.connack

def test_another_device_subscribed_first_cannot_read_a_token_issued_after(lab: Lab) -> None:
    """Each subscription outside its own topics is refused (RabbitMQ then closes the connection), so
    nothing of the victim's token reaches the thief."""
    thieves: list[Client] = []
    victim = None
    try:
        for topic, key in (("rmq-victim/s/dat", "rmq-victim.s.dat"), ("+/s/dat", "*.s.dat"), ("#", "#")):
            thief = connect(lab, "rmq-thief", node=len(thieves) % 2)
            thieves.append(thief)
            assert not refused(thief), thief.connack
            thief.client.subscribe(topic, 1)
            wait_until(lambda key=key: key in {f["routing_key"] for f in lab.auth.denied("topic", "rmq-thief")},
                       30, f"the broker to refuse rmq-thief's subscription to {topic}")
        victim = Agent(lab.device("rmq-victim"))
        victim.wait_status(session="online", timeout=90)
        wait_until(lambda: (victim.status().get("token") or {}).get("present"), 60, "the victim's token")
    finally:
        for thief in thieves:
            thief.stop()
        if victim is not None:
            victim.stop()
    assert lab.tokens.requests_from("rmq-victim")
    assert not [t.messages for t in thieves if t.messages]


def test_a_device_cannot_publish_into_another_devices_topics(lab: Lab, device: Agent) -> None:
    intruder = connect(lab, "rmq-dev-c")
    try:
        intruder.client.publish("rmq-dev-a/s/ds", b"510", qos=1)
        wait_until(lambda: lab.auth.denied("topic", "rmq-dev-c"), 30, "the publish to be refused")
    finally:
        intruder.stop()
    assert lab.auth.denied("topic", "rmq-dev-c")[0]["routing_key"] == "rmq-dev-a.s.ds"


def test_a_client_id_takeover_by_another_identity_is_refused_and_the_device_stays(lab: Lab, device: Agent) -> None:
    """Refused at the vhost question, before RabbitMQ registers the client id: registering it would
    already close the device's connection (the session-queue check that follows comes too late)."""
    before = device.status()
    for node in (0, 1):
        taker = connect(lab, "rmq-dev-b", node=node, client_id="rmq-dev-a")
        taker.stop()
        assert refused(taker), f"node {node + 1} let rmq-dev-b use rmq-dev-a's client id: {taker.connack}"
    after = device.status()
    assert after["session"] == "online" and after["connected_at"] == before["connected_at"], (before, after)
    assert [f["client_id"] for f in lab.auth.denied("vhost", "rmq-dev-b")] == ["rmq-dev-a", "rmq-dev-a"]


def test_a_password_login_naming_another_device_is_refused(lab: Lab, device: Agent) -> None:
    """RabbitMQ's MQTT plugin prefers CONNECT's user name and password to the certificate: the lab
    answers no password login, so a certificate for rmq-dev-b cannot log in as rmq-dev-a."""
    for password in ("x", "none", ""):
        impostor = connect(lab, "rmq-dev-b", client_id="rmq-dev-a", username="rmq-dev-a", password=password)
        impostor.stop()
        assert refused(impostor), (password, impostor.connack)


def test_rabbitmq_reads_a_dot_in_a_topic_as_a_level_so_the_station_gives_out_no_such_id(lab: Lab) -> None:
    """Why provisioning/identity.py BROKER_LIMITS refuses '.': on RabbitMQ 3.10 `a.b/s/us` reaches
    subscribers as `a/b/s/us`, a topic under device `a`."""
    observer = connect(lab, "tether-ota-service", node=1, client_id="tether-ota-service-observer")
    publisher = connect(lab, "tether-token-service", client_id="tether-token-service-probe")
    try:
        observer.client.subscribe("pump/#", 1)
        wait_until(lambda: observer.suback, 30, "SUBACK")
        publisher.client.publish("pump.7/s/us", b"hello", qos=1)
        wait_until(lambda: observer.messages, 30, "the message under pump/#")
    finally:
        observer.stop()
        publisher.stop()
    assert observer.messages == [("pump/7/s/us", b"hello")]
    out = station_cli("otp", "pump-7", *lab.station_args())
    assert out.strip()  # a '-' is fine


def test_an_ota_job_sent_through_the_cluster_is_installed_and_committed(lab: Lab) -> None:
    """`tether-lab ota` against the cluster: the 515 goes to one node and reaches the device on either;
    it downloads with its token, installs to the other slot, restarts and commits."""
    import sys

    from lab.demo import Supervisor, read_json
    from lab.ota import publish_release, send_update
    from tests.conftest import REPO

    config = lab.device("rmq-ota")
    state = config.parent / "state"
    agent = Supervisor([sys.executable, "-m", "agent.cli", "--config", str(config), "run"],
                       config.parent / "agent.log", {"PYTHONPATH": str(REPO)})
    try:
        def online() -> bool:
            agent.poll()
            status = read_json(state / "status.json") or {}
            return status.get("session") == "online" and bool((status.get("token") or {}).get("present"))

        wait_until(online, 90, "rmq-ota online with a token", describe=lambda: agent.tail(20))
        release = publish_release(lab, "rmq-app", "1.1.0", b"#!/bin/sh\necho 'rmq app 1.1.0'\n" * 64)
        send_update(lab, "rmq-ota", release)

        def committed() -> bool:
            agent.poll()
            return (read_json(state / "ota" / "state.json") or {}).get("state") == "committed"

        wait_until(committed, 120, "the update committed", describe=lambda: (read_json(state / "ota" / "state.json"),
                                                                              agent.tail(20)))
    finally:
        agent.stop()
    assert agent.restarts == 1


def test_session_queues_are_transient_and_only_the_services_are_mirrored(lab: Lab, device: Agent) -> None:
    """The device and the token service subscribe at QoS 0 (agent/core/connection.py SUBSCRIBE_QOS,
    lab/tokens.py). RabbitMQ 3.10 keeps a QoS 1 subscription in a durable queue even for a clean session,
    and a durable queue whose node died refuses its owner on every other node; a QoS 0 subscription's
    queue is transient and goes with its node. So no device's queue is mirrored (a mirror cost a queue
    declaration on both nodes per session, which capped the cluster near 3,400 devices); the services'
    few queues are (lab/rabbitmq.py SERVICE_MIRROR)."""
    queues = {name: q for name, q in lab.cluster.queues(1).items() if name.startswith("mqtt-subscription-")}
    for owner in ("rmq-dev-a", "tether-token-service"):
        assert f"mqtt-subscription-{owner}qos1" not in queues, queues
        assert queues[f"mqtt-subscription-{owner}qos0"]["durable"] is False, queues
    assert queues["mqtt-subscription-tether-token-serviceqos0"]["policy"] == "tether-services-mirrored", queues
    devices = {name: q for name, q in queues.items() if not any(name.startswith(f"mqtt-subscription-{s}qos")
                                                                for s in lab.services)}
    assert devices and not [name for name, q in devices.items() if q["policy"]], f"a device's queue policed: {devices}"


def test_a_device_whose_id_begins_with_a_services_gets_no_mirror(lab: Lab) -> None:
    """The station gives out `tether-token-service-x` (only the reserved ids themselves are refused); the
    mirror policy names the services' own queues, so this device's queue is a device's: transient, local."""
    lookalike = connect(lab, "tether-token-service-x", node=0)
    try:
        assert not refused(lookalike), lookalike.connack
        lookalike.client.subscribe("tether-token-service-x/s/ds", 0)
        wait_until(lambda: lookalike.suback, 30, "SUBACK for the look-alike device")
        queue = lab.cluster.queues(0)["mqtt-subscription-tether-token-service-xqos0"]
    finally:
        lookalike.stop()
    assert queue["policy"] in ("", None), queue


def test_a_service_queue_outlives_its_node_and_keeps_what_devices_sent_meanwhile(lab: Lab, device: Agent) -> None:
    """A service's session queue is mirrored (lab/rabbitmq.py SERVICE_MIRROR): when its node is killed the
    copy on the other node takes over, so a device's QoS 1 request to that service is accepted (PUBACK)
    while the service is away, not refused, which RabbitMQ 3.10's MQTT plugin answers by closing the
    device's connection, and the service finds the request when it subscribes again under its client id.
    Kills the node the device is not on, then starts it again for the last test."""
    here = [u.rsplit(":", 1)[1] for u in lab.broker_urls].index(device.status()["endpoint"].rsplit(":", 1)[1])
    doomed, stays = 1 - here, here
    queue = "mqtt-subscription-tether-ota-serviceqos0"
    service = connect(lab, "tether-ota-service", node=doomed)
    requester = connect(lab, "rmq-requester", node=stays)
    back, killed = None, False
    survivor = lab.cluster.nodes[stays].name

    def where() -> tuple[str, list[str]] | None:
        return lab.cluster.queue_nodes(stays).get(queue)

    try:
        service.client.subscribe("rmq-requester/s/uat", 0)
        wait_until(lambda: service.suback, 30, "SUBACK for the service on the node to be killed")
        wait_until(lambda: survivor in (where() or ("", []))[1], 30, f"{queue} with a synchronised copy on {survivor}",
                   describe=where)
        lab.cluster.kill_node(doomed)
        killed = True
        wait_until(lambda: (where() or ("", []))[0] == survivor, 60, f"{queue} taken over on {survivor}",
                   describe=where)
        requester.client.publish("rmq-requester/s/uat", b"", qos=1).wait_for_publish(30)
        back = connect(lab, "tether-ota-service", node=stays)
        back.client.subscribe("rmq-requester/s/uat", 0)
        wait_until(lambda: back.messages, 30, "the request sent while the service was away")  # type: ignore[union-attr]
        assert not requester.disconnected.is_set(), "the requester's connection was closed (its publish refused?)"
    finally:
        for c in (service, requester, back):
            if c is not None:
                c.stop()
        if killed:
            lab.cluster.start_node(doomed)
    assert back.messages == [("rmq-requester/s/uat", b"")]


def test_the_device_fails_over_when_its_node_stops_and_tokens_keep_coming(lab: Lab, device: Agent) -> None:
    first = device.status()["endpoint"]
    index = [u.rsplit(":", 1)[1] for u in lab.broker_urls].index(first.rsplit(":", 1)[1])
    lab.cluster.kill_node(index)
    wait_until(lambda: device.status().get("session") == "online" and device.status().get("endpoint") != first,
               60, "the device online on the other node", describe=lambda: f"status.json {device.status()}")
    # the token service moved to the surviving node too: a device that boots now gets its token there
    late = Agent(lab.device("rmq-after-failover"))
    try:
        late.wait_status(session="online", timeout=90)
        wait_until(lambda: (late.status().get("token") or {}).get("present"), 60, "a token after the failover",
                   describe=lambda: f"status.json {late.status()}")
    finally:
        late.stop()
    assert lab.tokens.port == lab.cluster.nodes[1 - index].mqtt_port
    assert device.status()["session"] == "online"
