"""What leaves the station as files: credential bundles for boards that cannot make a key, server
certificates for brokers and cores, and the Cumulocity bulk-registration CSV.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import Encoding

from hal import storage
from provisioning.certs import to_pem
from provisioning.station.ledger import Row

# File names a MicroPython firmware loads (`ssl.SSLContext.load_cert_chain`, `load_verify_locations`).
PEM_FILES = {"chain": "device.pem", "key": "device.key", "ca": "ca.pem"}
DER_FILES = {"cert": "device.crt.der", "key": "device.key.der", "ca": "ca.crt.der"}
FORMATS = ("pem", "der")


def write_device_bundle(out: Path, fmt: str, key: object, chain: list[x509.Certificate]) -> list[Path]:
    """Write a board's credentials into `out`; returns the files written.

    pem: device.pem (leaf, issuing CA, root), device.key (PKCS#8), ca.pem (root).
    der: device.crt.der (leaf only: DER holds one certificate), device.key.der (SEC1 EC key, what
    `openssl ec -outform der` makes and mbedTLS reads), ca.crt.der (root). A DER board sends only
    its leaf, so the broker must hold the issuing CA in its client-CA file.
    """
    storage.ensure_dir(out, 0o700)
    if fmt == "pem":
        key_bytes = key.private_bytes(Encoding.PEM, serialization.PrivateFormat.PKCS8,  # type: ignore[attr-defined]
                                      serialization.NoEncryption())
        files = {PEM_FILES["chain"]: (to_pem(chain), storage.PUBLIC_MODE),
                 PEM_FILES["key"]: (key_bytes, storage.SECRET_MODE),
                 PEM_FILES["ca"]: (to_pem([chain[-1]]), storage.PUBLIC_MODE)}
    elif fmt == "der":
        key_bytes = key.private_bytes(Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL,  # type: ignore[attr-defined]
                                      serialization.NoEncryption())
        files = {DER_FILES["cert"]: (chain[0].public_bytes(Encoding.DER), storage.PUBLIC_MODE),
                 DER_FILES["key"]: (key_bytes, storage.SECRET_MODE),
                 DER_FILES["ca"]: (chain[-1].public_bytes(Encoding.DER), storage.PUBLIC_MODE)}
    else:
        raise ValueError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}")
    written = []
    for name, (data, mode) in files.items():
        storage.atomic_write(out / name, data, mode)
        written.append(out / name)
    return written


def write_server_bundle(out: Path, key: object, cert: x509.Certificate, ca_chain: list[x509.Certificate]) -> list[Path]:
    """server.pem (certificate + issuing CA, what mosquitto's `certfile` wants), server.key, ca.pem (root):
    the files the thin-edge seed configures as `certfile`, `keyfile` and the clients' `cafile`."""
    storage.ensure_dir(out, 0o700)
    key_bytes = key.private_bytes(Encoding.PEM, serialization.PrivateFormat.PKCS8,  # type: ignore[attr-defined]
                                  serialization.NoEncryption())
    files = {"server.pem": (to_pem([cert, *ca_chain[:-1]]), storage.PUBLIC_MODE),
             "server.key": (key_bytes, storage.SECRET_MODE),
             "ca.pem": (to_pem([ca_chain[-1]]), storage.PUBLIC_MODE)}
    for name, (data, mode) in files.items():
        storage.atomic_write(out / name, data, mode)
    return [out / name for name in files]


C8Y_COLUMNS = ("ID", "CREDENTIALS", "AUTH_TYPE", "TYPE", "NAME", "IDTYPE")


def c8y_bulk_csv(rows: Iterable[Row], device_type: str = "c8y_Device", id_type: str = "c8y_Serial") -> str:
    """Cumulocity bulk registration CSV for certificate devices (seed 004 "Bulk registration").

    One line per device holding an unrevoked device certificate, AUTH_TYPE = CERTIFICATES and an
    empty CREDENTIALS column, as the platform requires for certificate authentication. ID is the
    device id, which is the certificate CN and the MQTT client id. Semicolon-separated, the
    separator of the platform's bulk registration examples.
    """
    devices = sorted({r.device_id for r in rows if r.kind == "device" and r.revoked_at is None})
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter=";", lineterminator="\n")
    writer.writerow(C8Y_COLUMNS)
    for device in devices:
        writer.writerow((device, "", "CERTIFICATES", device_type, device, id_type))
    return buf.getvalue()
