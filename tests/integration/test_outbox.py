"""Store and forward through the real agent: the local publish socket, `tether publish`, the outbox
on disk, a real mosquitto and a separate subscriber that counts what arrives."""

from __future__ import annotations

import json
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.config import load
from agent.outbox import OutboxError, resolve_topic
from agent.publish_api import socket_path
from agent.publisher import Publisher, PublishError
from lab.mosquitto import Mosquitto
from lab.procs import wait_until
from tests.agent_bed import Agent, provisioned_device
from tests.conftest import run_tether
from tests.faults.mqtt_bed import Subscriber, keeping_broker, numbered
from tests.pki import Pki

DEVICE = "dev-001"
TOPIC = f"{DEVICE}/telemetry"


@pytest.fixture
def keeping(broker_factory: Callable[..., Mosquitto], tmp_path: Path) -> Mosquitto:
    return keeping_broker(broker_factory, tmp_path)


@pytest.fixture
def subscriber(pki: Pki, keeping: Mosquitto) -> Iterator[Subscriber]:
    sub = Subscriber(pki, keeping, TOPIC)
    yield sub
    sub.stop()


def device(tmp_path: Path, pki: Pki, broker: Mosquitto, **outbox: object) -> Path:
    return provisioned_device(tmp_path, pki, DEVICE, endpoints={"urls": [f"mqtts://localhost:{broker.port}"]},
                              token={"enabled": False}, outbox=outbox,
                              mqtt={"backoff_base": 0.1, "backoff_cap": 0.5, "connect_timeout": 3.0})


def wait_socket(config: Path, agent: Agent) -> Path:
    path = Path(socket_path(load(config)))
    wait_until(lambda: agent.proc.check_alive() or path.exists(), 20, f"the publish socket {path}")
    return path


def test_topics_are_relative_to_the_prefix_or_absolute_under_it() -> None:
    assert resolve_topic("dev-001", "telemetry/temp") == "dev-001/telemetry/temp"
    assert resolve_topic("dev-001", "/dev-001/telemetry") == "dev-001/telemetry"
    assert resolve_topic("", "s/us") == "s/us"
    for bad in ("/dev-002/x", "/dev-0011/x", "a/+/b", "a/#", "", "/$SYS/x"):
        with pytest.raises(OutboxError):
            resolve_topic("dev-001", bad)


def test_messages_queued_offline_arrive_oldest_first_once_the_broker_is_up(
        tmp_path: Path, pki: Pki, keeping: Mosquitto, subscriber: Subscriber) -> None:
    keeping.stop()  # the device boots offline
    config = device(tmp_path, pki, keeping)
    agent = Agent(config)
    try:
        with Publisher(wait_socket(config, agent)) as publisher:
            ids = publisher.publish_many([("telemetry", p, 1) for p in numbered(300)])
        assert ids == sorted(ids) and len(set(ids)) == 300
        keeping.start()
        counts = subscriber.wait_for(set(numbered(300)), 30, "messages queued while offline")
        assert sum(counts.values()) == 300, "no duplicates without a fault"
        assert subscriber.payloads() == numbered(300), "oldest first"
        wait_until(lambda: not any(Path(load(config).state_dir).glob("outbox.sqlite")) or _queued(config) == 0, 10,
                   "the outbox to empty once the broker acknowledged everything")
    finally:
        agent.stop()


def _queued(config: Path) -> int:
    import sqlite3

    with sqlite3.connect(Path(load(config).state_dir) / "outbox.sqlite") as db:
        return int(db.execute("SELECT count(*) FROM outbox").fetchone()[0])


def test_queued_messages_survive_kill_9_and_go_out_after_restart(
        tmp_path: Path, pki: Pki, keeping: Mosquitto, subscriber: Subscriber) -> None:
    keeping.stop()
    config = device(tmp_path, pki, keeping)
    agent = Agent(config)
    with Publisher(wait_socket(config, agent)) as publisher:
        publisher.publish_many([("telemetry", p, 1) for p in numbered(50)])
    agent.proc.kill()
    keeping.start()
    agent = Agent(config)
    try:
        counts = subscriber.wait_for(set(numbered(50)), 30, "messages queued before kill -9")
        assert sum(counts.values()) == 50
        assert "outbox: 50 message(s) queued" in agent.log()
    finally:
        agent.stop()


def test_tether_publish_queues_and_refuses_topics_outside_the_prefix(
        tmp_path: Path, pki: Pki, keeping: Mosquitto, subscriber: Subscriber) -> None:
    config = device(tmp_path, pki, keeping)
    agent = Agent(config)
    try:
        path = wait_socket(config, agent)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, "only the agent's user may publish as the device"
        out = run_tether("publish", "telemetry", "21.5", config=config)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip().isdigit()
        out = run_tether("publish", "/dev-002/telemetry", "x", config=config)
        assert out.returncode == 1
        assert "outside this device's prefix 'dev-001/'" in out.stderr
        out = run_tether("publish", "telemetry", "--lines", config=config)  # stdin is empty: nothing queued
        assert out.returncode == 0 and out.stdout.strip() == ""
        subscriber.wait_for({b"21.5"}, 20, "the message from tether publish")
    finally:
        agent.stop()


