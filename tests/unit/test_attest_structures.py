"""The station's TPM structure readers and the CSR evidence attribute, called without a TPM: what they
accept, and that any other input is one AttestError naming the structure (never another exception)."""

from __future__ import annotations

import contextlib
import struct

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from provisioning.attest import AttestError
from provisioning.attest.credential import make_credential, read_tools_file
from provisioning.attest.evidence import TpmCertify, build_csr, read_evidence
from provisioning.attest.tpm2 import (
    ALG_AES,
    ALG_CFB,
    ALG_ECDSA,
    ALG_RSASSA,
    DECRYPT,
    FIXED_PARENT,
    FIXED_TPM,
    GENERATED_VALUE,
    RESTRICTED,
    SENSITIVE_DATA_ORIGIN,
    SIGN,
    ST_ATTEST_CERTIFY,
    Attest,
    Public,
    Signature,
    marshal_public,
    tpm2b,
)
from provisioning.attest.verify import EkTrust, check_ak

AK_BITS = FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | RESTRICTED | SIGN


def attest_bytes(magic: int = GENERATED_VALUE, kind: int = ST_ATTEST_CERTIFY, nonce: bytes = b"n" * 32) -> bytes:
    return (struct.pack(">IH", magic, kind) + tpm2b(b"signer") + tpm2b(nonce) + struct.pack(">QIIB", 1, 2, 3, 1)
            + struct.pack(">Q", 4) + tpm2b(b"\x00\x0b" + b"x" * 32) + tpm2b(b"qualified"))


def test_a_public_area_round_trips_with_its_name_and_key() -> None:
    for key in (ec.generate_private_key(ec.SECP256R1()).public_key(),
                rsa.generate_private_key(65537, 2048).public_key()):
        scheme = ALG_ECDSA if isinstance(key, ec.EllipticCurvePublicKey) else ALG_RSASSA
        public = Public.parse(marshal_public(key, AK_BITS, scheme=scheme))
        assert public.public_key() == key
        assert public.name[:2] == b"\x00\x0b" and len(public.name) == 34
        assert public.has(RESTRICTED, SIGN) and public.missing(DECRYPT) == ["decrypt"]


def test_attest_is_read_and_checked_for_the_tpms_magic_and_type() -> None:
    assert Attest.parse(attest_bytes()).extra_data == b"n" * 32
    with pytest.raises(AttestError, match="not TPM_GENERATED_VALUE"):
        Attest.parse(attest_bytes(magic=0x12345678))
    with pytest.raises(AttestError, match="not TPM_ST_ATTEST_CERTIFY"):
        Attest.parse(attest_bytes(kind=0x8018))
    with pytest.raises(AttestError, match="truncated at"):
        Attest.parse(attest_bytes()[:-3])
    with pytest.raises(AttestError, match="left over"):
        Attest.parse(attest_bytes() + b"\x00")


def test_an_ak_must_be_a_restricted_signing_key_fixed_to_its_tpm() -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    check_ak(Public.parse(marshal_public(key, AK_BITS, scheme=ALG_ECDSA)))
    for missing in (RESTRICTED, FIXED_TPM, FIXED_PARENT, SENSITIVE_DATA_ORIGIN, SIGN):
        with pytest.raises(AttestError, match="lacks"):
            check_ak(Public.parse(marshal_public(key, AK_BITS & ~missing, scheme=ALG_ECDSA)))
    with pytest.raises(AttestError, match="decrypt is set"):
        check_ak(Public.parse(marshal_public(key, AK_BITS | DECRYPT, scheme=ALG_ECDSA)))


def test_make_credential_needs_an_aes_cfb_restricted_decryption_ek() -> None:
    key = ec.generate_private_key(ec.SECP384R1()).public_key()
    ek = Public.parse(marshal_public(key, FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | RESTRICTED | DECRYPT,
                                     symmetric=(ALG_AES, 256, ALG_CFB)))
    credential = make_credential(ek, b"\x00\x0b" + b"a" * 32)
    assert read_tools_file(credential.tools_file()) == (credential.id_object, credential.encrypted_secret)
    assert len(credential.secret) == 32
    with pytest.raises(AttestError, match="restricted decryption"):
        make_credential(Public.parse(marshal_public(key, AK_BITS, symmetric=(ALG_AES, 256, ALG_CFB))), b"n")
    with pytest.raises(AttestError, match="not AES-CFB"):
        make_credential(Public.parse(marshal_public(key, FIXED_TPM | RESTRICTED | DECRYPT)), b"n")


def test_the_evidence_attribute_round_trips_and_a_plain_csr_has_none() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-1")])
    evidence = TpmCertify(b"attest", b"signature", b"public")
    csr = build_csr(subject, key, evidence)
    assert csr.is_signature_valid and read_evidence(csr) == evidence
    plain = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    with pytest.raises(AttestError, match="no evidence attribute"):
        read_evidence(plain)


def test_an_empty_ek_trust_refuses_every_ek() -> None:
    with pytest.raises(AttestError, match="trusts no TPM maker"):
        EkTrust(()).check(x509.load_pem_x509_certificate(_self_signed()), 0)


def _self_signed() -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    from provisioning import authority

    return authority.root_ca(ec.generate_private_key(ec.SECP256R1())).public_bytes(Encoding.PEM)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_any_bytes_are_a_structure_or_one_attest_error(data: bytes) -> None:
    for parse in (Public.parse, Attest.parse, Signature.parse, read_tools_file):
        with contextlib.suppress(AttestError):
            parse(data)
