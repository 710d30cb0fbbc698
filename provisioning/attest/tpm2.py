"""TPM 2.0 wire structures the station reads (TPM 2.0 Library, Part 2 "Structures"), in pure Python.

Only what attestation needs: TPMT_PUBLIC for RSA and ECC keys (to compute an object's name and get
its public key), TPMS_ATTEST of a TPM2_Certify, and TPMT_SIGNATURE for RSASSA, RSAPSS and ECDSA.
Integers are big-endian; a TPM2B is a 16-bit size and that many bytes. Anything else is refused with
an `AttestError` naming the structure and the field.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from provisioning.attest import AttestError

# TPM_ALG_ID (Part 2 §6.3)
ALG_RSA, ALG_SHA1, ALG_AES, ALG_SHA256, ALG_SHA384, ALG_SHA512 = 0x0001, 0x0004, 0x0006, 0x000B, 0x000C, 0x000D
ALG_NULL, ALG_RSASSA, ALG_RSAES, ALG_RSAPSS, ALG_OAEP, ALG_ECDSA, ALG_ECDH = (
    0x0010, 0x0014, 0x0015, 0x0016, 0x0017, 0x0018, 0x0019)
ALG_ECDAA, ALG_ECSCHNORR, ALG_ECC, ALG_CFB, ALG_KDF1_SP800_56A = 0x001A, 0x001C, 0x0023, 0x0043, 0x0020
ALG_SM2, ALG_KEYEDHASH, ALG_SYMCIPHER = 0x001B, 0x0008, 0x0025

# TPM_ECC_CURVE
CURVES: dict[int, ec.EllipticCurve] = {0x0003: ec.SECP256R1(), 0x0004: ec.SECP384R1(), 0x0005: ec.SECP521R1()}
CURVE_IDS = {type(c).__name__: i for i, c in CURVES.items()}

HASHES: dict[int, tuple[str, type[hashes.HashAlgorithm]]] = {
    ALG_SHA1: ("sha1", hashes.SHA1), ALG_SHA256: ("sha256", hashes.SHA256),
    ALG_SHA384: ("sha384", hashes.SHA384), ALG_SHA512: ("sha512", hashes.SHA512)}

# TPMA_OBJECT (Part 2 §8.3)
FIXED_TPM, ST_CLEAR, FIXED_PARENT, SENSITIVE_DATA_ORIGIN = 1 << 1, 1 << 2, 1 << 4, 1 << 5
USER_WITH_AUTH, ADMIN_WITH_POLICY, NO_DA, ENCRYPTED_DUPLICATION = 1 << 6, 1 << 7, 1 << 10, 1 << 11
RESTRICTED, DECRYPT, SIGN = 1 << 16, 1 << 17, 1 << 18
ATTRIBUTE_NAMES = {FIXED_TPM: "fixedTPM", ST_CLEAR: "stClear", FIXED_PARENT: "fixedParent",
                   SENSITIVE_DATA_ORIGIN: "sensitiveDataOrigin", USER_WITH_AUTH: "userWithAuth",
                   ADMIN_WITH_POLICY: "adminWithPolicy", NO_DA: "noDA",
                   ENCRYPTED_DUPLICATION: "encryptedDuplication", RESTRICTED: "restricted", DECRYPT: "decrypt",
                   SIGN: "sign"}

GENERATED_VALUE = 0xFF544347   # TPM_GENERATED_VALUE: "\xffTCG", only the TPM writes it into TPMS_ATTEST
ST_ATTEST_CERTIFY = 0x8017     # TPM_ST_ATTEST_CERTIFY


def attribute_names(bits: int) -> str:
    return "|".join(name for bit, name in ATTRIBUTE_NAMES.items() if bits & bit) or "none"


def hash_of(alg: int, where: str) -> tuple[str, type[hashes.HashAlgorithm]]:
    try:
        return HASHES[alg]
    except KeyError:
        raise AttestError(f"{where}: hash algorithm 0x{alg:04x} is not supported (sha1, sha256, sha384, "
                          "sha512)") from None


class Reader:
    """Big-endian fields out of one TPM structure; running off its end is an AttestError naming it."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = bytes(data)
        self.at = 0
        self.what = what

    def take(self, n: int, field: str) -> bytes:
        if self.at + n > len(self.data):
            raise AttestError(f"{self.what}: truncated at {field} (needs {n} bytes at offset {self.at}, "
                              f"{len(self.data)} in all)")
        out = self.data[self.at:self.at + n]
        self.at += n
        return out

    def u8(self, field: str) -> int:
        return int(self.take(1, field)[0])

    def u16(self, field: str) -> int:
        return int(struct.unpack(">H", self.take(2, field))[0])

    def u32(self, field: str) -> int:
        return int(struct.unpack(">I", self.take(4, field))[0])

    def u64(self, field: str) -> int:
        return int(struct.unpack(">Q", self.take(8, field))[0])

    def tpm2b(self, field: str) -> bytes:
        return self.take(self.u16(f"{field} size"), field)

    def end(self) -> None:
        if self.at != len(self.data):
            raise AttestError(f"{self.what}: {len(self.data) - self.at} bytes left over after the structure")


