"""TPM evidence in a CSR: draft-ietf-lamps-csr-attestation's evidence attribute carrying TCG's
`tcg-attest-tpm-certify` statement.

    id-aa-evidence OBJECT IDENTIFIER ::= { 1 2 840 113549 1 9 16 2 59 }  -- a CSR attribute
    EvidenceBundles ::= SEQUENCE SIZE (1..MAX) OF EvidenceBundle
    EvidenceBundle ::= SEQUENCE { evidences SEQUENCE SIZE (1..MAX) OF EvidenceStatement,
                                  certs SEQUENCE SIZE (1..MAX) OF CertificateChoices OPTIONAL }
    EvidenceStatement ::= SEQUENCE { type OBJECT IDENTIFIER, stmt ANY DEFINED BY type,
                                     hint UTF8String OPTIONAL }
    id-tcg-attest-certify OBJECT IDENTIFIER ::= { 2 23 133 20 1 }
    TcgAttestCertify ::= SEQUENCE { tpmSAttest OCTET STRING,      -- TPMS_ATTEST of TPM2_Certify
                                    signature OCTET STRING,       -- TPMT_SIGNATURE by the AK
                                    tpmTPublic OCTET STRING OPTIONAL }  -- TPMT_PUBLIC of the CSR's key

The attribute sits inside the CSR's signed CertificationRequestInfo, so the CSR's own signature covers
it. `cryptography`'s CSR builder cannot add a structured attribute, so `build_csr` writes the DER itself
and has the (TPM) key sign it. Only the few DER forms used here are read and written.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from provisioning.attest import AttestError

ID_AA_EVIDENCE = "1.2.840.113549.1.9.16.2.59"
ID_TCG_ATTEST_CERTIFY = "2.23.133.20.1"
_ECDSA_SHA256 = "1.2.840.10045.4.3.2"
_RSA_SHA256 = "1.2.840.113549.1.1.11"
SEQUENCE, SET, OCTET_STRING, OID, INTEGER, BIT_STRING, NULL, UTF8 = 0x30, 0x31, 0x04, 0x06, 0x02, 0x03, 0x05, 0x0C
ATTRIBUTES = 0xA0  # [0] IMPLICIT SET OF Attribute
MAX_EVIDENCE = 16 * 1024


# -- DER ---------------------------------------------------------------------------------------------
def tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


def oid(dotted: str) -> bytes:
    parts = [int(p) for p in dotted.split(".")]
    out = bytearray([40 * parts[0] + parts[1]])
    for part in parts[2:]:
        chunk = [part & 0x7F]
        part >>= 7
        while part:
            chunk.append(0x80 | (part & 0x7F))
            part >>= 7
        out += bytes(reversed(chunk))
    return tlv(OID, bytes(out))


def read(data: bytes, at: int, what: str) -> tuple[int, bytes, int]:
    """(tag, content, offset after) of the DER element at `at`; AttestError naming `what` if malformed."""
    if at + 2 > len(data):
        raise AttestError(f"{what}: truncated DER")
    tag, first = data[at], data[at + 1]
    at += 2
    if first & 0x80:
        count = first & 0x7F
        if count == 0 or count > 4 or at + count > len(data):
            raise AttestError(f"{what}: bad DER length")
        length = int.from_bytes(data[at:at + count], "big")
        at += count
    else:
        length = first
    if at + length > len(data):
        raise AttestError(f"{what}: DER element runs past its end")
    return tag, data[at:at + length], at + length


def children(content: bytes, what: str) -> Iterator[tuple[int, bytes]]:
    at = 0
    while at < len(content):
        tag, value, at = read(content, at, what)
        yield tag, value


def expect(pair: tuple[int, bytes], tag: int, what: str) -> bytes:
    if pair[0] != tag:
        raise AttestError(f"{what}: expected DER tag 0x{tag:02x}, got 0x{pair[0]:02x}")
    return pair[1]


# -- the statement -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TpmCertify:
    """One `tcg-attest-tpm-certify` statement: the TPM's TPMS_ATTEST, the AK's TPMT_SIGNATURE over it,
    and the certified key's TPMT_PUBLIC."""

    attest: bytes
    signature: bytes
    public: bytes

    def attribute_value(self) -> bytes:
        """The DER of EvidenceBundles holding this one statement."""
        stmt = tlv(SEQUENCE, tlv(OCTET_STRING, self.attest) + tlv(OCTET_STRING, self.signature)
                   + tlv(OCTET_STRING, self.public))
        statement = tlv(SEQUENCE, oid(ID_TCG_ATTEST_CERTIFY) + stmt)
        return tlv(SEQUENCE, tlv(SEQUENCE, tlv(SEQUENCE, statement)))


