"""The lab's one JWT verifier (lab/jws.py), used by the token service's checks and the artifact server:
ES256 and RS256 only, the algorithm matching the key, a valid signature, an unexpired `exp`."""

from __future__ import annotations

import json
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from lab.jws import JwtRejected, b64url, verify_jwt
from lab.tokens import JwtSigner

NOW = 1_800_000_000.0
EC_KEY = ec.generate_private_key(ec.SECP256R1())
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ES256_HEAD = b64url(b'{"alg":"ES256"}')
NONE_HEAD = b64url(b'{"alg":"none"}')


def claims(lifetime: float = 600) -> dict[str, Any]:
    return {"sub": "dev-001", "iat": NOW, "exp": NOW + lifetime}


def test_an_es256_token_from_the_lab_signer_verifies() -> None:
    token = JwtSigner(EC_KEY).sign("dev-001", 600, now=NOW)
    assert verify_jwt(token, EC_KEY.public_key(), now=NOW + 1)["sub"] == "dev-001"


def test_tokens_signed_by_pyjwt_verify_es256_and_rs256() -> None:  # an independent implementation
    assert verify_jwt(pyjwt.encode(claims(), EC_KEY, algorithm="ES256"), EC_KEY.public_key(), now=NOW)
    assert verify_jwt(pyjwt.encode(claims(), RSA_KEY, algorithm="RS256"), RSA_KEY.public_key(), now=NOW)


def test_a_token_signed_by_another_key_is_a_bad_signature() -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(JwtRejected, match=r"^bad signature$"):
        verify_jwt(JwtSigner(other).sign("dev-001", 600, now=NOW), EC_KEY.public_key(), now=NOW)


def test_changed_claims_break_the_signature() -> None:
    head, _, sig = JwtSigner(EC_KEY).sign("dev-001", 600, now=NOW).split(".")
    forged = b64url(json.dumps({**claims(), "sub": "dev-002"}).encode())
    with pytest.raises(JwtRejected, match="bad signature"):
        verify_jwt(f"{head}.{forged}.{sig}", EC_KEY.public_key(), now=NOW)


def test_an_expired_token_is_refused() -> None:
    token = JwtSigner(EC_KEY).sign("dev-001", 60, now=NOW)
    assert verify_jwt(token, EC_KEY.public_key(), now=NOW + 59.9)
    with pytest.raises(JwtRejected, match="token expired"):
        verify_jwt(token, EC_KEY.public_key(), now=NOW + 60)


def test_alg_none_is_refused() -> None:
    head = b64url(b'{"alg":"none","typ":"JWT"}')
    token = f"{head}.{b64url(json.dumps(claims()).encode())}."
    with pytest.raises(JwtRejected, match="alg 'none' is not accepted: expected one of ES256, RS256"):
        verify_jwt(token, EC_KEY.public_key(), now=NOW)


def test_hs256_signed_with_the_public_key_as_secret_is_refused() -> None:
    pem = RSA_KEY.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    head, body = b64url(b'{"alg":"HS256","typ":"JWT"}'), b64url(json.dumps(claims()).encode())
    import hashlib
    import hmac

    sig = b64url(hmac.new(pem, f"{head}.{body}".encode(), hashlib.sha256).digest())
    with pytest.raises(JwtRejected, match="alg 'HS256' is not accepted"):
        verify_jwt(f"{head}.{body}.{sig}", RSA_KEY.public_key(), now=NOW)


def test_an_alg_that_does_not_match_the_key_is_refused() -> None:
    with pytest.raises(JwtRejected, match="alg 'RS256' does not match the token key"):
        verify_jwt(pyjwt.encode(claims(), RSA_KEY, algorithm="RS256"), EC_KEY.public_key(), now=NOW)
    with pytest.raises(JwtRejected, match="alg 'ES256' does not match the token key"):
        verify_jwt(pyjwt.encode(claims(), EC_KEY, algorithm="ES256"), RSA_KEY.public_key(), now=NOW)


@pytest.mark.parametrize("token,reason", [
    ("", "expected 3 dot-separated segments"),
    ("a.b", "expected 3 dot-separated segments"),
    ("a.b.c.d", "expected 3 dot-separated segments"),
    ("!!.e30.c2ln", "malformed token: header: character"),
    (f"{b64url(b'not json')}.{b64url(json.dumps(claims()).encode())}.c2ln", "malformed token: header: not UTF-8 JSON"),
    (f"{b64url(b'{}')}.{b64url(b'{}')}.c2ln", "malformed token: claims.exp: missing"),
    (f"{b64url(b'{}')}.{b64url(json.dumps(claims()).encode())}.c2ln", "alg None is not accepted"),
    (f"{ES256_HEAD}.{b64url(json.dumps(claims()).encode())}.c2ln",
     "bad signature: ES256 needs 64 bytes, got 3"),
])
def test_malformed_tokens_say_what_is_wrong(token: str, reason: str) -> None:
    with pytest.raises(JwtRejected) as info:
        verify_jwt(token, EC_KEY.public_key(), now=NOW)
    assert reason in str(info.value)


def test_there_is_one_verifier_in_the_lab() -> None:
    import lab.artifacts
    import lab.tokens

    assert not hasattr(lab.artifacts, "_jwt_valid") and not hasattr(lab.artifacts, "_jwt_valid_cryptography")
    assert not hasattr(lab.tokens, "verify_jwt")
