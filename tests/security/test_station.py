"""The station signs only for the device that authenticated: a one-time password for dev-A buys no
certificate for dev-B, whatever the CSR says. (Re-enrollment over mTLS asking for another subject is
refused in tests/station/test_enroll.py; a revoked certificate in test_device_identity.py.)"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from hal.keys.file import generate
from provisioning import EnrollmentError
from provisioning.csr import build_csr
from provisioning.est.client import BasicAuth, EstClient
from provisioning.identity import spiffe_id
from tests.pki import TRUST_DOMAIN
from tests.station.conftest import RunningStation


def csr_with(key: object, cn: str, uris: Sequence[str]) -> x509.CertificateSigningRequest:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                                                                 cn)]))
    if uris:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(u) for u in uris]), critical=False)
    return builder.sign(key, hashes.SHA256())  # type: ignore[arg-type]


def enroll(station: RunningStation, user: str, password: str, csr: x509.CertificateSigningRequest) -> list:
    with EstClient(station.url, str(station.ca_file), auth=BasicAuth(user, password)) as est:
        return est.simpleenroll(csr)


@pytest.mark.parametrize(("cn", "uri_of"), [
    ("dev-B", "dev-B"),   # the victim's names throughout
    ("dev-A", "dev-B"),   # own CN, the victim's SPIFFE ID (brokers that authorize by SAN would take it)
    ("dev-B", "dev-A"),   # the victim's CN (brokers that authorize by CN would take it), own SPIFFE ID
], ids=["victim-cn-and-san", "victim-san", "victim-cn"])
def test_station_refuses_a_csr_for_another_device_id(cn: str, uri_of: str, station: RunningStation) -> None:
    password = station.otp("dev-A")
    key = generate("ec-p256")
    with pytest.raises(EnrollmentError) as refused:
        enroll(station, "dev-A", password, csr_with(key, cn, [spiffe_id(TRUST_DOMAIN, uri_of)]))
    assert refused.value.status == 403 and "dev-B" in str(refused.value), str(refused.value)
    assert station.rows("dev-B") == [] and station.rows("dev-A") == []
    # the password was not spent by the refused request: dev-A can still enroll as itself
    chain = enroll(station, "dev-A", password, build_csr(key, "dev-A", TRUST_DOMAIN))
    assert chain[0].subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-A"


def test_one_time_password_of_one_device_does_not_authenticate_another(station: RunningStation) -> None:
    password = station.otp("dev-A")
    key = generate("ec-p256")
    with pytest.raises(EnrollmentError) as refused:
        enroll(station, "dev-B", password, build_csr(key, "dev-B", TRUST_DOMAIN))
    assert refused.value.status == 401 and "not valid for device 'dev-B'" in str(refused.value)
    assert station.rows("dev-B") == []
