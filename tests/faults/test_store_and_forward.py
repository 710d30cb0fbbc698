"""Store and forward under faults: 5,000 QoS 1 messages through the agent's outbox while the broker
restarts 20 times, and while the agent itself is killed with -9. Zero lost; duplicates counted.

The broker restarts gracefully (SIGTERM, sessions saved): a broker killed with -9 forgets what it
acknowledged and had not yet forwarded, a loss no device can prevent (docs/reliability.md).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.config import load
from agent.outbox import Outbox
from agent.publish_api import socket_path
from agent.publisher import Publisher, PublishError
from lab.mosquitto import Mosquitto
from lab.procs import wait_until
from tests.agent_bed import Agent, provisioned_device
from tests.faults.mqtt_bed import Subscriber, keeping_broker, numbered, restart
from tests.pki import Pki

DEVICE = "dev-sf"
TOPIC = f"{DEVICE}/telemetry"
MAX_INFLIGHT = 20


@pytest.fixture
def keeping(broker_factory: Callable[..., Mosquitto], tmp_path: Path) -> Mosquitto:
    return keeping_broker(broker_factory, tmp_path)


@pytest.fixture
def subscriber(pki: Pki, keeping: Mosquitto) -> Iterator[Subscriber]:
    sub = Subscriber(pki, keeping, TOPIC)
    yield sub
    sub.stop()


class Feeder(threading.Thread):
    """A device application: publishes `payloads` through the socket, at most `ahead` messages ahead of
    the subscriber, and re-sends what got no answer when the agent dies under it."""

    def __init__(self, socket: Path, payloads: list[bytes], subscriber: Subscriber, ahead: int = 400,
                 chunk: int = 25) -> None:
        super().__init__(name="feeder", daemon=True)
        self.socket, self.payloads, self.subscriber = socket, payloads, subscriber
        self.ahead, self.chunk = ahead, chunk
        self.error: BaseException | None = None
        self.resent = 0
        self.done = threading.Event()

    def run(self) -> None:
        try:
            sent = 0
            while sent < len(self.payloads):
                wait_until(lambda n=sent - self.ahead: len(set(self.subscriber.payloads())) >= n, 60,
                           "the subscriber to catch up with the feeder")
                chunk = self.payloads[sent:sent + self.chunk]
                sent += self._publish(chunk)
            self.done.set()
        except BaseException as exc:  # reported by the test thread
            self.error = exc

    def _publish(self, chunk: list[bytes]) -> int:
        deadline = time.monotonic() + 60
        while True:
            try:
                with Publisher(self.socket, timeout=10) as publisher:
                    publisher.publish_many([("telemetry", p, 1) for p in chunk])
                return len(chunk)
            except PublishError as exc:  # the agent was killed: what it answered is queued, the rest goes again
                if time.monotonic() > deadline:
                    raise
                self.resent += len(chunk) - len(exc.queued)
                chunk = chunk[len(exc.queued):]
                if len(exc.queued):
                    return len(exc.queued)
                wait_until(self._reachable, 30, "the agent's publish socket to answer again")

    def _reachable(self) -> bool:
        try:
            Publisher(self.socket, timeout=2).close()
        except PublishError:
            return False
        return True

    def check(self) -> None:
        if self.error is not None:
            raise AssertionError(f"the feeder failed: {self.error}") from self.error


def start_device(tmp_path: Path, pki: Pki, broker: Mosquitto) -> tuple[Path, Agent]:
    config = provisioned_device(tmp_path, pki, DEVICE, endpoints={"urls": [f"mqtts://localhost:{broker.port}"]},
                                token={"enabled": False}, outbox={"max_inflight": MAX_INFLIGHT},
                                mqtt={"backoff_base": 0.05, "backoff_cap": 0.3, "connect_timeout": 3.0})
    agent = Agent(config)
    agent.wait_status(session="online")
    return config, agent


def report(what: str, **figures: object) -> None:
    print(f"\nFIGURES {what}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


def test_5000_messages_survive_20_broker_restarts_with_none_lost(
        tmp_path: Path, pki: Pki, keeping: Mosquitto, subscriber: Subscriber) -> None:
    total, restarts = 5000, 20
    config, agent = start_device(tmp_path, pki, keeping)
    expected = numbered(total)
    feeder = Feeder(socket_path(load(config)), expected, subscriber)
    started = time.monotonic()
    try:
        feeder.start()
        for i in range(1, restarts + 1):
            # spread the restarts over the stream, each with messages queued and in flight
            mark = i * total // (restarts + 1)
            wait_until(lambda n=mark: feeder.check() or len(set(subscriber.payloads())) >= n,
                       60, f"delivery to reach restart {i} ({mark} messages)",
                       describe=lambda: f"{len(set(subscriber.payloads()))} delivered")
            wait_until(lambda n=i: agent.log().count("session: connected") >= n, 30, f"session {i} to be up",
                       describe=lambda: f"{agent.log().count('session: connected')} sessions; status.json "
                                        f"{agent.status()}")
            restart(keeping)
        counts = subscriber.wait_for(set(expected), 120, "all 5,000 messages")
        feeder.join(10)
        feeder.check()
    finally:
        agent.stop()
    lost = len(set(expected) - set(counts))
    duplicates = sum(counts.values()) - len(counts)
    resent = device_resent(agent)
    report("broker-restarts", messages=total, broker_restarts=restarts, lost=lost, duplicates=duplicates,
           resent_by_device=resent, seconds=round(time.monotonic() - started, 1))
    assert lost == 0
    assert set(counts) == set(expected), "nothing arrives that was not published"
    drops = agent.log().count("session: lost")
    assert drops >= restarts, "every restart cut the session"
    # the device re-sends at most its in-flight window per cut: its share of the duplicates is bounded.
    # The rest is the broker's own at-least-once leg: a restored session re-sends what the subscriber
    # had received but the broker had not yet seen acknowledged when it saved its state.
    assert resent <= drops * MAX_INFLIGHT
    assert 0 <= duplicates < total


def device_resent(agent: Agent) -> int:
    return sum(int(n) for n in re.findall(r"outbox: (\d+) message\(s\) in flight without", agent.log()))


def test_agent_killed_with_9_mid_stream_loses_nothing_it_acknowledged(
        tmp_path: Path, pki: Pki, keeping: Mosquitto, subscriber: Subscriber) -> None:
    total, kills = 2000, 3
    config, agent = start_device(tmp_path, pki, keeping)
    expected = numbered(total, tag="k")
    feeder = Feeder(socket_path(load(config)), expected, subscriber)
    try:
        feeder.start()
        for i in range(1, kills + 1):
            mark = i * total // (kills + 1)
            wait_until(lambda n=mark: feeder.check() or len(set(subscriber.payloads())) >= n,
                       60, f"delivery to reach kill {i} ({mark} messages)",
                       describe=lambda: f"{len(set(subscriber.payloads()))} delivered")
            agent.proc.kill()  # mid-stream: messages queued, in flight, acknowledged but not yet removed
            agent = Agent(config)
        counts = subscriber.wait_for(set(expected), 120, "all 2,000 messages")
        feeder.join(10)
        feeder.check()
    finally:
        agent.stop()
    lost = len(set(expected) - set(counts))
    duplicates = sum(counts.values()) - len(counts)
    report("agent-kill-9", messages=total, agent_kills=kills, lost=lost, duplicates=duplicates,
           resent_by_application=feeder.resent)
    assert lost == 0
    # per kill: the in-flight window, the acknowledgements not yet removed, and what the feeder re-sent
    assert duplicates <= kills * (MAX_INFLIGHT + Outbox.FLUSH_EVERY) + feeder.resent
