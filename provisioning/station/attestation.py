"""Attested enrollment decisions (docs/station.md "Attested enrollment"): a `Request` in, a JSON body, an
`Answer` or a `Refusal` out; the ledger's part is in `attest_store`.

`POST /.well-known/est/attest/start` (JSON: device id, EK certificate, EK and AK public areas): the EK
must chain to a trusted TPM maker, be on the allow-list when one is kept, and not have enrolled another
device; the AK must be a restricted signing key of a TPM. The answer is a credential
(TPM2_MakeCredential) holding a fresh secret for that AK, and a nonce.

`POST /.well-known/est/attest/simpleenroll` (an EST enrollment under the label "attest"): HTTP Basic
with the device id and the recovered secret (hex) as the password, and a CSR carrying TPM2_Certify of
its key by the AK over the nonce (`provisioning.attest.evidence`). The certificate carries the TCG
certificate policies for a key verified to reside in a TPM and be fixed to it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from provisioning import PemError, ProvisioningError
from provisioning.attest import AttestError
from provisioning.attest.credential import make_credential
from provisioning.attest.evidence import read_evidence
from provisioning.attest.tpm2 import Public
from provisioning.attest.verify import check_ak, check_certify, check_ek_public, ek_digest
from provisioning.certs import load_csr
from provisioning.identity import check_device_id
from provisioning.station.attest_store import AttestStore, device_bound_reason, ek_bound_reason
from provisioning.station.ca import Station
from provisioning.station.errors import Refusal
from provisioning.station.ledger import Ledger, barred_reason

START, ENROLL, CACERTS = "attest/start", "attest/simpleenroll", "attest/cacerts"
JSON_TYPE = "application/json"
CSR_TYPE = "application/pkcs10"
NONCE_SIZE = 32
MAX_FIELD = 8192  # base64 characters of one field: an EK certificate is 1-2 KB

# TCG OID registry, "TPM 2.0 Keys for Device Identity and Attestation" §8: the key was verified to be in
# a TPM (residency) and fixed to it (fixedTPM, fixedParent)
TPM_RESIDENCY = x509.ObjectIdentifier("2.23.133.11.1.1")
TPM_FIXED = x509.ObjectIdentifier("2.23.133.11.1.2")
ATTESTED_POLICIES = x509.CertificatePolicies([x509.PolicyInformation(TPM_RESIDENCY, None),
                                              x509.PolicyInformation(TPM_FIXED, None)])


def claimed_device(body: bytes) -> str:
    """The device id a start request names, for the refusal record ("?" when unreadable)."""
    try:
        value = json.loads(body).get("device_id")
    except (ValueError, AttributeError):
        return "?"
    return value if isinstance(value, str) and value else "?"


def _field(doc: dict[str, Any], key: str) -> bytes:
    value = doc.get(key)
    if not isinstance(value, str) or not value or len(value) > MAX_FIELD:
        raise Refusal(400, f"attest/start: {key} must be a base64 string of at most {MAX_FIELD} characters")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise Refusal(400, f"attest/start: {key} is not valid base64") from None


def attested(cert: x509.Certificate) -> bool:
    """True when `cert` carries the policies this station writes for a TPM-attested key."""
    try:
        policies = cert.extensions.get_extension_for_class(x509.CertificatePolicies).value
    except x509.ExtensionNotFound:
        return False
    return {p.policy_identifier for p in policies} >= {TPM_RESIDENCY, TPM_FIXED}


class Attestation:
    """Attested enrollment for one station and ledger; thread-safe (state lives in the ledger)."""

    def __init__(self, station: Station, ledger: Ledger, clock: Callable[[], float],
                 check_csr: Callable[[x509.CertificateSigningRequest, str], None]) -> None:
        """`check_csr(csr, device_id)`: the identity policy /simpleenroll applies (Refusal when broken)."""
        self.station = station
        self.check_csr = check_csr
        self.store = AttestStore(ledger)
        self.clock = clock

    # -- attest/start ------------------------------------------------------------------------------------
    def start(self, content_type: str, body: bytes) -> bytes:
        """The JSON answer to a start request; Refusal for anything the station will not challenge."""
        if content_type != JSON_TYPE:
            raise Refusal(415, f"attest/start: Content-Type must be {JSON_TYPE}, got {content_type or 'none'!r}")
        try:
            doc = json.loads(body)
        except ValueError as exc:
            raise Refusal(400, f"attest/start: the body is not JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise Refusal(400, "attest/start: the body must be a JSON object")
        try:
            device_id = check_device_id(doc.get("device_id") if isinstance(doc.get("device_id"), str) else "",
                                        "attest/start device_id", self.station.settings.reserved)
        except ProvisioningError as exc:
            raise Refusal(400, str(exc)) from None
        try:
            ek_cert = x509.load_der_x509_certificate(_field(doc, "ek_certificate"))
        except ValueError as exc:
            raise Refusal(400, f"attest/start: ek_certificate is not a DER certificate: {exc}") from None
        now = self.clock()
        try:
            self.station.ek_trust.check(ek_cert, now)
            ek = Public.parse(_field(doc, "ek_public"), "ek_public")
            check_ek_public(ek, ek_cert)
            ak = Public.parse(_field(doc, "ak_public"), "ak_public")
            check_ak(ak)
        except AttestError as exc:
            raise Refusal(403, f"attest/start for {device_id!r}: {exc}") from None
        digest = ek_digest(ek_cert)
        self._check_ek(digest, device_id)
        try:  # the EK's own parameters (its symmetric algorithm, its name algorithm) decide what can be made
            credential = make_credential(ek, ak.name)
        except AttestError as exc:
            raise Refusal(403, f"attest/start for {device_id!r}: {exc}") from None
        nonce = os.urandom(NONCE_SIZE)
        challenge = self.store.open(device_id, digest, ak.raw, nonce, hashlib.sha256(credential.secret).hexdigest(),
                                    int(now), self.station.settings.attest_ttl)
        return json.dumps({"challenge": challenge.id, "ek_digest": digest,
                           "credential_blob": base64.b64encode(credential.id_object).decode(),
                           "encrypted_secret": base64.b64encode(credential.encrypted_secret).decode(),
                           "nonce": base64.b64encode(nonce).decode(), "expires_at": challenge.expires_at}).encode()

    def _replaces(self, digest: str, device_id: str) -> bool:
        """True when the operator bound this EK to this device id on the allow-list (a replaced TPM)."""
        entry = self.store.allowed(digest)
        return entry is not None and entry.device_id == device_id

    def _check_ek(self, digest: str, device_id: str) -> None:
        """The allow-list (when kept), an EK bound to another device, a device that enrolled before in
        another way, a barred device: refused at start, so no credential is made for them (issuance checks
        the last three again in its transaction)."""
        if self.station.settings.ek_allowlist:
            entry = self.store.allowed(digest)
            if entry is None:
                raise Refusal(403, f"EK {digest} is not on the station's EK allow-list (ek_allowlist = true; "
                                   "register it with `tether-station attest allow`)")
            if entry.device_id is not None and entry.device_id != device_id:
                raise Refusal(403, f"EK {digest} is registered for device {entry.device_id!r} (batch "
                                   f"{entry.batch!r}), not {device_id!r}")
        bound = self.store.device_of_ek(digest)
        if bound is not None and bound != device_id:
            raise Refusal(403, ek_bound_reason(digest, bound, device_id))
        other = None if self._replaces(digest, device_id) else self.store.enrolled_otherwise(device_id, digest)
        if other is not None:  # any genuine TPM could otherwise take over an enrolled device's identity
            raise Refusal(403, device_bound_reason(device_id, other, digest))
        bar = self.store.ledger.bar(device_id)
        if bar is not None:
            raise Refusal(403, barred_reason(bar))

    # -- attest/simpleenroll -----------------------------------------------------------------------------
    def enroll(self, content_type: str, body: bytes, basic: tuple[str, str] | None) -> tuple[Any, bool]:
        """(ledger row, reused) for an enrollment proving the credential's secret and carrying a certify of
        the CSR's key over the challenge's nonce."""
        if basic is None:
            raise Refusal(401, "attested enrollment needs HTTP Basic: the device id and, as the password, the "
                               "secret recovered with TPM2_ActivateCredential (hex)")
        user, password = basic
        try:
            secret = bytes.fromhex(password)
        except ValueError:
            secret = b""
        challenge = self.store.find(hashlib.sha256(secret).hexdigest()) if secret else None
        if challenge is None:
            raise Refusal(401, f"the password is not the secret of any open TPM credential (for {user!r}): the "
                               "credential was not activated by the TPM holding the EK and the AK, or was replaced")
        if challenge.device_id != user:
            raise Refusal(403, f"the TPM credential was made for device {challenge.device_id!r}, not {user!r}: "
                               "one device's attestation cannot enroll another")
        if content_type != CSR_TYPE:
            raise Refusal(415, f"Content-Type must be {CSR_TYPE} (base64 DER PKCS#10), got {content_type or 'none'!r}")
        try:
            csr = load_csr(body, "request body")
        except PemError as exc:
            raise Refusal(400, f"malformed CSR: {exc}") from None
        try:
            evidence = read_evidence(csr)
        except AttestError as exc:
            raise Refusal(400, str(exc)) from None
        try:
            check_certify(evidence, Public.parse(challenge.ak_public, "ak_public"), challenge.nonce, csr.public_key())
        except AttestError as exc:
            raise Refusal(403, f"attested enrollment of {user!r}: {exc}") from None
        self.check_csr(csr, user)
        fingerprint = hashlib.sha256(csr.public_bytes(Encoding.DER)).hexdigest()

        def sign() -> x509.Certificate:
            return self.station.device_cert(csr.public_key(), user, extensions=[ATTESTED_POLICIES])

        return self.store.issue(challenge, fingerprint, int(self.clock()), sign,
                                replaces=self._replaces(challenge.ek_digest, user))
