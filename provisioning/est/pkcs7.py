"""The certificates of a PKCS#7 / CMS SignedData "certs-only" message, read in DER or BER.

EST answers (RFC 7030 4.1.3, 4.2.3) are such messages. `cryptography`'s loader wants DER: for a
certificate SET that is not DER-sorted (OpenSSL's `crl2pkcs7` keeps file order, so leaf first) or a
BER message (indefinite lengths, as streaming encoders write), it falls back to BER with a
`UserWarning` that says it "may become an exception". So this module walks the few levels of
RFC 5652 5.1 itself and hands each certificate's own bytes, which are DER, to `cryptography`:

    ContentInfo ::= SEQUENCE { contentType OID (signedData), content [0] EXPLICIT SignedData }
    SignedData  ::= SEQUENCE { version, digestAlgorithms SET, encapContentInfo SEQUENCE,
                               certificates [0] IMPLICIT SET OF Certificate OPTIONAL, crls [1] ..., signerInfos SET }

Order is kept as sent; the caller orders the chain. Errors are PemError naming the field and why.
"""

from __future__ import annotations

from typing import NamedTuple

from provisioning import PemError

SIGNED_DATA_OID = bytes.fromhex("2a864886f70d010702")  # 1.2.840.113549.1.7.2
_SEQUENCE, _SET, _OID, _INTEGER = 0x30, 0x31, 0x06, 0x02
_CONTEXT_0_CONSTRUCTED = 0xA0
_MAX_DEPTH = 32  # skipping a BER element recurses into it; real messages nest a handful of levels


class _Element(NamedTuple):
    tag: int
    start: int          # offset of the tag byte
    body: int           # offset of the contents
    end: int            # offset after the contents (after the end-of-contents octets for BER)
    content_end: int    # offset after the contents, before any end-of-contents octets


def _read(data: bytes, pos: int, limit: int, field: str, depth: int = 0) -> _Element:
    """One TLV at `pos`, not reaching past `limit`; indefinite lengths (BER) are followed to their end."""
    if depth > _MAX_DEPTH:
        raise PemError(f"{field}: nested more than {_MAX_DEPTH} levels deep")
    if pos + 2 > limit:
        raise PemError(f"{field}: truncated at byte {pos}")
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise PemError(f"{field}: multi-byte tag at byte {pos} (not used by PKCS#7)")
    first = data[pos + 1]
    body = pos + 2
    if first == 0x80:  # indefinite length: only for constructed encodings; ends with 00 00
        if not tag & 0x20:
            raise PemError(f"{field}: indefinite length on a primitive element at byte {pos}")
        cursor = body
        while True:
            if cursor + 2 > limit:
                raise PemError(f"{field}: indefinite-length element at byte {pos} has no end-of-contents")
            if data[cursor] == 0 and data[cursor + 1] == 0:
                return _Element(tag, pos, body, cursor + 2, cursor)
            cursor = _read(data, cursor, limit, field, depth + 1).end
    if first & 0x80:
        count = first & 0x7F
        if count > 4 or body + count > limit:
            raise PemError(f"{field}: bad length at byte {pos}")
        length = int.from_bytes(data[body:body + count], "big")
        body += count
    else:
        length = first
    if body + length > limit:
        raise PemError(f"{field}: element at byte {pos} claims {length} bytes, only {limit - body} remain")
    return _Element(tag, pos, body, body + length, body + length)


def _children(data: bytes, parent: _Element, field: str) -> list[_Element]:
    out, pos = [], parent.body
    while pos < parent.content_end:
        child = _read(data, pos, parent.content_end, field)
        out.append(child)
        pos = child.end
    return out


def _expect(element: _Element, tag: int, field: str) -> None:
    if element.tag != tag:
        raise PemError(f"{field}: expected tag 0x{tag:02x}, got 0x{element.tag:02x} at byte {element.start}")


def certificate_blobs(data: bytes, where: str = "PKCS#7") -> list[bytes]:
    """The encoded certificates of a SignedData message (DER or BER), in the order sent.

    Raises PemError naming the field when the bytes are not a SignedData ContentInfo, or when a
    certificate is not in the plain X.509 form (attribute certificates and the like).
    """
    outer = _read(data, 0, len(data), f"{where}: ContentInfo")
    _expect(outer, _SEQUENCE, f"{where}: ContentInfo")
    if outer.end != len(data):
        raise PemError(f"{where}: {len(data) - outer.end} bytes after the ContentInfo")
    parts = _children(data, outer, f"{where}: ContentInfo")
    if len(parts) < 2 or parts[0].tag != _OID:
        raise PemError(f"{where}: ContentInfo: expected contentType and content")
    if data[parts[0].body:parts[0].end] != SIGNED_DATA_OID:
        raise PemError(f"{where}: ContentInfo: contentType is not signedData (1.2.840.113549.1.7.2)")
    _expect(parts[1], _CONTEXT_0_CONSTRUCTED, f"{where}: ContentInfo content")
    wrapped = _children(data, parts[1], f"{where}: ContentInfo content")
    if len(wrapped) != 1:
        raise PemError(f"{where}: ContentInfo content: expected one SignedData, got {len(wrapped)} elements")
    signed = wrapped[0]
    _expect(signed, _SEQUENCE, f"{where}: SignedData")
    fields = _children(data, signed, f"{where}: SignedData")
    if len(fields) < 3 or fields[0].tag != _INTEGER or fields[1].tag != _SET or fields[2].tag != _SEQUENCE:
        raise PemError(f"{where}: SignedData: expected version, digestAlgorithms and encapContentInfo")
    certs_field = next((f for f in fields[3:] if f.tag == _CONTEXT_0_CONSTRUCTED), None)
    if certs_field is None:
        return []
    blobs = []
    for index, cert in enumerate(_children(data, certs_field, f"{where}: SignedData certificates"), 1):
        if cert.tag != _SEQUENCE:
            raise PemError(f"{where}: SignedData certificate {index} is not an X.509 certificate "
                           f"(tag 0x{cert.tag:02x})")
        blobs.append(data[cert.start:cert.end])
    return blobs
