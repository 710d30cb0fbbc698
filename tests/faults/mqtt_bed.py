"""What the outbox tests share: a broker that keeps its sessions across restarts, and a subscriber
that counts what it receives.

The payloads the tests publish carry their own counter (the outbox sends payloads unchanged), so
the subscriber can tell a lost message from a duplicate without any help from the agent.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from lab.mosquitto import Mosquitto, acl_text
from lab.procs import LabError, port_open, wait_until
from provisioning.identity import RESERVED_IDS
from tests.pki import Pki

SUBSCRIBER = "fault-subscriber"
BROKER_INFLIGHT = 20  # messages mosquitto sends the subscriber before it waits for PUBACKs (its default)


def keeping_broker(broker_factory: Callable[..., Mosquitto], directory: Path, name: str = "broker") -> Mosquitto:
    """An mTLS mosquitto that saves its sessions on a graceful stop and queues without a limit.

    A restart then keeps the subscriber's persistent session (clean_session False) and the messages
    queued for it, so every message the broker acknowledged to the device still reaches the
    subscriber. Without `max_queued_messages 0` mosquitto drops messages beyond 1000 queued for a
    subscriber that is reconnecting. A restart can repeat up to BROKER_INFLIGHT messages to the
    subscriber (the broker's own at-least-once leg), on top of what the device re-sends.
    """
    store = directory / f"{name}-db"
    store.mkdir(parents=True, exist_ok=True)
    return broker_factory(name, acl=acl_text((*RESERVED_IDS, SUBSCRIBER)),
                          extra=f"persistence true\npersistence_location {store}/\nmax_queued_messages 0\n"
                                f"max_inflight_messages {BROKER_INFLIGHT}")


def restart(broker: Mosquitto, timeout: float = 15.0) -> None:
    """Stop the broker with SIGTERM (it saves its sessions) and start it again on the same port.

    The port is briefly free in between: a client reconnecting right then can be handed that very
    port as its ephemeral source port (or another test can bind it), so a failed start is retried
    until the deadline."""
    broker.stop()
    deadline = time.monotonic() + timeout
    while True:
        try:
            broker.start()
            return
        except LabError:
            if time.monotonic() > deadline:
                raise
            wait_until(lambda: not port_open(broker.host, broker.port), 5, f"port {broker.port} to be free")


class Subscriber:
    """A separate paho client with its own certificate, subscribed with QoS 1 and clean_session False;
    it reconnects by itself while the broker restarts."""

    def __init__(self, pki: Pki, broker: Mosquitto, topic: str) -> None:
        certfile, keyfile = pki.device_files(SUBSCRIBER)
        self.topic = topic
        self.received: list[bytes] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=SUBSCRIBER, clean_session=False)
        self.client.tls_set(ca_certs=str(pki.root_file), certfile=str(certfile), keyfile=str(keyfile))
        self.client.reconnect_delay_set(0.05, 0.5)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect_async(broker.host, broker.port, keepalive=10)
        self.client.loop_start()
        wait_until(self._subscribed.is_set, 15, f"the subscriber to subscribe to {topic}")

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, properties: Any = None) -> None:
        client.subscribe(self.topic, 1)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self._lock:  # paho acknowledges after this returns: what is recorded was received
            self.received.append(bytes(msg.payload))

    def payloads(self) -> list[bytes]:
        with self._lock:
            return list(self.received)

    def counts(self) -> Counter[bytes]:
        return Counter(self.payloads())

    def wait_for(self, expected: set[bytes], timeout: float, what: str) -> Counter[bytes]:
        """Wait until every payload in `expected` arrived at least once; return all counts."""
        wait_until(lambda: expected <= set(self.payloads()), timeout, what,
                   describe=lambda: f"{len(expected - set(self.payloads()))} of {len(expected)} still missing")
        return self.counts()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def numbered(n: int, start: int = 0, tag: str = "m") -> list[bytes]:
    """Payloads `m-000000`, `m-000001`, ...: the counter that tells duplicates from losses."""
    return [f"{tag}-{i:06d}".encode() for i in range(start, start + n)]
