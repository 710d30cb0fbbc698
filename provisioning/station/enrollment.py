"""What the EST server decides, without any I/O of its own (RFC 7030 sections 3.2.3, 3.3, 4.2).

The HTTP layer hands in a `Request` (operation, content type, body, HTTP Basic credentials, the TLS
peer certificate OpenSSL already verified) and gets back an `Answer` or a `Refusal` naming the HTTP
status and why. Order of checks: authentication (401), content type (415), CSR syntax (400),
identity policy (403), signing, then the ledger transaction, which re-checks the one-time password
and everything else another worker may have changed (a refusal there drops the signed certificate).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from functools import cached_property
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from provisioning import PemError, PolicyError, ProvisioningError, der
from provisioning.authority import Issued
from provisioning.certs import ReadCsr, common_name, issued_by, pkcs7_certs_only, read_csr, serial_of, subject_of
from provisioning.identity import check_device_id
from provisioning.printable import escape_logger
from provisioning.station.attestation import Attestation
from provisioning.station.ca import Station
from provisioning.station.database import Query
from provisioning.station.errors import Refusal
from provisioning.station.ledger import Ledger, Row, revoked_reason, serial_hex
from provisioning.station.otp import MAX_OTP_LENGTH, otp_hash
from provisioning.station.ratelimit import FailureLimiter, address_key
from provisioning.station.refusals import RefusalRecorder

# server.py logs through the same logger: the filter escapes outside input in all of its lines
log: logging.Logger = escape_logger("tether.station")

ENROLL, REENROLL = "simpleenroll", "simplereenroll"

T = TypeVar("T")
Work = Callable[[Query], Any]        # one ledger write: run inside a write transaction, its result sent back
Steps = Generator[Work, Any, T]      # a decision that yields its ledger writes (see `Enrollment.steps`)
CSR_TYPE = "application/pkcs10"


@dataclass(frozen=True)
class Request:
    operation: str                       # ENROLL or REENROLL
    content_type: str                    # the media type, parameters stripped, lowercase
    body: bytes
    basic: tuple[str, str] | None = None  # HTTP Basic (user, password)
    peer_der: bytes | None = None         # TLS client certificate, already verified by the handshake
    client: str = ""                      # the client's address (rate limits of password guessing)


@dataclass(frozen=True)
class Answer:
    """The issued (or, for a retry, the earlier) certificate's ledger row; never parsed again to answer."""

    row: Row
    reused: bool                         # a retry answered with the certificate issued before

    @property
    def body(self) -> bytes:
        """The issued certificate alone (RFC 7030 4.2.3); clients get the chain from /cacerts. Wrapped
        from the ledger row's DER as it is: no certificate is parsed and written again for it."""
        return der.pkcs7_certs_only([self.row.cert_der])


def _der(tag: int, content: bytes) -> bytes:
    assert len(content) < 128  # the short form is enough for the few OIDs below
    return bytes([tag, len(content)]) + content


# RFC 7030 4.5.2 CsrAttrs: a CN (the device id), ECDSA with SHA-256 on a P-256 key. OIDs 2.5.4.3,
# 1.2.840.10045.4.3.2, and the attribute id-ecPublicKey (1.2.840.10045.2.1) = { prime256v1 }.
CSR_ATTRS = _der(0x30, _der(0x06, bytes.fromhex("550403"))
                 + _der(0x06, bytes.fromhex("2a8648ce3d040302"))
                 + _der(0x30, _der(0x06, bytes.fromhex("2a8648ce3d0201"))
                        + _der(0x31, _der(0x06, bytes.fromhex("2a8648ce3d030107")))))


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    return issued_by(cert, issuer)


