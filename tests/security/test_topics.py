"""A device is confined to its own topic prefix by the lab broker's ACL (`pattern readwrite %u/#`, the
user being the certificate's CN): nothing it publishes elsewhere is delivered, nothing published
elsewhere reaches it. Negative results are proven with an ordered marker: the broker delivers one
publisher's messages to one subscriber in order, so once the marker sent after the forbidden message
has arrived, the forbidden one would have arrived first. (tests/integration/test_tokens.py proves the
same for another device's token request and response.)"""

from __future__ import annotations

from collections.abc import Callable

from lab.tokens import SERVICE_ID
from tests.security.conftest import Peer

FOREIGN = ("dev-B/s/ds", "dev-B/s/dat", "dev-B/s/us", "dev-B/telemetry", "c8y/s/ds", "s/ds", "dev-A-x/s/ds")


def test_device_cannot_publish_into_another_devices_topics(peers: Callable[..., Peer]) -> None:
    observer = peers(SERVICE_ID)  # the lab's services may read every topic: it sees whatever the broker accepts
    observer.subscribe("#")
    victim = peers("dev-B")
    victim.subscribe("dev-B/#")
    attacker = peers("dev-A")
    for topic in FOREIGN:
        attacker.publish(topic, b"515,dev-B,app,6.6.6,https://evil.example/")  # PUBACKed but dropped
    attacker.publish("dev-A/marker")
    observer.wait_for("dev-A/marker")
    assert observer.topics() == ["dev-A/marker"]
    assert victim.topics() == []


def test_device_cannot_read_another_devices_topics(peers: Callable[..., Peer]) -> None:
    attacker = peers("dev-A")
    attacker.subscribe("dev-B/#", "dev-B/s/dat", "+/s/dat", "#", "dev-A/#")
    victim = peers("dev-B")
    victim.subscribe("dev-B/#")
    service = peers(SERVICE_ID)
    for topic in FOREIGN:
        service.publish(topic, b"71,secret.token.for-someone-else")
    victim.publish("dev-B/s/us", b"private telemetry")
    service.publish("dev-A/marker")
    attacker.wait_for("dev-A/marker")
    victim.wait_for("dev-B/s/us")
    assert set(attacker.topics()) == {"dev-A/marker"}  # once per matching subscription, nothing else
    assert set(victim.topics()) == {"dev-B/s/ds", "dev-B/s/dat", "dev-B/s/us", "dev-B/telemetry"}
