"""A CSR read once (`certs.read_csr`, `ReadCsr`): the station's request path decodes the subject and
the key one time for the policy, the proof of possession and the signer, and what it hands on is
what `cryptography` would have given each of them (issue 24 item 3)."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from provisioning import PemError, PolicyError, authority, der
from provisioning.authority import DeviceTemplate, Issued, Issuer
from provisioning.certs import read_csr
from provisioning.csr import build_csr
from provisioning.policy import ChainPolicy

SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _oid(hex_value: str) -> bytes:
    return der.tlv(der.OID, bytes.fromhex(hex_value))


def compressed_point_csr(key: ec.EllipticCurvePrivateKey, device_id: str) -> bytes:
    """A valid, correctly signed CSR whose P-256 key is a compressed point (RFC 5480 2.2 allows it),
    which is not how `cryptography` writes a key: written by hand."""
    point = key.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)
    return hand_csr(key, point, x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, device_id)]).public_bytes())


def hybrid_point(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The key's point in the hybrid form (X9.62: 06 or 07 by y's parity, then x and y), which RFC 5480
    forbids in certificates and OpenSSL still reads."""
    numbers = key.public_key().public_numbers()
    return bytes([6 | (numbers.y & 1)]) + numbers.x.to_bytes(32, "big") + numbers.y.to_bytes(32, "big")


def hand_csr(key: ec.EllipticCurvePrivateKey, point: bytes, subject: bytes) -> bytes:
    """A CSR written by hand around `point` and the DER `subject`, correctly signed by `key`."""
    spki = der.tlv(der.SEQUENCE, der.tlv(der.SEQUENCE, _oid("2a8648ce3d0201") + _oid("2a8648ce3d030107"))
                   + der.tlv(der.BIT_STRING, b"\x00" + point))
    info = der.tlv(der.SEQUENCE, bytes.fromhex("020100") + subject + spki + b"\xa0\x00")
    signature = key.sign(info, ec.ECDSA(hashes.SHA256()))
    return der.tlv(der.SEQUENCE, info + der.tlv(der.SEQUENCE, _oid("2a8648ce3d040302"))
                   + der.tlv(der.BIT_STRING, b"\x00" + signature))


@pytest.fixture(scope="module")
def issuer() -> Issuer:
    key = ec.generate_private_key(ec.SECP256R1())
    return Issuer(authority.root_ca(key, cn="ReadCsr Test CA"), key)


def test_the_key_as_the_csr_carries_it_is_handed_to_the_signer_when_it_is_the_builders_encoding() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    read = read_csr(build_csr(key, "dev-1", "test.tether").public_bytes(serialization.Encoding.DER))
    assert read.spki() == key.public_key().public_bytes(*SPKI)
    assert read.key == key.public_key()
    assert read.subject == read.csr.subject


def test_a_key_in_another_encoding_is_encoded_again_so_the_certificate_is_what_the_builder_writes(
        issuer: Issuer) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    read = read_csr(compressed_point_csr(key, "dev-2"))
    assert read.csr.is_signature_valid and read.signature_valid()
    assert read.spki() is None  # the compressed point is not copied into the certificate
    template = DeviceTemplate(issuer, "test.tether")
    cert = x509.load_der_x509_certificate(template.issue(read.key, "dev-2", spki=read.spki()).der)
    assert cert.public_key().public_bytes(*SPKI) == key.public_key().public_bytes(*SPKI)


@pytest.mark.parametrize("make_key", [lambda: ec.generate_private_key(ec.SECP256R1()),
                                      lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)],
                         ids=["ec", "rsa"])
def test_the_proof_of_possession_is_what_is_signature_valid_says(make_key: object) -> None:
    key = make_key()  # type: ignore[operator]
    good = build_csr(key, "dev-3", "test.tether").public_bytes(serialization.Encoding.DER)
    assert read_csr(good).signature_valid()
    # the same request with its CN altered after signing: the key it carries does not verify it
    assert not read_csr(good.replace(b"dev-3", b"dev-9")).signature_valid()


def test_the_policy_names_the_subject_of_a_refused_csr_read_once() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    read = read_csr(build_csr(key, "dev-4", "test.tether").public_bytes(serialization.Encoding.DER))
    with pytest.raises(PolicyError) as refused:
        ChainPolicy(trust_domain="test.tether").check_csr(read, "dev-5")
    assert {v.subject for v in refused.value.violations} == {"CN=dev-4"}
    assert "does not match the device id 'dev-5'" in str(refused.value)


def test_a_template_that_misreports_what_it_signed_refuses_to_exist(issuer: Issuer) -> None:
    class Misreported(DeviceTemplate):
        def issue(self, public_key: object, device_id: str, *, spki: bytes | None = None,
                  now: int | None = None) -> Issued:
            issued = super().issue(public_key, device_id, spki=spki, now=now)
            return dataclasses.replace(issued, not_after=issued.not_after + 1)

    with pytest.raises(ValueError, match="are not those of the certificate it signs"):
        Misreported(issuer, "test.tether", dt.timedelta(days=30))


def test_what_the_template_reports_is_what_the_certificate_says(issuer: Issuer) -> None:
    template = DeviceTemplate(issuer, "test.tether", dt.timedelta(days=30))
    issued = template.issue(ec.generate_private_key(ec.SECP256R1()).public_key(), "dev-6")
    assert issued == Issued.of(x509.load_der_x509_certificate(issued.der))
    assert issued.subject == "CN=dev-6" and issued.not_after - issued.not_before == 30 * 86400


def test_the_subject_reported_for_an_id_with_characters_rfc4514_escapes_is_escaped(issuer: Issuer) -> None:
    template = DeviceTemplate(issuer, "test.tether")
    issued = template.issue(ec.generate_private_key(ec.SECP256R1()).public_key(), "dev+1,x")
    assert issued.subject == Issued.of(x509.load_der_x509_certificate(issued.der)).subject == "CN=dev\\+1\\,x"


def test_a_hybrid_point_is_encoded_again_not_copied_into_the_certificate() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "dev-hybrid")]).public_bytes()
    read = read_csr(hand_csr(key, hybrid_point(key), subject))
    assert read.signature_valid()  # OpenSSL reads the hybrid point and the CSR is genuine ...
    assert read.spki() is None  # ... but its bytes are not what a certificate may carry: the signer encodes the key
    assert read.key.public_bytes(*SPKI) == key.public_key().public_bytes(*SPKI)


def test_a_subject_that_cannot_be_decoded_is_a_pem_error_naming_it() -> None:
    """`cryptography` decodes a name at `.subject`: a CN tagged INTEGER must be a refusal (PemError, a 400
    at the station), not a TypeError out of the request (a 500)."""
    key = ec.generate_private_key(ec.SECP256R1())
    point = key.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    cn_as_integer = der.tlv(der.SEQUENCE, der.tlv(der.SET, der.tlv(der.SEQUENCE,
                                                                   _oid("550403") + bytes.fromhex("020105"))))
    with pytest.raises(PemError, match="unreadable subject"):
        read_csr(hand_csr(key, point, cn_as_integer))