class Enrollment:
    """EST decisions for one station and ledger; thread-safe (state lives in the ledger)."""

    def __init__(self, station: Station, ledger: Ledger, clock: Callable[[], float] = time.time) -> None:
        self.station = station
        self.ledger = ledger
        self.clock = clock
        settings = station.settings
        self.reserved = settings.reserved
        # keyed by client address only: a device id is printed on its label, so a limit (or a lock) per
        # id would let anyone on the line stop a device by guessing at it, and with 128 random bits
        # per password it protects nothing (issue 22 item 5)
        self.guesses_by_client = FailureLimiter(settings.otp_failure_burst, settings.otp_failure_window)
        # what a refusal leaves in the ledger (routes.py records each one; server.py runs its sweeps)
        self.refusals = RefusalRecorder(ledger, per_address=settings.events_per_address,
                                        window=settings.events_window, max_age=settings.events_max_age,
                                        max_rows=settings.events_max_rows, clock=clock)
        station.issuer  # noqa: B018 - load (and decrypt) the CA key now, not in the first request
        station.device_template  # noqa: B018 - and encode (and check) the device certificate template
        station.reenroll_password  # noqa: B018 - a missing or readable password file fails `serve` at start
        station.ek_trust  # noqa: B018 - and the TPM makers' roots: a missing ek_roots file stops `serve` here

    @cached_property
    def attestation(self) -> Attestation:
        """Attested enrollment (TPM); its tables are created on first use."""
        return Attestation(self.station, self.ledger, self.clock, self.check_csr)

    @cached_property
    def cacerts_body(self) -> bytes:
        """GET /cacerts: the issuing CA and the root (RFC 7030 4.1.3)."""
        return pkcs7_certs_only(self.station.ca_chain)

    @property
    def csrattrs_body(self) -> bytes:
        """GET /csrattrs: what the station wants in a CSR (RFC 7030 4.5), base64 DER on one line (RFC 8951)."""
        return base64.b64encode(CSR_ATTRS)

    def handle(self, req: Request) -> Answer:
        """Enroll or re-enroll; raise Refusal(status, why) for anything the station will not sign."""
        return drive(self.steps(req), self.ledger.db.write)

    def steps(self, req: Request) -> Steps[Answer]:
        """`handle` as steps: yields each ledger write (a work for `Database.write`) and is sent what it
        returned, or has what it raised thrown in; returns the Answer. Whoever drives it decides where
        the writes are made: `handle` blocks on each (a pool thread), the worker's loop submits them to
        its `committer.Committer` and goes on serving other connections until the COMMIT returned.

        The certificate is signed here, before the issuing transaction (the loop signs; the commit
        thread only runs statements), after every check that can be made outside it (the password
        known and not expired, the client certificate in the ledger and not revoked, the policy).
        The transaction decides again what another worker may have changed meanwhile (the password
        used, voided, the device barred, the predecessor revoked, the cap); when it refuses, the signed
        certificate is dropped with the refusal: never recorded, never answered, never logged."""
        predecessor = None
        if req.operation == ENROLL:
            device_id, digest, peer = self._authenticate_enroll(req)
        elif req.operation == REENROLL:
            device_id, peer = self._authenticate_reenroll(req)
            digest = None
            predecessor = serial_hex(peer.serial_number)
            # the device uses this certificate: its predecessor is done (durable before any answer, as
            # it was when it was written in `_authenticate_reenroll`)
            yield self.ledger.presentation(predecessor, int(self.clock()))
        else:
            raise Refusal(404, f"unknown EST operation {req.operation!r}")
        if req.content_type != CSR_TYPE:
            raise Refusal(415, f"Content-Type must be {CSR_TYPE} (base64 DER PKCS#10, RFC 7030 4.2.1), "
                               f"got {req.content_type or 'none'!r}")
        try:
            # subject and key decoded once, for the policy, the re-enrollment check and the signer
            read = read_csr(req.body, "request body")
        except PemError as exc:
            raise Refusal(400, f"malformed CSR: {exc}") from None
        self.check_csr(read, device_id)
        if peer is not None and req.operation == REENROLL and read.subject != peer.subject:
            raise Refusal(403, f"re-enrollment must keep the subject: the client certificate is for "
                               f"{subject_of(peer)!r}, the CSR asks for {read.subject.rfc4514_string()!r}")
        fingerprint = hashlib.sha256(read.csr.public_bytes(Encoding.DER)).hexdigest()
        now = int(self.clock())

        # only the SPIFFE ID: DNS and IP SANs a device asks for are never copied (a device certificate
        # naming a host could serve TLS for it)
        issued = self.station.issue_device(read.key, device_id, read.spki())

        def sign() -> Issued:
            return issued

        if digest is not None:
            work = self.ledger.otp_issuance(device_id, digest, fingerprint, now, sign)
        elif predecessor is None:  # a factory bootstrap certificate: refused while the device is barred
            work = self.ledger.bootstrap_issuance(device_id, fingerprint, now, sign)
        else:
            work = self.ledger.issuance(device_id, fingerprint, now, sign, predecessor=predecessor)
        row, reused = yield work
        return Answer(row, reused)

    def check_csr(self, csr: x509.CertificateSigningRequest | ReadCsr, device_id: str) -> None:
        """Refusal(403) unless the identity policy lets `device_id` have this CSR signed."""
        try:
            self.station.policy.check_csr(csr, device_id)
        except PolicyError as exc:
            # a CSR with no SAN URI (only CN=<id>, what most EST clients make) is fine: the station
            # writes the SPIFFE ID itself from the authenticated id; a SAN naming anything else is not
            request = csr.csr if isinstance(csr, ReadCsr) else csr
            left = [v for v in exc.violations if not (v.rule == "spiffe-id" and _no_san_uri(request))]
            if left:
                raise Refusal(403, str(PolicyError(left, what=f"CSR for {device_id}"))) from None

    # -- authentication ------------------------------------------------------------------------------
    def _authenticate_enroll(self, req: Request) -> tuple[str, str | None, x509.Certificate | None]:
        if req.basic is not None:
            user, password = req.basic
            try:
                device_id = check_device_id(user, "HTTP Basic user (the device id)", self.reserved)
            except ProvisioningError as exc:
                raise Refusal(401, str(exc)) from None
            self._check_guess_rate(req.client)
            if not password or len(password) > MAX_OTP_LENGTH:
                raise Refusal(401, f"HTTP Basic password must be the one-time password for {device_id!r}")
            digest = otp_hash(device_id, password)
            self._precheck_otp(device_id, digest, req.client)
            return device_id, digest, None
        if req.peer_der is not None:
            peer = x509.load_der_x509_certificate(req.peer_der)
            if any(_issued_by(peer, ca) for ca in self.station.bootstrap_cas):
                cn = common_name(peer.subject)
                try:
                    where = f"bootstrap certificate {subject_of(peer)} CN"
                    return check_device_id(cn, where, self.reserved), None, peer
                except ProvisioningError as exc:
                    raise Refusal(403, str(exc)) from None
            if _issued_by(peer, self.station.issuer.cert):
                raise Refusal(401, f"{subject_of(peer)} already holds a certificate from this station: "
                                   "use /simplereenroll to renew it")
        raise Refusal(401, "no credentials: send HTTP Basic (device id, one-time password from "
                           "`tether-station otp`) or a client certificate from the bootstrap CA")

    def _precheck_otp(self, device_id: str, digest: str, client: str = "") -> None:
        """Refuse unknown (counted against the client's address) and expired passwords before any CSR
        work; the transaction decides the rest (voided by a revocation, used)."""
        found = self.ledger.find_otp(digest)
        if found is None or found.device_id != device_id:
            if client:
                self.guesses_by_client.failed(address_key(client), self.clock())
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
        gone = row.revocation(int(self.clock()))
        if gone is not None:
            raise Refusal(403, revoked_reason(row, *gone))
        if row.kind != "device":
            raise Refusal(403, f"{subject_of(peer)} is a {row.kind} certificate, not a device certificate")
        self._check_reenroll_password(req, row.device_id)
        return row.device_id, peer  # `steps` records that the device presented it

    def _check_reenroll_password(self, req: Request, device_id: str) -> None:
        """With station.toml reenroll_password_file, re-enrollment also wants HTTP Basic (user: the device
        id, password: that file's), as RFC 7030 3.2.3 allows and libest's estserver does by default."""
        expected = self.station.reenroll_password
        if expected is None:
            return
        user, password = req.basic or ("", "")
        if user != device_id or not hmac.compare_digest(password.encode(), expected.encode()):
            raise Refusal(401, f"re-enrollment of {device_id!r} also needs HTTP Basic with the device id and the "
                               "station's re-enrollment password (station.toml reenroll_password_file)")

    # -- password guessing ---------------------------------------------------------------------------
    def _check_guess_rate(self, client: str) -> None:
        """429 with Retry-After while this client's address (an IPv6 client's /64) has failed too often;
        the wait ends when its oldest counted failure leaves the window, so no lock outlives it."""
        wait = self.guesses_by_client.retry_after(address_key(client), self.clock()) if client else None
        if wait is not None:
            raise Refusal(429, f"too many wrong one-time passwords from client {client}; retry in {wait} s",
                          retry_after=wait)


def drive(steps: Steps[T], write: Callable[[Work], Any]) -> T:
    """Run `steps` to its end in this thread, each ledger write it yields made by `write` (blocking):
    what `write` returns is sent back, what it raises is thrown in where the step was yielded."""
    try:
        work = next(steps)
        while True:
            try:
                value = write(work)
            except Exception as exc:  # noqa: BLE001 - raised again inside the steps, where it belongs
                work = steps.throw(exc)
            else:
                work = steps.send(value)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


def _no_san_uri(csr: x509.CertificateSigningRequest) -> bool:
    """True when the CSR's extensions parse and name no URI (a duplicated or unreadable SAN is not that)."""
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return True
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
        return False
    return not san.get_values_for_type(x509.UniformResourceIdentifier)
