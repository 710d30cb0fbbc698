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
    ctx = ssl.create_default_context(cafile=str(station.ca_file))
    conn = http.client.HTTPSConnection("127.0.0.1", station.port, context=ctx, timeout=20, source_address=(source, 0))
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    try:
        conn.request("POST", ENROLL, body=body if body is not None else csr_body(user),
                     headers={"Content-Type": "application/pkcs10", "Authorization": f"Basic {token}"})
        answer = conn.getresponse()
        headers = {k.lower(): v for k, v in answer.getheaders()}
        return Reply(answer.status, headers, answer.read().decode(errors="replace"))
    finally:
        conn.close()
