"""The lab's one JWT verifier: the token service's own checks and the artifact server's bearer check.

Compact JWS (RFC 7515) carrying JWT claims (RFC 7519), signed ES256 (RFC 7518 3.4: the signature is
r || s, 32 bytes each) or RS256 (RFC 7518 3.3). The algorithm comes from the header but must match the
key: `none`, HMAC (`HS256`, where an attacker would sign with the public key as the secret) and
anything else are refused. Claims are read by agent/core's strict decoder, the one the device uses.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from agent.core.errors import CoreError
from agent.core.jwt import b64url_decode, decode_claims
from lab.procs import LabError

ALGORITHMS = ("ES256", "RS256")


class JwtRejected(LabError):
    """A bearer token the lab does not accept; the message says why (malformed, alg, signature, expired)."""


def b64url(data: bytes) -> str:
    """Unpadded base64url (RFC 7515 2), as JWS segments are written."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def verify_jwt(token: str, public_key: Any, now: float | None = None) -> dict[str, Any]:
    """Claims of a token signed by `public_key` (EC P-256 for ES256, RSA for RS256) whose `exp` is after
    `now` (default: the clock); JwtRejected naming the reason otherwise."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    if not isinstance(token, str) or token.count(".") != 2:
        raise JwtRejected("malformed token: expected 3 dot-separated segments")
    head, body, sig = token.split(".")
    try:
        header = json.loads(b64url_decode(head, "header"))
        raw = b64url_decode(sig, "signature")
        claims = decode_claims(token)
    except CoreError as exc:
        raise JwtRejected(f"malformed token: {exc}") from None
    except (ValueError, UnicodeError):
        raise JwtRejected("malformed token: header: not UTF-8 JSON") from None
    alg = header.get("alg") if isinstance(header, dict) else None
    if alg not in ALGORITHMS:
        raise JwtRejected(f"alg {alg!r} is not accepted: expected one of {', '.join(ALGORITHMS)}")
    signed = f"{head}.{body}".encode()
    try:
        if alg == "ES256":
            if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.name != "secp256r1":
                raise JwtRejected("alg 'ES256' does not match the token key (not EC P-256)")
            if len(raw) != 64:
                raise JwtRejected(f"bad signature: ES256 needs 64 bytes, got {len(raw)}")
            der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
            public_key.verify(der, signed, ec.ECDSA(hashes.SHA256()))
        else:
            if not isinstance(public_key, rsa.RSAPublicKey):
                raise JwtRejected("alg 'RS256' does not match the token key (not RSA)")
            public_key.verify(raw, signed, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        raise JwtRejected("bad signature") from None
    now = time.time() if now is None else now
    if claims["exp"] <= now:
        raise JwtRejected(f"token expired {now - claims['exp']:.1f} s ago")
    return claims
