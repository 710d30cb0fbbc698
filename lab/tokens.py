"""The lab's token service: answers `<id>/s/uat` with `71,<jwt>` on `<id>/s/dat`, like Cumulocity.

It is an MQTT client of the lab broker with its own certificate; the broker's ACL lets it read and
write every device's topics while each device stays inside its own prefix. JWTs are ES256, signed
with the service's key; the public key is written beside it so the artifact server (and tests) can
verify them.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from lab.jws import b64url
from lab.procs import LabError, wait_until

log = logging.getLogger(__name__)
SERVICE_ID = "tether-token-service"


class JwtSigner:
    """ES256 JWTs (RFC 7519 / RFC 7518 3.4: the signature is r || s, 32 bytes each)."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, issuer: str = "tether-lab") -> None:
        self.key = key
        self.issuer = issuer

    @classmethod
    def load_or_create(cls, path: Path) -> JwtSigner:
        if path.exists():
            key = serialization.load_pem_private_key(path.read_bytes(), None)
            assert isinstance(key, ec.EllipticCurvePrivateKey)
        else:
            key = ec.generate_private_key(ec.SECP256R1())
            path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
            path.chmod(0o600)
        path.with_suffix(".pub.pem").write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        return cls(key)

    def sign(self, subject: str, lifetime: float, now: float | None = None, **extra: Any) -> str:
        now = time.time() if now is None else now
        header = b64url(json.dumps({"alg": "ES256", "typ": "JWT"}, separators=(",", ":")).encode())
        # NumericDate may be fractional (RFC 7519 2); milliseconds let tests measure refresh timing
        # to a fraction of a short lifetime
        claims = {"sub": subject, "iss": self.issuer, "iat": round(now, 3), "exp": round(now + lifetime, 3), **extra}
        payload = b64url(json.dumps(claims, separators=(",", ":")).encode())
        der = self.key.sign(f"{header}.{payload}".encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return f"{header}.{payload}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


class TokenService:
    """Subscribes `+/s/uat`; answers each request on the requester's own `s/dat`."""

    def __init__(self, host: str, port: int, context: Any, signer: JwtSigner, lifetime: float,
                 request: str = "s/uat", response: str = "s/dat",
                 mangle: Callable[[str, str], str | None] | None = None,
                 fallbacks: tuple[tuple[str, int], ...] = ()) -> None:
        """`fallbacks`: more nodes of the same cluster (RabbitMQ), dialled in turn when the connection
        drops. A cluster routes every request to every subscriber, so it gets one token service that
        moves between its nodes; separate brokers (mosquitto) get one each."""
        self.host, self.port = host, port
        self._endpoints = [(host, port), *fallbacks]
        self.signer = signer
        self.lifetime = lifetime
        self.request, self.response = request, response
        self.mangle = mangle  # tests: replace the answer for a device (bad tokens, silence)
        self.issued: list[tuple[str, float]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=SERVICE_ID)
        self.client.tls_set_context(context)
        self.client.on_message = self._on_message
        # QoS 0 both ways, like the devices (agent/core/connection.py SUBSCRIBE_QOS): the service's session
        # is clean, so QoS 1 would keep nothing across a reconnect; on RabbitMQ 3.10 it would put every
        # device's requests in one durable queue on one node (refused elsewhere once that node dies) and
        # hold each answer for a confirm (at paho's 20 in flight, fewer answers per second than 4,000
        # devices' refreshes). A lost request or answer is asked again after the device's token timeout.
        self.client.on_connect = lambda c, u, f, rc, p=None: c.subscribe(f"+/{request}", 0)
        self.connected = threading.Event()
        self._stopping = False
        self.client.on_subscribe = lambda *a: self.connected.set()
        if fallbacks:
            self.client.on_disconnect = self._next_endpoint
            self.client.on_connect_fail = self._next_endpoint  # the next node was down too

    def _next_endpoint(self, client: Any, *args: Any) -> None:
        """The connection dropped (or a reconnect failed): paho's loop reconnects to whatever
        `connect_async` set last. Not after `stop`: its DISCONNECT calls this too."""
        if self._stopping:
            return
        self._endpoints.append(self._endpoints.pop(0))
        self.host, self.port = self._endpoints[0]
        log.info("token service: connection lost; trying %s:%d next", self.host, self.port)
        client.connect_async(self.host, self.port, keepalive=30)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        device = msg.topic.split("/", 1)[0]
        now = time.time()
        signed = "71," + self.signer.sign(device, self.lifetime, now)
        answer = self.mangle(device, signed) if self.mangle is not None else signed
        with self._lock:
            self.issued.append((device, now))
        if answer is not None:
            client.publish(f"{device}/{self.response}", answer, qos=0)

    def start(self, timeout: float = 10.0) -> TokenService:
        self.client.connect(self.host, self.port, keepalive=30)
        self.client.loop_start()
        if not self.connected.wait(timeout):
            raise LabError(f"token service could not subscribe on {self.host}:{self.port}")
        return self

    def requests_from(self, device: str) -> list[float]:
        with self._lock:
            return [t for d, t in self.issued if d == device]

    def wait_requests(self, device: str, count: int, timeout: float) -> list[float]:
        wait_until(lambda: len(self.requests_from(device)) >= count, timeout,
                   f"{count} token request(s) from {device}")
        return self.requests_from(device)

    def stop(self) -> None:
        self._stopping = True
        self.client.disconnect()
        self.client.loop_stop()
