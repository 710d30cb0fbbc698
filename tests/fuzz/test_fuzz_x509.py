"""Certificate chains and CSRs from outside (EST answers, chain files, CSRs at the station): only
ProvisioningError (PemError, PolicyError) may escape `load_certificates`, `load_csr`, and the
`ChainPolicy` checks run on whatever they return. Oracle: whatever the policy accepts is re-checked
here with `cryptography` directly (signatures, v3, validity, KeyUsage, EKU, CN, SPIFFE ID, anchor), so a
rule switched off in policy.py lets a seed that breaks it through and fails the test."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import itertools

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given
from hypothesis import strategies as st

from hal.keys.file import generate
from provisioning import ProvisioningError, authority
from provisioning.certs import load_certificates, load_csr
from provisioning.csr import build_csr
from provisioning.identity import spiffe_id
from provisioning.policy import ChainPolicy
from tests.fuzz.inputs import FUZZ, mutated, scratch, tried
from tests.pki import TRUST_DOMAIN, Pki

PKI = Pki.create(scratch("tether-fuzz-pki-"))
DEVICE_KEY = generate("ec-p256")
RSA_KEY = generate("rsa-2048")
CHAIN = PKI.device_chain(DEVICE_KEY.public_key(), "dev-001")
ODD = [  # certificates that break rules, as seeds for mutation
    authority.device_cert(PKI.issuing, DEVICE_KEY.public_key(), "dev-001", TRUST_DOMAIN,
                          not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=3), lifetime=dt.timedelta(days=1)),
    authority.server_cert(PKI.issuing, DEVICE_KEY.public_key(), "broker", ("localhost",), ("127.0.0.1",)),
    authority.build(authority.name("dev-001"), RSA_KEY.public_key(), PKI.issuing, PKI.issuing.key, ca=False,
                    include_bc=False, crl_url="http://crl.example/x.crl"),
]
_NB = dt.datetime.now(dt.UTC)
_OTHER_KEY = generate("ec-p256")
ODD += [  # one broken rule each, as whole chains below: the oracle catches the rule switched off
    authority.device_cert(PKI.issuing, DEVICE_KEY.public_key(), "dev-001", TRUST_DOMAIN,
                          not_before=_NB + dt.timedelta(hours=1)),                                # not yet valid
    authority.build(authority.name("dev-001"), DEVICE_KEY.public_key(), PKI.issuing, PKI.issuing.key, ca=False,
                    usage=x509.KeyUsage(False, False, True, False, False, False, False, False, False),
                    eku=[ExtendedKeyUsageOID.CLIENT_AUTH],
                    sans=[x509.UniformResourceIdentifier(spiffe_id(TRUST_DOMAIN, "dev-001"))]),  # no digitalSignature
    authority.device_cert(PKI.issuing, DEVICE_KEY.public_key(), "dev:001", TRUST_DOMAIN),        # ':' in the CN
    authority.device_cert(PKI.issuing, DEVICE_KEY.public_key(), "dev-001", "other.domain"),      # foreign SPIFFE ID
    authority.device_cert(PKI.issuing, _OTHER_KEY.public_key(), "dev-001", TRUST_DOMAIN),        # another key
    authority.build(authority.name("dev-002"), DEVICE_KEY.public_key(), PKI.issuing, PKI.issuing.key, ca=False,
                    usage=x509.KeyUsage(True, False, False, False, False, False, False, False, False),
                    eku=[ExtendedKeyUsageOID.CLIENT_AUTH],
                    sans=[x509.UniformResourceIdentifier(spiffe_id(TRUST_DOMAIN, "dev-001"))]),  # another CN
]
CERT_DER = [c.public_bytes(Encoding.DER) for c in [*CHAIN, *ODD]]

CSRS = [build_csr(DEVICE_KEY, "dev-001", TRUST_DOMAIN, dns=["dev.local"], ips=["10.0.0.1"]),
        build_csr(RSA_KEY, "dev-001", "other.domain"),
        x509.CertificateSigningRequestBuilder().subject_name(authority.name("dev-001"))
        .sign(DEVICE_KEY, hashes.SHA256())]
CSR_DER = [c.public_bytes(Encoding.DER) for c in CSRS]
POLICY = ChainPolicy(trust_domain=TRUST_DOMAIN, anchors=(PKI.root.cert,))


def pem(label: str, der: bytes) -> bytes:
    body = base64.encodebytes(der)
    return b"-----BEGIN " + label.encode() + b"-----\n" + body + b"-----END " + label.encode() + b"-----\n"


ODD_CHAINS = [b"".join(pem("CERTIFICATE", c.public_bytes(Encoding.DER)) for c in (odd, *CHAIN[1:])) for odd in ODD]
der_certs = mutated(CERT_DER)
pem_blocks = st.one_of(
    der_certs.map(lambda d: pem("CERTIFICATE", d)),
    st.lists(st.sampled_from(CERT_DER), min_size=1, max_size=4).map(
        lambda ds: pem("PKCS7", pkcs7.serialize_certificates([x509.load_der_x509_certificate(d) for d in ds],
                                                             Encoding.DER))),
    st.sampled_from(["PRIVATE KEY", "CERTIFICATE REQUEST", "X509 CRL"]).map(lambda label: pem(label, CSR_DER[0])),
    st.binary(max_size=200).map(lambda b: pem("CERTIFICATE", b)),
)
chain_inputs = st.one_of(
    st.sampled_from(ODD_CHAINS),
    st.binary(max_size=600),
    der_certs,
    st.lists(pem_blocks, min_size=1, max_size=5).map(b"".join),
    mutated([b"".join(pem("CERTIFICATE", d) for d in CERT_DER[:3])], max_edits=4),
    st.lists(st.sampled_from(CERT_DER), min_size=1, max_size=4).map(
        lambda ds: pkcs7.serialize_certificates([x509.load_der_x509_certificate(d) for d in ds], Encoding.DER)),
)


@FUZZ
@given(chain_inputs, st.sampled_from([None, "dev-001", "dev-002"]), st.booleans())
def test_chain_parsing_and_policy_raise_only_provisioning_errors(data: bytes, device_id: str | None,
                                                                with_key: bool) -> None:
    tried("certificate chain (load_certificates + ChainPolicy.check_chain)")
    try:
        chain = load_certificates(data, "fuzz")
    except ProvisioningError:
        return
    with contextlib.suppress(ProvisioningError):
        POLICY.check_chain(chain, device_id=device_id, device_key=DEVICE_KEY.public_key() if with_key else None)
        assert_sound(chain, device_id, DEVICE_KEY.public_key() if with_key else None)
    with contextlib.suppress(ProvisioningError):
        ChainPolicy().check_chain(list(reversed(chain)))
        assert_linked(list(reversed(chain)))


def spki(key: object) -> bytes:
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)  # type: ignore[attr-defined]


def ext(cert: x509.Certificate, cls: type) -> object | None:
    try:
        return cert.extensions.get_extension_for_class(cls).value
    except x509.ExtensionNotFound:
        return None


def assert_linked(chain: list[x509.Certificate]) -> None:
    """An accepted chain: X.509 v3 throughout, each certificate signed by the next, a self-signed root,
    validity within the 5-minute leeway, issuers CA:true with keyCertSign."""
    now = dt.datetime.now(dt.UTC)
    skew = dt.timedelta(minutes=5)
    for cert in chain:
        assert cert.version == x509.Version.v3, cert
        assert cert.not_valid_before_utc <= now + skew and cert.not_valid_after_utc >= now - skew, cert
    for child, parent in itertools.pairwise(chain):
        child.verify_directly_issued_by(parent)  # raises if not
    chain[-1].verify_directly_issued_by(chain[-1])
    for issuer in chain[1:]:
        bc, ku = ext(issuer, x509.BasicConstraints), ext(issuer, x509.KeyUsage)
        assert isinstance(bc, x509.BasicConstraints) and bc.ca, issuer
        assert ku is None or ku.key_cert_sign, issuer  # type: ignore[attr-defined]


def assert_sound(chain: list[x509.Certificate], device_id: str | None, device_key: object | None) -> None:
    """What POLICY must have refused, re-checked independently on a chain it accepted."""
    assert_linked(chain)
    root, leaf = chain[-1], chain[0]
    assert any(a.subject == root.subject and spki(a.public_key()) == spki(root.public_key())
               for a in POLICY.anchors), root
    cn = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert isinstance(cn, str) and cn and ":" not in cn and cn == (device_id or cn), leaf
    bc, ku, eku = ext(leaf, x509.BasicConstraints), ext(leaf, x509.KeyUsage), ext(leaf, x509.ExtendedKeyUsage)
    assert bc is None or not bc.ca, leaf  # type: ignore[attr-defined]
    assert ku is None or ku.digital_signature, leaf  # type: ignore[attr-defined]
    assert isinstance(eku, x509.ExtendedKeyUsage) and ExtendedKeyUsageOID.CLIENT_AUTH in eku, leaf
    san = ext(leaf, x509.SubjectAlternativeName)
    assert isinstance(san, x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.UniformResourceIdentifier)[0] == spiffe_id(TRUST_DOMAIN, cn)
    if device_key is not None:
        assert spki(leaf.public_key()) == spki(device_key)
    for cert in chain:
        key = cert.public_key()
        assert (isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1") or \
            (isinstance(key, rsa.RSAPublicKey) and key.key_size >= 2048), cert


CSR_ODD = [  # refused seeds: a CN with ":", a P-384 key
    x509.CertificateSigningRequestBuilder().subject_name(authority.name("dev:001"))
    .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id(TRUST_DOMAIN, "dev:001"))]),
                   critical=False).sign(DEVICE_KEY, hashes.SHA256()),
    build_csr(ec.generate_private_key(ec.SECP384R1()), "dev-001", TRUST_DOMAIN),
]
csr_inputs = st.one_of(
    st.sampled_from([c.public_bytes(Encoding.DER) for c in CSR_ODD]),
    st.binary(max_size=400),
    mutated(CSR_DER),
    mutated(CSR_DER).map(base64.encodebytes),
    mutated(CSR_DER).map(lambda d: pem("CERTIFICATE REQUEST", d)),
    mutated([base64.encodebytes(d) for d in CSR_DER]),
)


@FUZZ
@given(csr_inputs, st.sampled_from([None, "dev-001", "dev-002"]))
def test_csr_parsing_and_policy_raise_only_provisioning_errors(data: bytes, device_id: str | None) -> None:
    tried("CSR (load_csr + ChainPolicy.check_csr)")
    with contextlib.suppress(ProvisioningError):
        csr = load_csr(data, "fuzz")
        POLICY.check_csr(csr, device_id)
        # oracle: what an accepted CSR must be (proof of possession, key, CN, SPIFFE ID)
        assert csr.is_signature_valid
        key = csr.public_key()
        assert (isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1") or \
            (isinstance(key, rsa.RSAPublicKey) and key.key_size >= 2048)
        cn = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        assert isinstance(cn, str) and cn and ":" not in cn and cn == (device_id or cn)
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier)[0] == spiffe_id(TRUST_DOMAIN, cn)
