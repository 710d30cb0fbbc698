"""Attested enrollment's decisions fed thousands of requests: `Attestation.start` with JSON whose EK
certificate, EK and AK public areas are real, mutated or random, and `Attestation.enroll` with random
passwords and CSRs. Only `Refusal` may come out (a 500 at the server means an exception escaped).
Oracle: a start answers a challenge only for a well-formed EK certificate from the trusted maker whose key
is in `ek_public`, with a restricted signing AK; nothing enrolls without the secret of a challenge."""

from __future__ import annotations

import base64
import datetime as dt
import json
import re

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from hypothesis import example, given
from hypothesis import strategies as st

from provisioning import authority
from provisioning.attest import tpm2
from provisioning.authority import Issuer
from provisioning.station.ca import Station, init_station
from provisioning.station.enrollment import Enrollment
from provisioning.station.errors import Refusal
from tests.fuzz.inputs import FUZZ, mutated, scratch, tried
from tests.pki import TRUST_DOMAIN

_DIR = scratch("tether-fuzz-attest-") / "station"
init_station(_DIR, TRUST_DOMAIN)
_ROOT_KEY = ec.generate_private_key(ec.SECP256R1())
_ROOT = authority.root_ca(_ROOT_KEY, cn="Fuzz TPM Maker")
_EK_KEY = rsa.generate_private_key(65537, 2048)
_EK_CERT = authority.build(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ek")]), _EK_KEY.public_key(),
                           Issuer(_ROOT, _ROOT_KEY), _ROOT_KEY, ca=False,
                           lifetime=dt.timedelta(days=3650)).public_bytes(Encoding.DER)
(_DIR / "ek-roots.pem").write_bytes(_ROOT.public_bytes(Encoding.PEM))
_TOML = _DIR / "station.toml"
_TOML.write_text(re.sub(r'(?m)^ledger_sync = .*$', 'ledger_sync = "normal"',  # no fsync per challenge
                        re.sub(r'(?m)^ek_roots = .*$', 'ek_roots = "ek-roots.pem"', _TOML.read_text())))
STATION = Station(_DIR)
LEDGER = STATION.open_ledger()
DECIDE = Enrollment(STATION, LEDGER).attestation
EK_PUBLIC = tpm2.marshal_public(_EK_KEY.public_key(), tpm2.FIXED_TPM | tpm2.FIXED_PARENT | tpm2.SENSITIVE_DATA_ORIGIN
                                | tpm2.RESTRICTED | tpm2.DECRYPT, symmetric=(tpm2.ALG_AES, 128, tpm2.ALG_CFB))
AK_PUBLIC = tpm2.marshal_public(ec.generate_private_key(ec.SECP256R1()).public_key(),
                                tpm2.FIXED_TPM | tpm2.FIXED_PARENT | tpm2.SENSITIVE_DATA_ORIGIN | tpm2.RESTRICTED
                                | tpm2.SIGN, scheme=tpm2.ALG_ECDSA)


def field(real: bytes) -> st.SearchStrategy[object]:
    as_b64 = st.binary(max_size=600).map(lambda b: base64.b64encode(b).decode())
    return st.one_of(st.just(base64.b64encode(real).decode()),
                     mutated([real]).map(lambda b: base64.b64encode(b).decode()), as_b64,
                     st.text(max_size=40), st.integers(), st.none())


# found by the fuzzer: an EK public area whose symmetric algorithm (0x0106) no credential can be made for
# escaped `start` as an AttestError (a 500) instead of a refusal
_EK_ODD_SYMMETRIC = tpm2.marshal_public(_EK_KEY.public_key(), tpm2.FIXED_TPM | tpm2.FIXED_PARENT
                                        | tpm2.SENSITIVE_DATA_ORIGIN | tpm2.RESTRICTED | tpm2.DECRYPT,
                                        symmetric=(0x0106, 128, tpm2.ALG_CFB))


@FUZZ
@example(device="dev-fuzz", ek_cert=base64.b64encode(_EK_CERT).decode(),
         ek_public=base64.b64encode(_EK_ODD_SYMMETRIC).decode(), ak_public=base64.b64encode(AK_PUBLIC).decode(),
         content_type="application/json")
@given(device=st.one_of(st.just("dev-fuzz"), st.text(max_size=30), st.integers()),
       ek_cert=field(_EK_CERT), ek_public=field(EK_PUBLIC), ak_public=field(AK_PUBLIC),
       content_type=st.sampled_from(["application/json", "application/json", "text/plain"]))
def test_start_answers_a_challenge_or_a_refusal(device: object, ek_cert: object, ek_public: object,
                                                ak_public: object, content_type: str) -> None:
    tried("attest/start")
    body = json.dumps({"device_id": device, "ek_certificate": ek_cert, "ek_public": ek_public,
                       "ak_public": ak_public}).encode()
    try:
        answer = json.loads(DECIDE.start(content_type, body))
    except Refusal as refusal:
        assert refusal.status in (400, 403, 415), refusal.reason
        return
    assert isinstance(device, str)  # any well-formed id: this station keeps no allow-list
    assert base64.b64decode(ek_cert) == _EK_CERT  # type: ignore[arg-type]
    assert tpm2.Public.parse(base64.b64decode(ek_public)).public_key() == _EK_KEY.public_key()  # type: ignore[arg-type]
    assert tpm2.Public.parse(base64.b64decode(ak_public)).has(tpm2.RESTRICTED, tpm2.SIGN)  # type: ignore[arg-type]
    assert set(answer) >= {"credential_blob", "encrypted_secret", "nonce"}


@FUZZ
@given(body=st.binary(max_size=800), user=st.text(max_size=20), password=st.text(max_size=80),
       content_type=st.sampled_from(["application/pkcs10", "text/plain"]))
def test_enroll_without_a_challenges_secret_is_refused(body: bytes, user: str, password: str,
                                                       content_type: str) -> None:
    tried("attest/simpleenroll")
    try:
        DECIDE.enroll(content_type, body, (user, password))
    except Refusal as refusal:
        assert refusal.status in (400, 401, 403, 415), refusal.reason
        return
    raise AssertionError("an enrollment without a challenge's secret was answered")
