"""Every bad request in issue 3's list is refused with its status and a reason, writes nothing to the
ledger, and leaves the server serving."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from hal.keys.file import generate
from provisioning.csr import build_csr
from provisioning.station.otp import new_otp, otp_hash
from tests.pki import TRUST_DOMAIN, Pki
from tests.station.conftest import RunningStation

ENROLL = "/.well-known/est/simpleenroll"
REENROLL = "/.well-known/est/simplereenroll"
CSR_TYPE = {"Content-Type": "application/pkcs10"}


def b64(csr: x509.CertificateSigningRequest) -> bytes:
    return base64.encodebytes(csr.public_bytes(Encoding.DER))


def post(station: RunningStation, path: str, body: bytes, headers: dict[str, str] | None = None,
         auth: tuple[str, str] | None = None, cert: tuple[str, str] | None = None) -> requests.Response:
    return requests.post(station.url + path, data=body, headers=headers if headers is not None else CSR_TYPE,
                         auth=auth, cert=cert, verify=str(station.ca_file), timeout=10)


def _tlv(der: bytes, offset: int) -> tuple[int, int]:
    """(start of value, end of element) of the DER element at `offset`."""
    length = der[offset + 1]
    start = offset + 2
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(der[start:start + count], "big")
        start += count
    return start, start + length


def _children(der: bytes) -> list[bytes]:
    start, end = _tlv(der, 0)
    out, pos = [], start
    while pos < end:
        _, stop = _tlv(der, pos)
        out.append(der[pos:stop])
        pos = stop
    return out


def _sequence(parts: list[bytes]) -> bytes:
    body = b"".join(parts)
    n = len(body)
    length = bytes([n]) if n < 0x80 else bytes([0x80 | ((n.bit_length() + 7) // 8)]) + n.to_bytes(
        (n.bit_length() + 7) // 8, "big")
    return b"\x30" + length + body


def csr_signed_by_another_key(device_id: str) -> bytes:
    """A CSR carrying key A's public key and a signature made by key B (no proof of possession)."""
    mine = build_csr(generate("ec-p256"), device_id, TRUST_DOMAIN).public_bytes(Encoding.DER)
    other = build_csr(generate("ec-p256"), device_id, TRUST_DOMAIN).public_bytes(Encoding.DER)
    info, _, _ = _children(mine)
    _, alg, sig = _children(other)
    return base64.encodebytes(_sequence([info, alg, sig]))


def csr_with_cn(cn: str) -> bytes:
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
           .sign(generate("ec-p256"), hashes.SHA256()))
    return b64(csr)


def test_every_bad_request_is_refused_with_its_status_and_nothing_is_recorded(tmp_path: Path,
                                                                               station: RunningStation) -> None:
    good = b64(build_csr(generate("ec-p256"), "bad-dev", TRUST_DOMAIN))
    otp = station.otp("bad-dev")
    creds = ("bad-dev", otp)

    # an expired password, written with an expiry in the past through the ledger itself
    expired = new_otp()
    ledger = station.ledger()
    now = int(time.time())
    ledger.add_otp("expired-dev", otp_hash("expired-dev", expired), now - 100, now - 10)

    cases: list[tuple[str, requests.Response, int, str]] = [
        ("malformed body", post(station, ENROLL, b"this is not base64 DER!", auth=creds), 400, "malformed CSR"),
        ("DER garbage", post(station, ENROLL, base64.encodebytes(b"\x30\x03\x02\x01\x00"), auth=creds), 400,
         "not a PKCS#10"),
        ("oversized body", post(station, ENROLL, b"A" * 70_000, auth=creds), 413, "exceeds the 65536-byte limit"),
        ("wrong content type", post(station, ENROLL, good, {"Content-Type": "application/json"}, auth=creds), 415,
         "Content-Type must be application/pkcs10"),
        ("no credentials", post(station, ENROLL, good), 401, "no credentials"),
        ("wrong password", post(station, ENROLL, good, auth=("bad-dev", "guess")), 401, "not valid for device"),
        ("password of another device", post(station, ENROLL, good, auth=("other-dev", otp)), 401,
         "not valid for device 'other-dev'"),
        ("expired password", post(station, ENROLL, b64(build_csr(generate("ec-p256"), "expired-dev", TRUST_DOMAIN)),
                                  auth=("expired-dev", expired)), 401, "expired"),
        ("CSR signed by another key", post(station, ENROLL, csr_signed_by_another_key("bad-dev"), auth=creds), 403,
         "proof-of-possession"),
        ("CN with ':'", post(station, ENROLL, csr_with_cn("bad-dev:x"), auth=creds), 403, "contains ':'"),
        ("CN of another device", post(station, ENROLL, b64(build_csr(generate("ec-p256"), "victim", TRUST_DOMAIN)),
                                      auth=creds), 403, "does not match the device id 'bad-dev'"),
        ("re-enroll without a certificate", post(station, REENROLL, good), 401, "needs the device's current"),
        ("unknown operation", post(station, "/.well-known/est/fullcmc", good, auth=creds), 404,
         "no such EST resource"),
        ("server-side key generation", post(station, "/.well-known/est/serverkeygen", good, auth=creds), 501,
         "not offered by this station"),
    ]
    for what, response, status, reason in cases:
        assert response.status_code == status, f"{what}: got {response.status_code} {response.text!r}"
        assert reason in response.text, f"{what}: {response.text!r} lacks {reason!r}"
    assert "Basic" in cases[4][1].headers["WWW-Authenticate"]

    # none of that consumed the password: the same device still enrolls, then a reuse is refused
    assert post(station, ENROLL, good, auth=creds).status_code == 200
    reused = post(station, ENROLL, b64(build_csr(generate("ec-p256"), "bad-dev", TRUST_DOMAIN)), auth=creds)
    assert reused.status_code == 401 and "already used for another CSR" in reused.text

    rows = ledger.rows("device")
    ledger.close()
    assert [r.device_id for r in rows] == ["bad-dev"]
    assert station.serving()


@pytest.mark.parametrize("garbage", [b"GET / HTTP/1.1\r\n\r\n", b"\x16\x03\x01\x00\x05hello", b"\x00" * 64])
def test_server_keeps_serving_after_garbage_on_the_socket(station: RunningStation, garbage: bytes) -> None:
    import contextlib
    import socket

    with socket.create_connection(("127.0.0.1", station.port), timeout=5) as s, \
            contextlib.suppress(OSError):  # the server may answer with a TLS alert or a reset: both fine
        s.sendall(garbage)
        s.shutdown(socket.SHUT_WR)
        s.recv(1024)
    assert station.serving()


def test_reenroll_with_another_stations_certificate_is_refused(station: RunningStation, pki: Pki) -> None:
    # a client certificate the handshake cannot verify never reaches the handler
    cert_file, key_file = pki.device_files("stranger")
    with pytest.raises(requests.exceptions.SSLError):
        post(station, REENROLL, b64(build_csr(generate("ec-p256"), "stranger", TRUST_DOMAIN)),
             cert=(str(cert_file), str(key_file)))
    assert station.serving()