def tpm2b(data: bytes) -> bytes:
    """TPM2B marshalling: 16-bit size, then the bytes."""
    return struct.pack(">H", len(data)) + bytes(data)


@dataclass(frozen=True)
class Public:
    """A TPMT_PUBLIC (RSA or ECC). `raw` is its marshalled form, from which the name is computed."""

    raw: bytes
    type: int
    name_alg: int
    attributes: int
    auth_policy: bytes
    symmetric: tuple[int, int, int]   # (algorithm, keyBits, mode); (ALG_NULL, 0, 0) when none
    scheme: int
    key_bits: int                     # RSA modulus bits, or the curve's size
    curve: int                        # TPM_ECC_CURVE, 0 for RSA
    unique: tuple[bytes, bytes]       # (n, b"") for RSA, (x, y) for ECC
    exponent: int = 65537

    @classmethod
    def parse(cls, data: bytes, what: str = "TPMT_PUBLIC") -> Public:
        r = Reader(data, what)
        kind = r.u16("type")
        name_alg = r.u16("nameAlg")
        hash_of(name_alg, f"{what} nameAlg")
        attributes = r.u32("objectAttributes")
        policy = r.tpm2b("authPolicy")
        sym_alg = r.u16("symmetric.algorithm")
        symmetric = (sym_alg, r.u16("symmetric.keyBits"), r.u16("symmetric.mode")) if sym_alg != ALG_NULL \
            else (ALG_NULL, 0, 0)
        scheme = r.u16("scheme")
        if kind == ALG_RSA:
            if scheme in (ALG_RSASSA, ALG_RSAPSS, ALG_OAEP):
                r.u16("scheme.hashAlg")
            elif scheme not in (ALG_NULL, ALG_RSAES):
                raise AttestError(f"{what}: RSA scheme 0x{scheme:04x} is not supported")
            bits = r.u16("keyBits")
            exponent = r.u32("exponent") or 65537
            n = r.tpm2b("unique.rsa")
            r.end()
            return cls(bytes(data), kind, name_alg, attributes, policy, symmetric, scheme, bits, 0, (n, b""),
                       exponent)
        if kind == ALG_ECC:
            if scheme == ALG_ECDAA:
                r.u16("scheme.hashAlg")
                r.u16("scheme.count")
            elif scheme in (ALG_ECDSA, ALG_ECDH, ALG_ECSCHNORR, ALG_SM2):
                r.u16("scheme.hashAlg")
            elif scheme != ALG_NULL:
                raise AttestError(f"{what}: ECC scheme 0x{scheme:04x} is not supported")
            curve = r.u16("curveID")
            if curve not in CURVES:
                raise AttestError(f"{what}: ECC curve 0x{curve:04x} is not supported (NIST P-256, P-384, P-521)")
            if r.u16("kdf.scheme") != ALG_NULL:
                r.u16("kdf.hashAlg")
            x, y = r.tpm2b("unique.ecc.x"), r.tpm2b("unique.ecc.y")
            r.end()
            return cls(bytes(data), kind, name_alg, attributes, policy, symmetric, scheme,
                       CURVES[curve].key_size, curve, (x, y))
        raise AttestError(f"{what}: object type 0x{kind:04x} is not an RSA or ECC key")

    @property
    def name(self) -> bytes:
        """The object's name: nameAlg, then the nameAlg digest of the marshalled TPMT_PUBLIC (Part 1 §16)."""
        algorithm, _ = hash_of(self.name_alg, "nameAlg")
        return struct.pack(">H", self.name_alg) + hashlib.new(algorithm, self.raw).digest()

    def public_key(self) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
        """The key as `cryptography` sees it; AttestError when the numbers are not a valid key."""
        try:
            if self.type == ALG_RSA:
                return rsa.RSAPublicNumbers(self.exponent, int.from_bytes(self.unique[0], "big")).public_key()
            x, y = (int.from_bytes(v, "big") for v in self.unique)
            return ec.EllipticCurvePublicNumbers(x, y, CURVES[self.curve]).public_key()
        except ValueError as exc:
            raise AttestError(f"TPMT_PUBLIC unique: not a valid public key: {exc}") from None

    def has(self, *bits: int) -> bool:
        return all(self.attributes & bit for bit in bits)

    def missing(self, *bits: int) -> list[str]:
        return [ATTRIBUTE_NAMES[b] for b in bits if not self.attributes & b]


