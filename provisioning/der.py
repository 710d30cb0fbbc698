"""The few DER encodings (ITU-T X.690) the station writes itself, on its per-request path.

Why not always `cryptography`'s builders: for one device certificate, `CertificateBuilder` spends
about five times the ECDSA signature itself turning Python extension objects into DER, and PKCS#7
needs the certificate parsed back from the ledger's DER only to write the same bytes again. The
station's device certificates differ only in serial, validity, CN, key and SAN, so
`authority.DeviceTemplate` fills those into fixed bytes and signs; this module holds the encoders.
Every template checks itself against `cryptography`'s own encoding when it is made (byte for byte),
so an encoding mistake here stops the station at start, not a device at enrollment.
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Sequence

SEQUENCE, SET, INTEGER, BIT_STRING, OCTET_STRING, OID, UTF8_STRING = 0x30, 0x31, 0x02, 0x03, 0x04, 0x06, 0x0C
UTC_TIME, GENERALIZED_TIME = 0x17, 0x18


def tlv(tag: int, content: bytes) -> bytes:
    """One DER element: tag, definite length (short or long form), contents."""
    n = len(content)
    if n < 0x80:
        return bytes((tag, n)) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(size))) + size + content


def integer(value: int) -> bytes:
    """A non-negative INTEGER in its minimal two's-complement form (a leading 0 byte only when the top
    bit would otherwise read as a sign)."""
    if value < 0:
        raise ValueError(f"DER INTEGER: {value} is negative; certificate serials are positive")
    return tlv(INTEGER, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def time(at: int) -> bytes:
    """RFC 5280 4.1.2.5: UTCTime for 1950-2049, GeneralizedTime otherwise; seconds, 'Z'."""
    when = dt.datetime.fromtimestamp(at, dt.UTC)
    if 1950 <= when.year < 2050:
        return tlv(UTC_TIME, when.strftime("%y%m%d%H%M%SZ").encode())
    return tlv(GENERALIZED_TIME, f"{when.year:04d}{when.strftime('%m%d%H%M%S')}Z".encode())


def first_element(data: bytes) -> tuple[int, int, int]:
    """(tag, contents start, contents end) of the DER element at the start of `data`; ValueError when
    it is not one (indefinite or overlong lengths included)."""
    if len(data) < 2:
        raise ValueError("DER: truncated element")
    tag, first = data[0], data[1]
    if first < 0x80:
        start, length = 2, first
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or len(data) < 2 + count:
            raise ValueError("DER: indefinite or unsupported length")
        start, length = 2 + count, int.from_bytes(data[2:2 + count], "big")
    if start + length > len(data):
        raise ValueError("DER: element longer than its data")
    return tag, start, start + length


def subject_key_bits(spki: bytes) -> bytes:
    """The subjectPublicKey bits of a SubjectPublicKeyInfo (what RFC 5280 4.2.1.2 method 1 hashes)."""
    tag, start, end = first_element(spki)
    if tag != SEQUENCE:
        raise ValueError("SubjectPublicKeyInfo: not a SEQUENCE")
    body = spki[start:end]
    _, _, algorithm_end = first_element(body)  # AlgorithmIdentifier
    tag, bits_start, bits_end = first_element(body[algorithm_end:])
    if tag != BIT_STRING or bits_end - bits_start < 1 or body[algorithm_end + bits_start] != 0:
        raise ValueError("SubjectPublicKeyInfo: subjectPublicKey is not a whole-byte BIT STRING")
    return body[algorithm_end + bits_start + 1:algorithm_end + bits_end]


# RFC 5652 5.1 / RFC 7030 4.1.3: ContentInfo { signedData, SignedData { version 1, no digest algorithms,
# encapContentInfo { data }, certificates [0] IMPLICIT ..., no signerInfos } }
_SIGNED_DATA = bytes.fromhex("06092a864886f70d010702")
_VERSION_1_NO_DIGESTS = bytes.fromhex("020101") + tlv(SET, b"")
_DATA_CONTENT = tlv(SEQUENCE, bytes.fromhex("06092a864886f70d010701"))


def pkcs7_certs_only(certificates: Sequence[bytes]) -> bytes:
    """Base64 DER PKCS#7 certs-only of DER certificates, in the order given, on one line as
    `certs.pkcs7_certs_only` writes it (RFC 8951 3.1); for one certificate the DER is byte for byte
    what `cryptography`'s `pkcs7.serialize_certificates` writes."""
    signed = tlv(SEQUENCE, _VERSION_1_NO_DIGESTS + _DATA_CONTENT + tlv(0xA0, b"".join(certificates)) + tlv(SET, b""))
    return base64.b64encode(tlv(SEQUENCE, _SIGNED_DATA + tlv(0xA0, signed)))
