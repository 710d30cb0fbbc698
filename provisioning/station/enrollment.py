"""What the EST server decides, without any I/O of its own (RFC 7030 sections 3.2.3, 3.3, 4.2).

The HTTP layer hands in a `Request` (operation, content type, body, HTTP Basic credentials, the TLS
peer certificate OpenSSL already verified) and gets back an `Answer` or a `Refusal` naming the HTTP
status and why. Order of checks: authentication (401), content type (415), CSR syntax (400),
identity policy (403), then the ledger transaction, which re-checks the one-time password.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from provisioning.certs import common_name, issued_by, load_csr, pkcs7_certs_only, serial_of, subject_of
from provisioning.errors import PemError, PolicyError, ProvisioningError
from provisioning.identity import check_device_id
from provisioning.station.ca import Station
from provisioning.station.errors import Refusal
from provisioning.station.ledger import Ledger, Row, serial_hex
from provisioning.station.otp import MAX_OTP_LENGTH, otp_hash

ENROLL, REENROLL = "simpleenroll", "simplereenroll"
CSR_TYPE = "application/pkcs10"


@dataclass(frozen=True)
class Request:
    operation: str                       # ENROLL or REENROLL
    content_type: str                    # the media type, parameters stripped, lowercase
    body: bytes
    basic: tuple[str, str] | None = None  # HTTP Basic (user, password)
    peer_der: bytes | None = None         # TLS client certificate, already verified by the handshake


@dataclass(frozen=True)
class Answer:
    chain: list[x509.Certificate]        # leaf, issuing CA .. root
    row: Row
    reused: bool                         # a retry answered with the certificate issued before

    @property
    def body(self) -> bytes:
        return pkcs7_certs_only(self.chain)


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    return issued_by(cert, issuer)


class Enrollment:
    """EST decisions for one station and ledger; thread-safe (state lives in the ledger)."""

    def __init__(self, station: Station, ledger: Ledger, clock: Callable[[], float] = time.time) -> None:
        self.station = station
        self.ledger = ledger
        self.clock = clock
        station.issuer  # noqa: B018 - load (and decrypt) the CA key now, not in the first request

    @cached_property
    def cacerts_body(self) -> bytes:
        """GET /cacerts: the issuing CA and the root (RFC 7030 4.1.3)."""
        return pkcs7_certs_only(self.station.ca_chain)

    def handle(self, req: Request) -> Answer:
        """Enroll or re-enroll; raise Refusal(status, why) for anything the station will not sign."""
        if req.operation == ENROLL:
            device_id, digest, peer = self._authenticate_enroll(req)
        elif req.operation == REENROLL:
            device_id, peer = self._authenticate_reenroll(req)
            digest = None
        else:
            raise Refusal(404, f"unknown EST operation {req.operation!r}")
        if req.content_type != CSR_TYPE:
            raise Refusal(415, f"Content-Type must be {CSR_TYPE} (base64 DER PKCS#10, RFC 7030 4.2.1), "
                               f"got {req.content_type or 'none'!r}")
        try:
            csr = load_csr(req.body, "request body")
        except PemError as exc:
            raise Refusal(400, f"malformed CSR: {exc}") from None
        try:
            self.station.policy.check_csr(csr, device_id)
        except PolicyError as exc:
            raise Refusal(403, str(exc)) from None
        if peer is not None and req.operation == REENROLL and csr.subject != peer.subject:
            raise Refusal(403, f"re-enrollment must keep the subject: the client certificate is for "
                               f"{subject_of(peer)!r}, the CSR asks for {csr.subject.rfc4514_string()!r}")
        fingerprint = hashlib.sha256(csr.public_bytes(Encoding.DER)).hexdigest()
        now = int(self.clock())
        sans = self._extra_sans(csr)

        def sign() -> x509.Certificate:
            return self.station.device_cert(csr.public_key(), device_id, sans)

        if digest is not None:
            row, reused = self.ledger.issue_with_otp(device_id, digest, fingerprint, now, sign)
        else:
            row, reused = self.ledger.issue(device_id, fingerprint, now, sign)
        return Answer([row.certificate, *self.station.ca_chain], row, reused)

    # -- authentication ------------------------------------------------------------------------------
    def _authenticate_enroll(self, req: Request) -> tuple[str, str | None, x509.Certificate | None]:
        if req.basic is not None:
            user, password = req.basic
            try:
                device_id = check_device_id(user, "HTTP Basic user (the device id)")
            except ProvisioningError as exc:
                raise Refusal(401, str(exc)) from None
            if not password or len(password) > MAX_OTP_LENGTH:
                raise Refusal(401, f"HTTP Basic password must be the one-time password for {device_id!r}")
            digest = otp_hash(device_id, password)
            self._precheck_otp(device_id, digest)
            return device_id, digest, None
        if req.peer_der is not None:
            peer = x509.load_der_x509_certificate(req.peer_der)
            if any(_issued_by(peer, ca) for ca in self.station.bootstrap_cas):
                cn = common_name(peer.subject)
                try:
                    return check_device_id(cn, f"bootstrap certificate {subject_of(peer)} CN"), None, peer
                except ProvisioningError as exc:
                    raise Refusal(403, str(exc)) from None
            if _issued_by(peer, self.station.issuer.cert):
                raise Refusal(401, f"{subject_of(peer)} already holds a certificate from this station: "
                                   "use /simplereenroll to renew it")
        raise Refusal(401, "no credentials: send HTTP Basic (device id, one-time password from "
                           "`tether-station otp`) or a client certificate from the bootstrap CA")

    def _precheck_otp(self, device_id: str, digest: str) -> None:
        """Refuse unknown and expired passwords before any CSR work; the transaction decides the rest."""
        found = self.ledger.find_otp(digest)
        if found is None or found.device_id != device_id:
            raise Refusal(401, f"one-time password is not valid for device {device_id!r} (unknown or mistyped; "
                               "ask the station operator for a new one)")
        if found.used_at is None and found.expires_at < int(self.clock()):
            raise Refusal(401, f"one-time password for {device_id!r} expired "
                               f"{int(self.clock()) - found.expires_at} s ago; ask for a new one-time password")

    def _authenticate_reenroll(self, req: Request) -> tuple[str, x509.Certificate]:
        if req.peer_der is None:
            raise Refusal(401, "re-enrollment needs the device's current certificate as the TLS client "
                               "certificate (mutual TLS)")
        peer = x509.load_der_x509_certificate(req.peer_der)
        if not _issued_by(peer, self.station.issuer.cert):
            raise Refusal(401, f"client certificate {subject_of(peer)} (serial {serial_of(peer)}) was not issued "
                               "by this station's issuing CA")
        row = self.ledger.get(serial_hex(peer.serial_number))
        if row is None:
            raise Refusal(403, f"client certificate {subject_of(peer)} (serial {serial_of(peer)}) is not in the "
                               "ledger")
        if row.revoked_at is not None:
            raise Refusal(403, f"client certificate {subject_of(peer)} (serial {serial_of(peer)}) was revoked; "
                               "the device must enroll again with a new one-time password")
        if row.kind != "device":
            raise Refusal(403, f"{subject_of(peer)} is a {row.kind} certificate, not a device certificate")
        return row.device_id, peer

    @staticmethod
    def _extra_sans(csr: x509.CertificateSigningRequest) -> list[x509.GeneralName]:
        """DNS and IP SANs the device asked for; the SPIFFE ID is set by the profile, other URIs dropped."""
        try:
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return []
        return [n for n in san if isinstance(n, x509.DNSName | x509.IPAddress)]