def build_csr(subject: x509.Name, key: Any, evidence: TpmCertify) -> x509.CertificateSigningRequest:
    """A PKCS#10 CSR for `subject`, signed by `key` (a `cryptography` private key, or tpm2-pytss' TPM key
    object), with the evidence attribute. ECDSA-SHA256 for EC keys, RSA PKCS#1 v1.5 SHA-256 otherwise."""
    public = key.public_key()
    spki = public.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    attribute = tlv(SEQUENCE, oid(ID_AA_EVIDENCE) + tlv(SET, evidence.attribute_value()))
    info = tlv(SEQUENCE, tlv(INTEGER, b"\x00") + subject.public_bytes() + spki + tlv(ATTRIBUTES, attribute))
    if isinstance(public, ec.EllipticCurvePublicKey):
        signature = key.sign(info, ec.ECDSA(hashes.SHA256()))
        algorithm = tlv(SEQUENCE, oid(_ECDSA_SHA256))
    elif isinstance(public, rsa.RSAPublicKey):
        signature = key.sign(info, padding.PKCS1v15(), hashes.SHA256())
        algorithm = tlv(SEQUENCE, oid(_RSA_SHA256) + tlv(NULL, b""))
    else:
        raise AttestError(f"CSR key: {type(public).__name__} is not an EC or RSA key")
    return x509.load_der_x509_csr(tlv(SEQUENCE, info + algorithm + tlv(BIT_STRING, b"\x00" + signature)))


def read_evidence(csr: x509.CertificateSigningRequest) -> TpmCertify:
    """The one `tcg-attest-tpm-certify` statement in the CSR's evidence attribute; AttestError when there
    is none, more than one, or it does not parse."""
    der = csr.public_bytes(Encoding.DER)
    request = expect(next(children(der, "CSR"), (0, b"")), SEQUENCE, "CSR")
    info = expect(next(children(request, "CSR"), (0, b"")), SEQUENCE, "CertificationRequestInfo")
    found: list[bytes] = []
    for tag, content in children(info, "CertificationRequestInfo"):
        if tag != ATTRIBUTES:
            continue
        for attr_tag, attr in children(content, "CSR attributes"):
            parts = list(children(expect((attr_tag, attr), SEQUENCE, "CSR attribute"), "CSR attribute"))
            if len(parts) == 2 and parts[0] == (OID, oid(ID_AA_EVIDENCE)[2:]):
                found += [v for _, v in children(expect(parts[1], SET, "evidence attribute values"), "evidence")]
    if not found:
        raise AttestError(f"CSR: no evidence attribute ({ID_AA_EVIDENCE}, draft-ietf-lamps-csr-attestation): "
                          "an attested enrollment carries TPM2_Certify of the CSR's key")
    statements = []
    for bundles in found:
        for bundle in children(bundles, "EvidenceBundles"):
            evidences = next(children(expect(bundle, SEQUENCE, "EvidenceBundle"), "EvidenceBundle"), (0, b""))
            for statement in children(expect(evidences, SEQUENCE, "EvidenceBundle.evidences"), "evidences"):
                fields = list(children(expect(statement, SEQUENCE, "EvidenceStatement"), "EvidenceStatement"))
                if fields and fields[0] == (OID, oid(ID_TCG_ATTEST_CERTIFY)[2:]) and len(fields) >= 2:
                    statements.append(fields[1])
    if len(statements) != 1:
        raise AttestError(f"CSR evidence: expected exactly one tcg-attest-tpm-certify ({ID_TCG_ATTEST_CERTIFY}) "
                          f"statement, found {len(statements)}")
    values = [expect(f, OCTET_STRING, "TcgAttestCertify") for f in children(
        expect(statements[0], SEQUENCE, "TcgAttestCertify"), "TcgAttestCertify")]
    if len(values) != 3:
        raise AttestError("TcgAttestCertify: needs tpmSAttest, signature and tpmTPublic (the certified key's "
                          f"public area), found {len(values)} fields")
    if sum(len(v) for v in values) > MAX_EVIDENCE:
        raise AttestError(f"TcgAttestCertify: larger than {MAX_EVIDENCE} bytes")
    return TpmCertify(*values)
