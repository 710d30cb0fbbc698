"""What the station checks before it believes a TPM: pure functions, clock given, `AttestError` out.

1. `EkTrust.check`: the EK certificate chains (signatures, CA flags, validity) to a root certificate
   of a TPM maker the station was told to trust (station.toml `ek_roots`, roots and intermediates).
2. `check_ek_public`: the EK public area the device sent holds the certificate's key and is a
   restricted decryption key (what MakeCredential encrypts to).
3. `check_ak`: the AK is a restricted signing key made in the TPM and unable to leave it (fixedTPM,
   fixedParent, sensitiveDataOrigin). A restricted key signs only digests the TPM computed itself
   when they start with TPM_GENERATED_VALUE, so a TPMS_ATTEST it signed was made by the TPM.
4. `check_certify`: the AK signed the TPMS_ATTEST; its extraData is the station's nonce; the name it
   certifies is the name of the public area sent with it; that public area holds the CSR's key; and
   that key has fixedTPM, fixedParent and sensitiveDataOrigin (made in this TPM, cannot leave it).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from provisioning.attest import AttestError
from provisioning.attest.evidence import TpmCertify
from provisioning.attest.tpm2 import (
    DECRYPT,
    FIXED_PARENT,
    FIXED_TPM,
    RESTRICTED,
    SENSITIVE_DATA_ORIGIN,
    SIGN,
    Attest,
    Public,
    Signature,
    attribute_names,
)
from provisioning.certs import issued_by, same_public_key, serial_of

MAX_DEPTH = 5
KEY_IN_TPM = (FIXED_TPM, FIXED_PARENT, SENSITIVE_DATA_ORIGIN)


def ek_digest(cert_or_key: x509.Certificate | Any) -> str:
    """`sha256:<hex>` of the EK's SubjectPublicKeyInfo: the EK's identity in the ledger and allow-lists
    (the same value whatever certificate a maker issues for the key)."""
    key = cert_or_key.public_key() if isinstance(cert_or_key, x509.Certificate) else cert_or_key
    return "sha256:" + hashlib.sha256(key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)).hexdigest()


def _describe(cert: x509.Certificate) -> str:
    subject = cert.subject.rfc4514_string() or "(empty subject)"
    return f"{subject} (serial {serial_of(cert)}, issuer {cert.issuer.rfc4514_string()})"


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


@dataclass(frozen=True)
class EkTrust:
    """TPM makers' root certificates (self-signed) and the intermediates under them."""

    roots: tuple[x509.Certificate, ...]
    intermediates: tuple[x509.Certificate, ...] = ()

    @classmethod
    def of(cls, certs: Sequence[x509.Certificate]) -> EkTrust:
        roots = tuple(c for c in certs if c.issuer == c.subject and issued_by(c, c))
        return cls(roots, tuple(c for c in certs if c not in roots))

    def check(self, ek: x509.Certificate, now: float) -> list[x509.Certificate]:
        """The chain EK .. root; AttestError naming the certificate when no trusted maker issued it."""
        try:
            return self._check(ek, now)
        except (ValueError, UnsupportedAlgorithm) as exc:  # extensions and keys are parsed lazily
            raise AttestError(f"EK certificate {_describe(ek)}: unreadable: {exc}") from None

    def _check(self, ek: x509.Certificate, now: float) -> list[x509.Certificate]:
        if not self.roots:
            raise AttestError("the station trusts no TPM maker: set ek_roots in station.toml to a PEM file of EK "
                              "root (and intermediate) certificates")
        when = dt.datetime.fromtimestamp(now, dt.UTC)
        chain = [ek]
        while True:
            cert = chain[-1]
            if not cert.not_valid_before_utc <= when <= cert.not_valid_after_utc:
                raise AttestError(f"EK chain: certificate {_describe(cert)} is not valid now (valid "
                                  f"{cert.not_valid_before_utc:%Y-%m-%d} .. {cert.not_valid_after_utc:%Y-%m-%d})")
            if any(cert.public_key() == r.public_key() and cert.subject == r.subject for r in self.roots):
                return chain
            parent = next((c for c in (*self.roots, *self.intermediates)
                           if c.subject == cert.issuer and c not in chain and issued_by(cert, c)), None)
            if parent is None:
                raise AttestError(f"EK certificate {_describe(ek)}: not issued by a TPM maker this station "
                                  f"trusts (no trusted issuer for {_describe(cert)}; station.toml ek_roots)")
            if not _is_ca(parent):
                raise AttestError(f"EK chain: issuer {_describe(parent)} is not a CA (BasicConstraints)")
            chain.append(parent)
            if len(chain) > MAX_DEPTH:
                raise AttestError(f"EK chain: longer than {MAX_DEPTH} certificates")


def check_ek_public(ek: Public, cert: x509.Certificate) -> None:
    """The EK public area holds the EK certificate's key and is a restricted decryption key."""
    if not same_public_key(ek.public_key(), cert.public_key()):
        raise AttestError(f"ek_public: its key is not the key of the EK certificate {_describe(cert)}")
    if not ek.has(RESTRICTED, DECRYPT):
        raise AttestError(f"ek_public: an EK is a restricted decryption key; it lacks "
                          f"{', '.join(ek.missing(RESTRICTED, DECRYPT))}")


def check_ak(ak: Public) -> None:
    """The AK is a restricted signing key that was made in its TPM and cannot leave it."""
    missing = ak.missing(*KEY_IN_TPM, RESTRICTED, SIGN)
    if missing:
        raise AttestError(f"ak_public: an attestation key must have fixedTPM, fixedParent, sensitiveDataOrigin, "
                          f"restricted and sign; it lacks {', '.join(missing)} ({attribute_names(ak.attributes)})")
    if ak.attributes & DECRYPT:
        raise AttestError("ak_public: an attestation key must not be a decryption key (decrypt is set)")
    if not isinstance(ak.public_key(), (rsa.RSAPublicKey, ec.EllipticCurvePublicKey)):
        raise AttestError("ak_public: not an RSA or ECC key")


def check_certify(evidence: TpmCertify, ak: Public, nonce: bytes, csr_key: Any) -> Public:
    """The certified key's public area, once every check of the module docstring's step 4 passed."""
    Signature.parse(evidence.signature, "TcgAttestCertify signature").verify(
        ak.public_key(), evidence.attest, "TcgAttestCertify signature")
    attest = Attest.parse(evidence.attest, "TcgAttestCertify tpmSAttest")
    if not hmac.compare_digest(attest.extra_data, nonce):
        raise AttestError("TcgAttestCertify tpmSAttest: extraData is not the nonce of this challenge (a certify "
                          "made for another or an earlier challenge)")
    key = Public.parse(evidence.public, "TcgAttestCertify tpmTPublic")
    if not hmac.compare_digest(attest.certified_name, key.name):
        raise AttestError(f"TcgAttestCertify: the TPM certified the object named {attest.certified_name.hex()}, "
                          f"not the key in tpmTPublic (name {key.name.hex()})")
    if not same_public_key(key.public_key(), csr_key):
        raise AttestError("TcgAttestCertify: the certified key is not the CSR's key")
    missing = key.missing(*KEY_IN_TPM)
    if missing:
        raise AttestError(f"TcgAttestCertify tpmTPublic: the CSR's key lacks {', '.join(missing)} "
                          f"({attribute_names(key.attributes)}): it was not made in the TPM or can leave it")
    return key