def test_the_socket_answers_one_line_per_request_with_the_reason_for_a_refusal(
        tmp_path: Path, pki: Pki, keeping: Mosquitto) -> None:
    short = Path(tempfile.mkdtemp(prefix="tether-", dir="/tmp"))  # sockaddr_un holds 108 bytes
    config = device(tmp_path, pki, keeping, socket=str(short / "publish.sock"))
    agent = Agent(config)
    try:
        path = wait_socket(config, agent)
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(path))
            sock.sendall(b'{"topic": "a", "payload": "x"}\nnot json\n{"topic": "b", "payload": "y", "qos": 2}\n')
            reader = sock.makefile("rb")
            replies = [json.loads(reader.readline()) for _ in range(3)]
        assert replies[0]["ok"] is True and isinstance(replies[0]["id"], int)
        assert replies[1]["ok"] is False and "not a JSON object" in replies[1]["error"]
        assert replies[2]["ok"] is False and "qos 2" in replies[2]["error"]
    finally:
        agent.stop()
        shutil.rmtree(short, ignore_errors=True)


def test_a_full_outbox_drops_the_oldest_and_says_how_many(
        tmp_path: Path, pki: Pki, keeping: Mosquitto, subscriber: Subscriber) -> None:
    keeping.stop()
    config = device(tmp_path, pki, keeping, max_messages=5)
    agent = Agent(config)
    try:
        with Publisher(wait_socket(config, agent)) as publisher:
            publisher.publish_many([("telemetry", p, 1) for p in numbered(8)], chunk=8)
        wait_until(lambda: "dropped 3 oldest message(s)" in agent.log(), 10, "the WARNING naming the drop")
        keeping.start()
        subscriber.wait_for(set(numbered(5, start=3)), 20, "the newest five")
        assert not set(numbered(3)) & set(subscriber.payloads())
    finally:
        agent.stop()


def test_a_full_outbox_under_refuse_new_answers_an_error(tmp_path: Path, pki: Pki, keeping: Mosquitto) -> None:
    keeping.stop()
    config = device(tmp_path, pki, keeping, max_messages=3, policy="refuse-new")
    agent = Agent(config)
    try:
        with Publisher(wait_socket(config, agent)) as publisher, \
                pytest.raises(PublishError, match=r"outbox full .* refuse-new") as refused:
            publisher.publish_many([("telemetry", p, 1) for p in numbered(4)])
        assert len(refused.value.queued) == 3
    finally:
        agent.stop()


def test_a_message_leaves_the_outbox_on_its_puback_not_when_it_is_sent(tmp_path: Path) -> None:
    from agent.outbox import Outbox
    from agent.outbox_store import OutboxStore
    from tests.conftest import write_config

    config = load(write_config(tmp_path, DEVICE))
    sent: list[bytes] = []

    def send(topic: str, payload: bytes, qos: int) -> int:
        sent.append(payload)
        return len(sent)  # the session's message id

    outbox = Outbox(config, send, wake=lambda: None)
    outbox.publish("telemetry", b"one")
    outbox.publish("telemetry", b"two")
    outbox.on_session_up()
    assert sent == [b"one", b"two"]
    outbox.on_session_down()  # no PUBACK came: both stay queued (on disk too) and go again
    assert outbox.store is not None and outbox.store.count == 2
    outbox.on_session_up()
    assert sent[2:] == [b"one", b"two"]
    outbox.on_acked(3)  # "one", acknowledged in this session
    outbox.on_session_down()
    box = config.outbox
    reopened = OutboxStore(outbox.path, max_messages=box.max_messages, max_bytes=box.max_bytes, policy=box.policy)
    assert reopened.count == 1
    outbox.on_session_up()
    assert sent[4:] == [b"two"]


def test_the_socket_is_served_once_its_path_is_freed_while_the_agent_runs(
        tmp_path: Path, pki: Pki, keeping: Mosquitto) -> None:
    # A stray file where the socket belongs: the agent runs without the publish API, says why, and
    # binds on its own once the file is gone; an idle agent sleeps, so this needs the server's own
    # retry deadline (PublishServer.wake_at), not a fixed tick of the control loop.
    short = Path(tempfile.mkdtemp(prefix="tether-", dir="/tmp"))
    path = short / "publish.sock"
    path.write_text("not a socket\n")
    config = device(tmp_path, pki, keeping, socket=str(path))
    agent = Agent(config)
    try:
        agent.wait_status(session="online")
        wait_until(lambda: "exists and is not a socket" in agent.log(), 20, "the refusal in the agent's log")
        path.unlink()
        wait_until(lambda: path.is_socket(), 20, f"the agent to serve {path}")
        with Publisher(path) as publisher:
            assert publisher.publish("telemetry", b"after the fix") > 0
    finally:
        agent.stop()
        shutil.rmtree(short, ignore_errors=True)
