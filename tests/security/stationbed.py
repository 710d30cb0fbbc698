"""Helpers for attacking a real `tether-station serve`: raw EST POSTs from a chosen loopback address,
and station.toml edits made before the station starts."""

from __future__ import annotations

import base64
import http.client
import re
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding

from hal.keys.file import generate
from provisioning.csr import build_csr
from tests.pki import TRUST_DOMAIN
from tests.station.conftest import RunningStation

ENROLL = "/.well-known/est/simpleenroll"


def set_settings(station_dir: Path, **values: int | str) -> None:
    """Replace `key = value` lines in station.toml (the station reads them when it starts)."""
    path = station_dir / "station.toml"
    text = path.read_text()
    for key, value in values.items():
        rendered = f'"{value}"' if isinstance(value, str) else str(value)
        text, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {rendered}", text)
        if n == 0:
            text += f"{key} = {rendered}\n"
    path.write_text(text)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: str


def csr_body(device_id: str) -> bytes:
    return base64.encodebytes(build_csr(generate("ec-p256"), device_id, TRUST_DOMAIN).public_bytes(Encoding.DER))


def post_enroll(station: RunningStation, user: str, password: str, body: bytes | None = None,
                source: str = "127.0.0.1") -> Reply:
    """POST simpleenroll with HTTP Basic from the loopback address `source` (127.0.0.0/8 is all local)."""
    with Client(station, source) as client:
        return client.enroll(user, password, body)


def post_enroll_with_cert(station: RunningStation, cert: tuple[Path, Path], body: bytes,
                          source: str = "127.0.0.1") -> Reply:
    """POST simpleenroll authenticated by the TLS client certificate `cert` (chain file, key file)."""
    with Client(station, source, cert) as client:
        return client.post(body, {})


class Client:
    """One kept-alive HTTPS connection to the station from the loopback address `source` (opened again
    if the station closed it), for sending many requests without a handshake each."""

    def __init__(self, station: RunningStation, source: str = "127.0.0.1",
                 cert: tuple[Path, Path] | None = None) -> None:
        self.ctx = ssl.create_default_context(cafile=str(station.ca_file))
        if cert is not None:
            self.ctx.load_cert_chain(str(cert[0]), str(cert[1]))
        self.station, self.source = station, source
        self.conn: http.client.HTTPSConnection | None = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.conn is not None:
            self.conn.close()

    def enroll(self, user: str, password: str, body: bytes | None = None) -> Reply:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        return self.post(body if body is not None else csr_body(user), {"Authorization": f"Basic {token}"})

    def post(self, body: bytes, headers: dict[str, str]) -> Reply:
        if self.conn is None:
            self.conn = http.client.HTTPSConnection("127.0.0.1", self.station.port, context=self.ctx, timeout=20,
                                                    source_address=(self.source, 0))
        self.conn.request("POST", ENROLL, body=body, headers={"Content-Type": "application/pkcs10", **headers})
        answer = self.conn.getresponse()
        reply = Reply(answer.status, {k.lower(): v for k, v in answer.getheaders()},
                      answer.read().decode(errors="replace"))
        if reply.headers.get("connection", "").lower() == "close":
            self.conn.close()
            self.conn = None
        return reply
