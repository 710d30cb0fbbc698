"""Certificate chains and CSRs from outside (EST answers, chain files, CSRs at the station): only
ProvisioningError (PemError, PolicyError) may escape `load_certificates`, `load_csr`, and the
`ChainPolicy` checks run on whatever they return."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7
from hypothesis import given
from hypothesis import strategies as st

from hal.keys.file import generate
from provisioning import authority
from provisioning.certs import load_certificates, load_csr
from provisioning.csr import build_csr
from provisioning.errors import ProvisioningError
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
    with contextlib.suppress(ProvisioningError):
        chain = load_certificates(data, "fuzz")
        POLICY.check_chain(chain, device_id=device_id, device_key=DEVICE_KEY.public_key() if with_key else None)
        ChainPolicy().check_chain(list(reversed(chain)))


csr_inputs = st.one_of(
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
        POLICY.check_csr(load_csr(data, "fuzz"), device_id)