def marshal_public(key: Any, attributes: int, name_alg: int = ALG_SHA256, *, scheme: int = ALG_NULL,
                   scheme_hash: int = ALG_SHA256, symmetric: tuple[int, int, int] = (ALG_NULL, 0, 0),
                   auth_policy: bytes = b"") -> bytes:
    """A TPMT_PUBLIC for a `cryptography` public key (tests and software peers: a TPM makes its own)."""
    out = struct.pack(">HHI", ALG_RSA if isinstance(key, rsa.RSAPublicKey) else ALG_ECC, name_alg, attributes)
    out += tpm2b(auth_policy)
    out += struct.pack(">H", symmetric[0]) + (struct.pack(">HH", *symmetric[1:]) if symmetric[0] != ALG_NULL else b"")
    out += struct.pack(">H", scheme) + (struct.pack(">H", scheme_hash) if scheme != ALG_NULL else b"")
    if isinstance(key, rsa.RSAPublicKey):
        numbers = key.public_numbers()
        return out + struct.pack(">HI", key.key_size, 0 if numbers.e == 65537 else numbers.e) + tpm2b(
            numbers.n.to_bytes((key.key_size + 7) // 8, "big"))
    size = (key.curve.key_size + 7) // 8
    point = key.public_numbers()
    return out + struct.pack(">HH", CURVE_IDS[type(key.curve).__name__], ALG_NULL) + tpm2b(
        point.x.to_bytes(size, "big")) + tpm2b(point.y.to_bytes(size, "big"))


@dataclass(frozen=True)
class Attest:
    """A TPMS_ATTEST from TPM2_Certify: who signed, the caller's nonce, and the certified object's name."""

    raw: bytes
    qualified_signer: bytes
    extra_data: bytes
    clock: int
    reset_count: int
    restart_count: int
    firmware_version: int
    certified_name: bytes
    certified_qualified_name: bytes

    @classmethod
    def parse(cls, data: bytes, what: str = "TPMS_ATTEST") -> Attest:
        r = Reader(data, what)
        magic = r.u32("magic")
        if magic != GENERATED_VALUE:
            raise AttestError(f"{what}: magic 0x{magic:08x} is not TPM_GENERATED_VALUE (0xff544347): the TPM did "
                              "not make this structure")
        kind = r.u16("type")
        if kind != ST_ATTEST_CERTIFY:
            raise AttestError(f"{what}: type 0x{kind:04x} is not TPM_ST_ATTEST_CERTIFY (0x8017)")
        signer, extra = r.tpm2b("qualifiedSigner"), r.tpm2b("extraData")
        clock, resets, restarts = r.u64("clockInfo.clock"), r.u32("clockInfo.resetCount"), r.u32(
            "clockInfo.restartCount")
        r.u8("clockInfo.safe")
        firmware = r.u64("firmwareVersion")
        name, qualified = r.tpm2b("attested.certify.name"), r.tpm2b("attested.certify.qualifiedName")
        r.end()
        return cls(bytes(data), signer, extra, clock, resets, restarts, firmware, name, qualified)


@dataclass(frozen=True)
class Signature:
    """A TPMT_SIGNATURE: RSASSA or RSAPSS (one big number) or ECDSA (r, s)."""

    alg: int
    hash_alg: int
    values: tuple[bytes, ...]

    @classmethod
    def parse(cls, data: bytes, what: str = "TPMT_SIGNATURE") -> Signature:
        r = Reader(data, what)
        alg = r.u16("sigAlg")
        if alg in (ALG_RSASSA, ALG_RSAPSS):
            sig = cls(alg, r.u16("hash"), (r.tpm2b("sig"),))
        elif alg == ALG_ECDSA:
            sig = cls(alg, r.u16("hash"), (r.tpm2b("signatureR"), r.tpm2b("signatureS")))
        else:
            raise AttestError(f"{what}: signature algorithm 0x{alg:04x} is not RSASSA, RSAPSS or ECDSA")
        r.end()
        return sig

    def verify(self, key: Any, message: bytes, what: str) -> None:
        """AttestError unless this is `key`'s signature over `message`."""
        from cryptography.exceptions import InvalidSignature

        _, algorithm = hash_of(self.hash_alg, f"{what} hash")
        try:
            if self.alg == ALG_ECDSA and isinstance(key, ec.EllipticCurvePublicKey):
                r, s = (int.from_bytes(v, "big") for v in self.values)
                key.verify(encode_dss_signature(r, s), message, ec.ECDSA(algorithm()))
            elif self.alg in (ALG_RSASSA, ALG_RSAPSS) and isinstance(key, rsa.RSAPublicKey):
                pad: padding.AsymmetricPadding = padding.PKCS1v15() if self.alg == ALG_RSASSA else padding.PSS(
                    padding.MGF1(algorithm()), padding.PSS.AUTO)
                key.verify(self.values[0], message, pad, algorithm())
            else:
                raise AttestError(f"{what}: a 0x{self.alg:04x} signature does not fit the AK's key type")
        except InvalidSignature:
            raise AttestError(f"{what}: the signature does not verify with the AK's public key") from None
