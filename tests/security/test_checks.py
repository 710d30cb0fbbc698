"""Issue 13 case 10: every identity check has a test that fails when the check is removed.

Each test builds the one certificate that breaks one rule (and, where the rule has a boundary, the
one just inside it), so deleting the check in provisioning/policy.py, provisioning/release.py or
the station makes exactly that test fail."""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from hal.keys.file import generate
from provisioning import EnrollmentError, authority
from provisioning.authority import Issuer
from provisioning.certs import to_pem
from provisioning.csr import build_csr
from provisioning.est.client import BasicAuth, ClientCertAuth, EstClient
from provisioning.policy import ChainPolicy
from provisioning.release import ReleaseError, check_signer
from tests.pki import TRUST_DOMAIN, Pki, key_pem
from tests.station.conftest import RunningStation

NOW = dt.datetime(2030, 6, 1, 12, 0, tzinfo=dt.UTC)
POLICY = ChainPolicy(trust_domain=TRUST_DOMAIN)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("pki"))


def usage(**on: bool) -> x509.KeyUsage:
    flags = dict.fromkeys(("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
                           "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"), False)
    return x509.KeyUsage(**{**flags, **on})


def rules(chain: list[x509.Certificate], now: dt.datetime = NOW) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for v in POLICY.chain_violations(chain, device_id="dev-1", now=now):
        out.setdefault(v.rule, []).append(v.detail)
    return out


def device(pki: Pki, *, not_before: dt.datetime | None = None, lifetime: dt.timedelta = dt.timedelta(days=30),
           issuer: Issuer | None = None, ku: x509.KeyUsage | None = None) -> x509.Certificate:
    by = issuer or pki.issuing
    return authority.build(authority.name("dev-1"), generate("ec-p256").public_key(), by, by.key, ca=False,
                           not_before=not_before or NOW - dt.timedelta(days=1), lifetime=lifetime,
                           usage=ku or usage(digital_signature=True), eku=[ExtendedKeyUsageOID.CLIENT_AUTH],
                           sans=[x509.UniformResourceIdentifier(f"spiffe://{TRUST_DOMAIN}/device/dev-1")])


def test_a_good_chain_breaks_no_rule(pki: Pki) -> None:  # the control for every test below
    assert rules([device(pki), pki.issuing.cert, pki.root.cert]) == {}


# -- validity leeway: 5 minutes either way, no more ----------------------------------------------------
@pytest.mark.parametrize(("offset", "broken"), [(4, False), (6, True)])
def test_not_yet_valid_leeway_is_five_minutes(pki: Pki, offset: int, broken: bool) -> None:
    leaf = device(pki, not_before=NOW + dt.timedelta(minutes=offset))
    assert ("not-yet-valid" in rules([leaf, pki.issuing.cert, pki.root.cert])) is broken


@pytest.mark.parametrize(("offset", "broken"), [(4, False), (6, True)])
def test_expiry_leeway_is_five_minutes(pki: Pki, offset: int, broken: bool) -> None:
    start = NOW - dt.timedelta(days=1)
    leaf = device(pki, not_before=start, lifetime=(NOW - dt.timedelta(minutes=offset)) - start)
    assert ("expired" in rules([leaf, pki.issuing.cert, pki.root.cert])) is broken


# -- key usage -------------------------------------------------------------------------------------------
def test_an_issuer_whose_key_usage_lacks_key_cert_sign_is_refused(pki: Pki) -> None:
    key = generate("ec-p256")
    inter = authority.build(authority.name("No CertSign CA"), key.public_key(), pki.root, pki.root.key, ca=True,
                            pathlen=0, usage=usage(digital_signature=True, crl_sign=True),
                            not_before=NOW - dt.timedelta(days=1))
    found = rules([device(pki, issuer=Issuer(inter, key)), inter, pki.root.cert])
    assert found.get("key-usage") == ["KeyUsage lacks keyCertSign"], found


def test_a_leaf_whose_key_usage_lacks_digital_signature_is_refused(pki: Pki) -> None:
    leaf = device(pki, ku=usage(key_encipherment=True))
    found = rules([leaf, pki.issuing.cert, pki.root.cert])
    assert found.get("key-usage") == ["KeyUsage lacks digitalSignature"], found


