"""Reading and describing certificates and CSRs: PEM bundles, DER, PKCS#7, with errors that say where."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7

from provisioning import PemError
from provisioning.der import first_element as der_element
from provisioning.est.pkcs7 import certificate_blobs

MAX_INPUT = 1 << 20  # a chain or CSR larger than 1 MiB is not a chain or a CSR

# what `cryptography` raises for bytes that are not a certificate, PKCS#7 or CSR (neither InvalidVersion
# nor UnsupportedAlgorithm, for a PKCS#7 that is not signed-data, is a ValueError)
_MALFORMED = (ValueError, x509.InvalidVersion, UnsupportedAlgorithm)

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.S)


def subject_of(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "(empty subject)"


def serial_of(cert: x509.Certificate) -> str:
    return f"0x{cert.serial_number:x}"


def common_name(name: x509.Name) -> str | None:
    attrs = name.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    if not attrs:
        return None
    value = attrs[0].value
    return value if isinstance(value, str) else value.decode(errors="replace")


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def _check_size(data: bytes, where: str) -> None:
    if not isinstance(data, bytes | bytearray):
        raise PemError(f"{where}: expected bytes, got {type(data).__name__}")
    if len(data) > MAX_INPUT:
        raise PemError(f"{where}: {len(data)} bytes is larger than the {MAX_INPUT}-byte limit")
    if not data.strip():
        raise PemError(f"{where}: empty")


def _names_readable(item: x509.Certificate | x509.CertificateSigningRequest, where: str) -> None:
    """Decode the subject (and issuer) now: `cryptography` decodes names lazily and raises KeyError for
    an unknown ASN.1 string type (TypeError for a BIT STRING under another OID), which would otherwise
    surface far from the parser."""
    try:
        item.subject.rfc4514_string()
        if isinstance(item, x509.Certificate):
            item.issuer.rfc4514_string()
    except (ValueError, KeyError, TypeError) as exc:
        raise PemError(f"{where}: unreadable subject or issuer name ({type(exc).__name__}: {exc})") from None


def load_certificates(data: bytes, where: str = "input") -> list[x509.Certificate]:
    """Certificates from a PEM bundle, one DER certificate, or a PKCS#7 certs-only (PEM or DER).

    Order is kept. Raises PemError naming the block (1-based) and what was wrong with it.
    """
    certs = _load_certificates(data, where)
    for index, cert in enumerate(certs, 1):
        _names_readable(cert, f"{where}: certificate {index}")
    return certs


def _load_certificates(data: bytes, where: str) -> list[x509.Certificate]:
    _check_size(data, where)
    data = bytes(data)
    if b"-----BEGIN" not in data:
        try:
            return [x509.load_der_x509_certificate(data)]
        except _MALFORMED:
            pass
        try:
            return _pkcs7_certificates(data, where)
        except PemError as exc:
            raise PemError(f"{where}: neither PEM, DER certificate nor PKCS#7 ({exc})") from None
    blocks = _PEM_BLOCK.findall(data)
    if not blocks:
        raise PemError(f"{where}: a '-----BEGIN' line has no matching '-----END' line (truncated PEM?)")
    certs: list[x509.Certificate] = []
    for index, (label, body) in enumerate(blocks, 1):
        kind = label.decode()
        try:
            der = base64.b64decode(b"".join(body.split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise PemError(f"{where}: PEM block {index} ({kind}): invalid base64 ({exc})") from None
        if kind == "CERTIFICATE":
            try:
                certs.append(x509.load_der_x509_certificate(der))
            except _MALFORMED as exc:
                raise PemError(f"{where}: PEM block {index}: not a valid X.509 certificate ({exc})") from None
        elif kind == "PKCS7":
            certs.extend(_pkcs7_certificates(der, f"{where}: PEM block {index}"))
        else:
            raise PemError(f"{where}: PEM block {index} is a {kind}, expected CERTIFICATE")
    return certs


def load_csr(data: bytes, where: str = "CSR") -> x509.CertificateSigningRequest:
    """A CSR from PEM, DER, or the base64 DER body EST uses (RFC 7030 section 4.2.1)."""
    csr = _parse_csr(data, where)
    _names_readable(csr, where)
    return csr


def read_csr(data: bytes, where: str = "CSR") -> ReadCsr:
    """`load_csr`, with its subject and key decoded once for everyone who reads them (`ReadCsr`)."""
    csr = _parse_csr(data, where)
    try:  # as _names_readable: `.subject` itself decodes the name, so an unreadable one fails here, not later
        subject = csr.subject
        subject.rfc4514_string()
    except (ValueError, KeyError, TypeError) as exc:
        raise PemError(f"{where}: unreadable subject or issuer name ({type(exc).__name__}: {exc})") from None
    return ReadCsr.of(csr, subject)


# what `cryptography` raises for a key it cannot read: off-curve point, unknown algorithm OID
UNREADABLE_KEY = (ValueError, TypeError, UnsupportedAlgorithm)

_ECDSA = frozenset({x509.SignatureAlgorithmOID.ECDSA_WITH_SHA224, x509.SignatureAlgorithmOID.ECDSA_WITH_SHA256,
                    x509.SignatureAlgorithmOID.ECDSA_WITH_SHA384, x509.SignatureAlgorithmOID.ECDSA_WITH_SHA512})
# a P-256 SubjectPublicKeyInfo as `cryptography` writes one (named curve, uncompressed point), up to the
# point's coordinates: the 04 is part of it, so a hybrid point (06/07, which RFC 5480 forbids and many
# verifiers refuse, but OpenSSL reads) is encoded again rather than copied into a certificate
_P256_SPKI_HEAD = bytes.fromhex("3059301306072a8648ce3d020106082a8648ce3d03010703420004")


class ReadCsr:
    """A CSR and what its readers ask of it, decoded once: `cryptography` builds a new `Name` at every
    `.subject` and loads the key again at every `.public_key()` and `.is_signature_valid` (three
    loads and four names per enrollment before, issue 24 item 3). `key` is None when the key cannot
    be read, `key_error` says why."""

    __slots__ = ("csr", "key", "key_error", "subject")

    def __init__(self, csr: x509.CertificateSigningRequest, subject: x509.Name, key: Any,
                 key_error: Exception | None) -> None:
        self.csr, self.subject, self.key, self.key_error = csr, subject, key, key_error

    @classmethod
    def of(cls, csr: x509.CertificateSigningRequest, subject: x509.Name | None = None) -> ReadCsr:
        """`subject` when the caller already decoded it (`read_csr`); an unreadable name raises as
        `csr.subject` does."""
        subject = csr.subject if subject is None else subject
        try:
            return cls(csr, subject, csr.public_key(), None)
        except UNREADABLE_KEY as exc:
            return cls(csr, subject, None, exc)

    def signature_valid(self) -> bool:
        """`csr.is_signature_valid`, verified with the key already loaded when it is an ECDSA signature
        by an EC key (what devices send); any other pair goes to `cryptography` as before. Raises
        what `is_signature_valid` raises for a key or algorithm it cannot use."""
        csr = self.csr
        if isinstance(self.key, ec.EllipticCurvePublicKey) and csr.signature_algorithm_oid in _ECDSA:
            try:
                self.key.verify(csr.signature, csr.tbs_certrequest_bytes,
                                ec.ECDSA(csr.signature_hash_algorithm))  # type: ignore[arg-type]
            except InvalidSignature:
                return False
            return True
        return csr.is_signature_valid

    def spki(self) -> bytes | None:
        """The key's DER SubjectPublicKeyInfo as the CSR carries it, when that is byte for byte what
        `key.public_bytes` would write (a P-256 key, named curve, uncompressed point); None otherwise,
        and the signer encodes the key itself."""
        try:
            tbs = self.csr.tbs_certrequest_bytes
            _, start, end = der_element(tbs)
            info = tbs[start:end]
            offset = 0
            for _skip in ("version", "subject"):
                _, _, element_end = der_element(info[offset:])
                offset += element_end
            _, _, spki_end = der_element(info[offset:])
        except ValueError:
            return None
        spki = info[offset:offset + spki_end]
        return spki if len(spki) == 91 and spki.startswith(_P256_SPKI_HEAD) else None


def _parse_csr(data: bytes, where: str) -> x509.CertificateSigningRequest:
    _check_size(data, where)
    data = bytes(data)
    try:
        if b"-----BEGIN" in data:
            csr = x509.load_pem_x509_csr(data)
        elif data[:1] == b"\x30":
            csr = x509.load_der_x509_csr(data)
        else:
            der = base64.b64decode(b"".join(data.split()), validate=True)
            csr = x509.load_der_x509_csr(der)
    except (binascii.Error, *_MALFORMED) as exc:
        raise PemError(f"{where}: not a PKCS#10 certificate request ({exc})") from None
    return csr


def to_pem(certs: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _pkcs7_certificates(der: bytes, where: str) -> list[x509.Certificate]:
    """A PKCS#7 certs-only file in DER or BER and any SET order, without cryptography's BER warning."""
    certs = []
    for index, blob in enumerate(certificate_blobs(der, f"{where}: PKCS#7"), 1):
        try:
            certs.append(x509.load_der_x509_certificate(blob))
        except _MALFORMED as exc:
            raise PemError(f"{where}: PKCS#7 certificate {index}: not a valid X.509 certificate ({exc})") from None
    return certs


def pkcs7_certs_only(certs: Sequence[x509.Certificate]) -> bytes:
    """Base64 DER PKCS#7 certs-only, the body of an EST certificate response (RFC 7030 4.1.3, 4.2.3).

    One line, no line breaks: RFC 7030's verified erratum 5904 and RFC 8951 section 3.1 read HTTP's
    base64 as without CRLFs, and clients whose decoder does not skip whitespace could not parse the
    76-character lines `base64.encodebytes` wrote (issue 26). Readers here accept both forms."""
    der = pkcs7.serialize_certificates(list(certs), serialization.Encoding.DER)
    return base64.b64encode(der)


def issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    """True when `child` names `parent` as its issuer and carries a valid signature by its key.

    The one "issued by" check (policy, station, EST client, release signer): whatever a malformed or
    mismatched pair raises (wrong key type, unsupported algorithm, bad signature) means False.
    """
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def same_public_key(a: object, b: object) -> bool:
    """True when two `cryptography` public keys are the same key."""
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    return bool(a.public_bytes(serialization.Encoding.DER, fmt)  # type: ignore[attr-defined]
                == b.public_bytes(serialization.Encoding.DER, fmt))  # type: ignore[attr-defined]
