"""Console operators: a CA of their own inside the station directory, and their client certificates.

Operators get certificates from a separate operator CA (`DIR/console/operator-ca.pem`), never from the
issuing CA: a certificate the issuing CA signs for `alice` would also be a device certificate that a
broker trusting the station accepts as device `alice`. The console's TLS accepts only this CA; the
ledger's `console_operators` table says who holds which certificate, with which role, and whether it
is revoked (checked on every request).
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hal import storage
from hal.keys.file import generate, load_pem, to_pem
from provisioning import authority
from provisioning.authority import Issuer
from provisioning.certs import load_certificates
from provisioning.certs import to_pem as certs_pem
from provisioning.station.ca import Station
from provisioning.station.console.store import CLI_NAME, ROLES, ConsoleStore
from provisioning.station.errors import StationError
from provisioning.station.ledger import serial_hex

CONSOLE_DIR = "console"
OPERATOR_CA, OPERATOR_CA_KEY = "operator-ca.pem", "operator-ca.key"
CONSOLE_CERT, CONSOLE_KEY = "console.pem", "console.key"
# The O of the operator CA; browsers' AutoSelectCertificateForUrls policies filter on it (docs/console.md)
OPERATOR_ORG = "Tether station console"
OPERATOR_DAYS = 365
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise StationError(f"operator NAME {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a "
                           "letter or digit")
    if name == CLI_NAME:
        raise StationError(f"operator NAME {name!r}: reserved for the command line's rows in the audit trail")
    return name


def operator_ca(station: Station) -> Issuer:
    """The operator CA of `station`, made on first use (EC P-256, 10 years, key 0600)."""
    directory = storage.ensure_dir(station.path(CONSOLE_DIR), 0o700)
    cert_file, key_file = directory / OPERATOR_CA, directory / OPERATOR_CA_KEY
    existing = storage.read_bytes(cert_file)
    if existing is not None:
        data = storage.read_bytes(key_file)
        if data is None:
            raise StationError(f"{key_file}: missing while {cert_file} exists; restore it from the backup")
        return Issuer(load_certificates(existing, str(cert_file))[0], load_pem(data, None, str(key_file)))
    key = generate("ec-p256")
    cert = authority.root_ca(key, cn=f"Tether Operator CA ({station.settings.trust_domain})",
                             organization=OPERATOR_ORG)
    storage.atomic_write(key_file, to_pem(key, None), storage.SECRET_MODE)
    storage.atomic_write(cert_file, certs_pem([cert]), storage.PUBLIC_MODE)
    return Issuer(cert, key)


@dataclass(frozen=True)
class IssuedOperator:
    name: str
    role: str
    serial: str
    files: list[Path]
    p12_password: str


def add_operator(station: Station, store: ConsoleStore, name: str, role: str, out: Path, now: int,
                 p12_password: str | None = None, days: int = OPERATOR_DAYS) -> IssuedOperator:
    """Issue a console client certificate for `name` with `role` and write it to `out`:
    NAME.p12 (key + certificate + operator CA, for a browser; encrypted with `p12_password` or a new
    random one), NAME.pem, NAME.key (0600) and station-ca.pem (the root that signed the console's
    server certificate, for the browser's trust store)."""
    check_name(name)
    if role not in ROLES:
        raise StationError(f"--role {role!r}: expected one of {', '.join(ROLES)}")
    ca = operator_ca(station)
    key = generate("ec-p256")
    if not isinstance(key, ec.EllipticCurvePrivateKey):  # PKCS#12 takes classic key types only
        raise StationError(f"internal: an operator key must be EC P-256, got {type(key).__name__}")
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                         x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, OPERATOR_ORG)])
    cert = authority.build(subject, key.public_key(), ca, ca.key, ca=False, lifetime=dt.timedelta(days=days),
                           usage=authority._usage(digital_signature=True), eku=[ExtendedKeyUsageOID.CLIENT_AUTH])
    password = p12_password or secrets.token_urlsafe(12)
    p12 = pkcs12.serialize_key_and_certificates(name.encode(), key, cert, [ca.cert],
                                                serialization.BestAvailableEncryption(password.encode()))
    storage.ensure_dir(out, 0o700)
    files = {f"{name}.p12": (p12, storage.SECRET_MODE), f"{name}.key": (to_pem(key, None), storage.SECRET_MODE),
             f"{name}.pem": (certs_pem([cert]), storage.PUBLIC_MODE),
             "station-ca.pem": (certs_pem([station.root]), storage.PUBLIC_MODE)}
    for file_name, (data, mode) in files.items():
        storage.atomic_write(out / file_name, data, mode)
    serial = serial_hex(cert.serial_number)
    store.add_operator(serial, name, role, now, int(cert.not_valid_after_utc.timestamp()),
                       cert.public_bytes(serialization.Encoding.DER))
    return IssuedOperator(name, role, serial, [out / f for f in files], password)


def console_server_cert(station: Station, host: str, store: ConsoleStore) -> tuple[Path, Path]:
    """The console's HTTPS certificate (issued by the issuing CA, recorded in the ledger as a server
    certificate), made anew when missing, expiring within a day or not naming `host`."""
    directory = storage.ensure_dir(station.path(CONSOLE_DIR), 0o700)
    cert_file, key_file = directory / CONSOLE_CERT, directory / CONSOLE_KEY
    dns, ips = _names_for(host)
    existing = storage.read_bytes(cert_file)
    if existing is not None and key_file.exists():
        cert = load_certificates(existing, str(cert_file))[0]
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = set(san.get_values_for_type(x509.DNSName)) | {str(i) for i in san.get_values_for_type(x509.IPAddress)}
        fresh = cert.not_valid_after_utc > dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
        if fresh and set(dns) | set(ips) <= names:
            return cert_file, key_file
    key: Any = generate("ec-p256")
    now = int(dt.datetime.now(dt.UTC).timestamp())
    row, _ = store.ledger.issue("tether-station-console", "-", now,
                                lambda: station.server_cert(key.public_key(), "tether-station console", dns, ips),
                                kind="server", reuse=False)
    storage.atomic_write(key_file, to_pem(key, None), storage.SECRET_MODE)
    storage.atomic_write(cert_file, certs_pem([row.certificate, station.issuer.cert]), storage.PUBLIC_MODE)
    return cert_file, key_file


def _names_for(host: str) -> tuple[list[str], list[str]]:
    import ipaddress

    from provisioning.station.ca import default_server_names

    dns, ips = default_server_names()
    if host not in ("0.0.0.0", "::", ""):  # noqa: S104 - a wildcard bind has no name of its own
        try:
            ipaddress.ip_address(host)
            ips = sorted({*ips, host})
        except ValueError:
            dns = sorted({*dns, host})
    return dns, ips