# -- the root's own signature -----------------------------------------------------------------------------
def test_a_root_with_a_bad_self_signature_is_refused(pki: Pki) -> None:
    """The root names key A but is signed by key B; everything below it is signed by key A, so only
    the self-signature is wrong (as a tampered or forged root would be)."""
    key_a, key_b = generate("ec-p256"), generate("ec-p256")
    root = authority.build(authority.name("Forged Root"), key_a.public_key(), None, key_b, ca=True, pathlen=1,
                           usage=usage(key_cert_sign=True, crl_sign=True), not_before=NOW - dt.timedelta(days=1))
    inter_key = generate("ec-p256")
    inter = authority.build(authority.name("Forged Issuing"), inter_key.public_key(), Issuer(root, key_a), key_a,
                            ca=True, pathlen=0, usage=usage(key_cert_sign=True), not_before=NOW - dt.timedelta(days=1))
    found = rules([device(pki, issuer=Issuer(inter, inter_key)), inter, root])
    assert found == {"signature": ["root self-signature invalid"]}, found


# -- X.509 version -----------------------------------------------------------------------------------------
def test_a_v1_certificate_is_refused(pki: Pki, tmp_path: Path) -> None:
    """cryptography cannot make a v1 certificate; OpenSSL's `x509 -req` without extensions does."""
    key = generate("ec-p256")
    (tmp_path / "dev.key").write_bytes(key_pem(key))
    (tmp_path / "ca.key").write_bytes(key_pem(pki.issuing.key))
    (tmp_path / "ca.pem").write_bytes(pki.issuing.cert.public_bytes(Encoding.PEM))
    (tmp_path / "dev.csr").write_bytes(build_csr(key, "dev-1", TRUST_DOMAIN).public_bytes(Encoding.PEM))
    subprocess.run(["openssl", "x509", "-req", "-in", "dev.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                    "-set_serial", "7", "-days", "30", "-out", "dev.pem"], cwd=tmp_path, check=True,
                   capture_output=True)
    leaf = x509.load_pem_x509_certificate((tmp_path / "dev.pem").read_bytes())
    assert leaf.version == x509.Version.v1
    found = rules([leaf, pki.issuing.cert, pki.root.cert], now=dt.datetime.now(dt.UTC))
    assert found.get("x509-v3") == ["version v1, X.509 v3 required"], found


# -- release signer ----------------------------------------------------------------------------------------
def test_a_device_certificate_cannot_sign_releases(pki: Pki) -> None:
    """A device's key (EKU clientAuth, issued by the same CA) must not sign firmware the fleet accepts."""
    now = dt.datetime.now(dt.UTC)
    signer = authority.code_signing_cert(pki.issuing, generate("ec-p256").public_key())
    check_signer([signer, pki.issuing.cert], [pki.root.cert], now)  # the control: a real release signer
    stolen = pki.device_chain(generate("ec-p256").public_key(), "dev-1")
    with pytest.raises(ReleaseError, match="ExtendedKeyUsage lacks codeSigning"):
        check_signer(stolen[:2], [pki.root.cert], now)
    no_eku = authority.build(authority.name("No EKU"), generate("ec-p256").public_key(), pki.issuing,
                             pki.issuing.key, ca=False, usage=usage(digital_signature=True))
    with pytest.raises(ReleaseError, match="codeSigning required"):
        check_signer([no_eku, pki.issuing.cert], [pki.root.cert], now)


# -- re-enrollment keeps the subject --------------------------------------------------------------------------
def test_reenrollment_cannot_change_the_subject(tmp_path: Path, station: RunningStation) -> None:
    """The CN (checked by the policy) stays; any other attribute a CSR adds is refused too."""
    key = generate("ec-p256")
    with EstClient(station.url, str(station.ca_file), auth=BasicAuth("keep-1", station.otp("keep-1"))) as c:
        chain = c.simpleenroll(build_csr(key, "keep-1", TRUST_DOMAIN))
    (tmp_path / "c.pem").write_bytes(to_pem(chain))
    (tmp_path / "c.key").write_bytes(key_pem(key))
    csr = build_csr(key, "keep-1", TRUST_DOMAIN)
    builder = x509.CertificateSigningRequestBuilder().subject_name(authority.name("keep-1", "Other Org"))
    builder = builder.add_extension(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value,
                                    critical=False)
    changed = builder.sign(key, hashes.SHA256())
    with EstClient(station.url, str(station.ca_file), auth=ClientCertAuth(str(tmp_path / "c.pem"),
                                                                          str(tmp_path / "c.key"))) as c:
        with pytest.raises(EnrollmentError) as refused:
            c.simplereenroll(changed)
        assert refused.value.status == 403 and "must keep the subject" in str(refused.value), str(refused.value)
        c.simplereenroll(csr)  # the control: the same subject renews
    assert len(station.rows("keep-1")) == 2
