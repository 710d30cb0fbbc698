"""Security bed: MQTT peers holding real certificates, and helpers to provision devices against the
real station. Every peer is a real paho client over mTLS to a real mosquitto; nothing is mocked."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from agent.tls import client_context
from hal.keys import TlsKey
from lab.mosquitto import Mosquitto
from lab.procs import wait_until
from tests.pki import Pki


@dataclass
class Peer:
    """One MQTT client with a certificate: what it received, what the broker granted, whether it dropped."""

    client: mqtt.Client
    received: list[tuple[str, bytes]] = field(default_factory=list)
    granted: list[Any] = field(default_factory=list)
    disconnects: list[str] = field(default_factory=list)
    connected: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def topics(self) -> list[str]:
        with self.lock:
            return [t for t, _ in self.received]

    def subscribe(self, *topics: str, timeout: float = 10.0) -> None:
        before = len(self.granted)
        for topic in topics:
            self.client.subscribe(topic, 1)
        wait_until(lambda: len(self.granted) >= before + len(topics), timeout, f"SUBACK for {topics}")

    def publish(self, topic: str, payload: bytes = b"x", timeout: float = 10.0) -> None:
        """QoS 1 publish, waited for until the broker acknowledged it (PUBACK)."""
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout)
        assert info.is_published(), f"no PUBACK for {topic} within {timeout} s"

    def wait_for(self, topic: str, timeout: float = 10.0) -> None:
        wait_until(lambda: topic in self.topics(), timeout, f"a message on {topic}")


@pytest.fixture
def peers(pki: Pki, broker: Mosquitto) -> Iterator[Callable[..., Peer]]:
    """Connect peers to `broker` as the holder of a certificate for `cert_id` (client id may differ)."""
    started: list[Peer] = []

    def connect(cert_id: str, client_id: str | None = None) -> Peer:
        certfile, keyfile = pki.device_files(cert_id)
        ctx = client_context(certfile, TlsKey(str(keyfile)), cafile=str(pki.root_file))
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or cert_id)
        client.tls_set_context(ctx)
        peer = Peer(client)

        def on_message(c: Any, u: Any, m: Any) -> None:
            with peer.lock:
                peer.received.append((m.topic, bytes(m.payload)))

        client.on_message = on_message
        client.on_connect = lambda c, u, f, rc, p=None: peer.connected.set()
        client.on_subscribe = lambda c, u, mid, codes, p=None: peer.granted.extend(codes)
        client.on_disconnect = lambda c, u, f, rc, p=None: peer.disconnects.append(str(rc))
        client.connect("localhost", broker.port, keepalive=30)
        client.loop_start()
        started.append(peer)
        assert peer.connected.wait(10), f"{cert_id} did not get a CONNACK; broker log:\n{broker.log()}"
        return peer

    yield connect
    for peer in started:
        peer.client.disconnect()
        peer.client.loop_stop()


def check_output(out: Any) -> str:
    return f"exit {out.returncode}\nstdout:\n{out.stdout}\nstderr:\n{out.stderr}"


def otp_file(directory: Path, password: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "otp"
    path.write_text(password + "\n")
    path.chmod(0o600)
    return path


# The OTA bed (real artifact server, signed releases, devices with real slots) serves the OTA attacks too.
from tests.ota.conftest import device, device_factory, releases  # noqa: E402, F401
