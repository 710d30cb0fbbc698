"""One-time passwords for first enrollment: generated here, stored only as a hash in the ledger.

An OTP carries 128 random bits, so a plain SHA-256 is the right hash: a slow KDF (scrypt, PBKDF2)
protects low-entropy human passwords against guessing, which is impossible here, and would cost
the station its enrollment rate. The device id is part of the hashed input, so an OTP works only
for the device it was made for.
"""

from __future__ import annotations

import base64
import hashlib
import secrets

OTP_BYTES = 16
DEFAULT_TTL = 24 * 3600
MAX_OTP_LENGTH = 128  # longer "passwords" are refused before hashing


def new_otp() -> str:
    """A fresh one-time password: 26 lowercase base32 characters (no padding, no ':')."""
    return base64.b32encode(secrets.token_bytes(OTP_BYTES)).decode().rstrip("=").lower()


def otp_hash(device_id: str, otp: str) -> str:
    """The hex digest stored in (and looked up from) the ledger for `otp` issued to `device_id`."""
    material = b"tether-otp-v1\0" + device_id.encode() + b"\0" + otp.strip().encode()
    return hashlib.sha256(material).hexdigest()
