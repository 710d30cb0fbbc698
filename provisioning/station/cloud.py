"""Proofs of possession of the CA key that clouds ask for before they trust the station's CA.

The CA that signs devices (the issuing CA; with `init --tiers 1` the only CA) is the one registered:
- Cumulocity (seed 004, "Perform a proof of possession"): the tenant shows an unsigned verification
  code for an uploaded trusted certificate; the signed code is the SHA-256 signature of the code's
  bytes with the CA key, base64 (what `openssl dgst -sha256 -sign ca.key code.txt | openssl base64 -A`
  prints for a file holding exactly the code).
- AWS IoT (register-ca-certificate): a verification certificate whose subject CN is the account's
  registration code, signed by the CA key.
"""

from __future__ import annotations

import base64
import datetime as dt
import re

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from hal.keys.file import generate
from provisioning import authority
from provisioning.station.ca import Station
from provisioning.station.errors import StationError

_CODE = re.compile(r"[0-9A-Za-z+/=_.\-]{1,256}")


def check_code(code: str, what: str = "--code", max_length: int = 256) -> str:
    """The verification or registration code as given, or StationError naming what is wrong."""
    if not _CODE.fullmatch(code) or len(code) > max_length:
        raise StationError(f"{what} {code[:80]!r}: expected the code exactly as the cloud shows it (letters, "
                           f"digits and + / = _ . -, 1 to {max_length} characters, no spaces or newline)")
    return code


def c8y_signed_code(station: Station, code: str) -> str:
    """Cumulocity's signed verification code: base64 of the CA key's SHA-256 signature of `code`."""
    data = check_code(code).encode("ascii")
    key = station.issuer.key
    if isinstance(key, ec.EllipticCurvePrivateKey):
        signature = key.sign(data, ec.ECDSA(hashes.SHA256()))
    elif isinstance(key, rsa.RSAPrivateKey):
        signature = key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    else:
        raise StationError(f"the CA key is a {type(key).__name__}; Cumulocity verifies EC and RSA signatures only")
    return base64.b64encode(signature).decode("ascii")


def aws_verification_cert(station: Station, code: str, days: int = 30) -> x509.Certificate:
    """AWS IoT's verification certificate: CN = the registration code, issued by the CA that signs devices.

    Its key is thrown away: AWS checks only who signed the certificate.
    """
    cn = check_code(code, max_length=64)  # X.509 upper bound for a CN (RFC 5280 ub-common-name)
    key = generate("ec-p256")
    return authority.build(authority.name(cn, None), key.public_key(), station.issuer, station.issuer.key,
                           ca=False, lifetime=dt.timedelta(days=days))
