"""The station's device certificate template (authority.DeviceTemplate, der.py) writes, byte for byte,
the certificate `CertificateBuilder` writes, and refuses to exist when it does not."""

from __future__ import annotations

import base64
import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs7

from provisioning import authority, certs, der
from provisioning.authority import DeviceTemplate, Issuer
from provisioning.certs import issued_by

SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture(scope="module")
def issuer() -> Issuer:
    key = ec.generate_private_key(ec.SECP256R1())
    return Issuer(authority.root_ca(key, cn="Template Test CA"), key)


@pytest.mark.parametrize(("device_id", "start", "days", "serial"), [
    ("a", dt.datetime(2026, 12, 7, 0, 0, 1, tzinfo=dt.UTC), 365, 1),
    ("dev-" + "x" * 60, dt.datetime(2049, 12, 31, 23, 59, 59, tzinfo=dt.UTC), 1, (1 << 158) | 1),  # long forms
    ("sensor.0042_b", dt.datetime(2049, 6, 1, tzinfo=dt.UTC), 400, (1 << 151) | 3),  # UTCTime -> GeneralizedTime
    ("z", dt.datetime(2051, 1, 1, tzinfo=dt.UTC), 3650, 0x80),  # a serial whose top bit needs a 0 byte
])
def test_template_writes_the_same_to_be_signed_bytes_as_the_builder(issuer: Issuer, device_id: str,
                                                                    start: dt.datetime, days: int,
                                                                    serial: int) -> None:
    for key in (ec.generate_private_key(ec.SECP256R1()).public_key(),
                rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()):
        template = DeviceTemplate(issuer, "test.tether", dt.timedelta(days=days))
        built = authority.device_cert(issuer, key, device_id, "test.tether", lifetime=dt.timedelta(days=days),
                                      not_before=start, serial=serial)
        mine = template.tbs(key.public_bytes(*SPKI), device_id, serial, int(start.timestamp()))
        assert mine == built.tbs_certificate_bytes


def test_a_templated_certificate_is_signed_by_the_issuer_and_valid_from_a_minute_ago(issuer: Issuer) -> None:
    template = DeviceTemplate.for_issuer(issuer, "test.tether", dt.timedelta(days=30))
    assert template is not None
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    cert = template.sign(key, "dev-7")
    assert issued_by(cert, issuer.cert)
    assert cert.public_key() == key
    age = dt.datetime.now(dt.UTC) - cert.not_valid_before_utc
    assert dt.timedelta(seconds=55) <= age <= dt.timedelta(seconds=70)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(days=30)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://test.tether/device/dev-7"]


def test_a_template_whose_encoding_differs_from_the_builder_refuses_to_exist(issuer: Issuer) -> None:
    class Drifted(DeviceTemplate):
        def tbs(self, spki: bytes, device_id: str, serial: int, not_before: int) -> bytes:
            return super().tbs(spki, device_id + "!", serial, not_before)

    with pytest.raises(ValueError, match="does not encode what CertificateBuilder does"):
        Drifted(issuer, "test.tether")


def test_a_common_name_longer_than_x520_allows_is_refused_as_by_the_builder(issuer: Issuer) -> None:
    template = DeviceTemplate(issuer, "test.tether")
    with pytest.raises(ValueError, match="64"):
        template.sign(ec.generate_private_key(ec.SECP256R1()).public_key(), "d" * 65)


def test_no_template_for_an_issuer_key_it_cannot_sign_with() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert DeviceTemplate.for_issuer(Issuer(authority.root_ca(key), key), "test.tether") is None


def test_pkcs7_from_der_is_what_the_station_answered_before(issuer: Issuer) -> None:
    cert = authority.device_cert(issuer, ec.generate_private_key(ec.SECP256R1()).public_key(), "dev-1", "t.tether")
    ours = der.pkcs7_certs_only([cert.public_bytes(serialization.Encoding.DER)])
    assert ours == certs.pkcs7_certs_only([cert])  # the body, format included (one line of base64)
    assert base64.b64decode(ours) == pkcs7.serialize_certificates([cert], serialization.Encoding.DER)


def test_der_reader_refuses_what_is_not_a_whole_element() -> None:
    for bad in (b"", b"\x30", b"\x30\x80\x00\x00", b"\x30\x05\x01", b"\x30\x85\x00\x00\x00\x00\x01\x00"):
        with pytest.raises(ValueError, match="DER"):
            der.first_element(bad)
