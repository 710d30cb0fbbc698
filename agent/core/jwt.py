"""JWT claim decoding for the device's access token (RFC 7519), without signature checks.

The device holds no key to verify the token with (the platform signs it and checks it on every
HTTP call), so this only reads the claims it needs to schedule a refresh, and rejects what would
make that schedule nonsense. Decoding is strict so CPython and MicroPython agree byte for byte:
the base64url alphabet is checked here because CPython's ``a2b_base64`` silently skips bad
characters and MicroPython's only accepts bytes.
"""

import binascii

from agent.core.errors import TokenError, describe

MAX_TOKEN_CHARS = 8192
MIN_LIFETIME_S = 1
MAX_LIFETIME_S = 365 * 24 * 3600
MAX_TIME_S = 1e12  # NumericDate bound (year ~33658): beyond it a claim is nonsense, not a time


def check_b64url(text, field, start=0):
    """TokenError naming ``field`` unless ``text[start:]`` is unpadded base64url that decodes:
    every character in the alphabet and a length that is not 1 more than a multiple of 4 (with the
    padding added, binascii's lenient decoder then accepts it on both runtimes). ``start`` spares
    the caller a copy of the segment; ``text[:start]`` must be ASCII (base64url already checked)."""
    # The characters are read as the bytes of the text: on MicroPython text[i] interns a
    # one-character string for every distinct character (a token holds about 64 of them), and on a
    # ROMFS board those names overflow the full qstr pool into a new one of 640 entries, 7 KB of
    # heap on 64-bit; non-ASCII text would add a name per character, for good. encode() shares the
    # str's data there (no copy). Every byte before the first one outside the alphabet is ASCII, so
    # its index is the character's, and the slice naming it is a new str, not a name.
    raw = text.encode("utf-8", "surrogatepass")
    for i in range(start, len(raw)):
        b = raw[i]
        if not (97 <= b <= 122 or 65 <= b <= 90 or 48 <= b <= 57 or b == 45 or b == 95):
            raise TokenError(field, "character %s is not base64url" % describe(text[i:i + 1]))
    if (len(text) - start) % 4 == 1:
        raise TokenError(field, "base64url length %d is impossible" % (len(text) - start))


def b64url_decode(text, field):
    """Decode unpadded base64url ``text`` (str) to bytes; TokenError naming ``field`` if malformed."""
    check_b64url(text, field)
    padded = text.replace("-", "+").replace("_", "/") + "=" * (-len(text) % 4)
    try:
        return binascii.a2b_base64(padded.encode())
    except ValueError as exc:
        # ValueError on both runtimes: CPython's binascii.Error subclasses it, and MicroPython has
        # no binascii.Error at all (naming it here turned any exception into an AttributeError).
        raise TokenError(field, "not base64url (%s)" % exc) from None


def _json_object(raw, field):
    import json  # with the first token: CPython's json compiles regular expressions on import (issue 24)

    try:
        value = json.loads(raw.decode())
    except (ValueError, UnicodeError):  # JSONDecodeError is a ValueError on CPython
        raise TokenError(field, "not UTF-8 JSON") from None
    if not isinstance(value, dict):
        raise TokenError(field, "expected a JSON object, got %s" % describe(value))
    return value


def _finite_number(claims, name, required):
    field = "claims." + name
    if name not in claims:
        if required:
            raise TokenError(field, "missing")
        return None
    value = claims[name]
    # bool is an int on CPython but not on MicroPython; reject it on both.
    if value is True or value is False or not isinstance(value, (int, float)):
        raise TokenError(field, "expected a number, got %s" % describe(value))
    if value - value != 0:  # inf and nan; json.loads accepts 1e400 on both runtimes
        raise TokenError(field, "expected a finite number, got %s" % describe(value))
    if not -MAX_TIME_S < value < MAX_TIME_S:  # a huge int minus a float overflows (OverflowError)
        raise TokenError(field, "%s is not a time in seconds" % describe(value))
    return value


def decode_claims(token, max_chars=MAX_TOKEN_CHARS):
    """Return the claims of compact JWS ``token`` (str) as a dict, without verifying the signature.

    Guarantees on return: ``claims["exp"]`` is a finite number; ``claims.get("iat")`` is absent
    or a finite number below ``exp``, with ``exp - iat`` between 1 s and 365 days.
    Raises TokenError naming the segment or claim and the reason for anything else.
    """
    if not isinstance(token, str):
        raise TokenError("token", "expected text, got %s" % type(token).__name__)
    if len(token) > max_chars:
        raise TokenError("token", "%d characters is over the %d limit" % (len(token), max_chars))
    if not token:
        raise TokenError("token", "empty")
    dots = token.count(".")
    if dots != 2:
        raise TokenError("token", "expected 3 dot-separated segments, got %d" % (dots + 1))
    # Segments by position, not token.split("."): on a board a token answer's copies are the peak
    # of the heap, and the signature (the largest segment, 342 characters for RS256) is checked in
    # place and never decoded (nothing here verifies it).
    first = token.find(".")
    second = token.find(".", first + 1)
    if not first:
        raise TokenError("token.header", "empty")
    if second == first + 1:
        raise TokenError("token.payload", "empty")
    _json_object(b64url_decode(token[:first], "token.header"), "token.header")
    claims = _json_object(b64url_decode(token[first + 1:second], "token.payload"), "token.payload")
    check_b64url(token, "token.signature", second + 1)
    exp = _finite_number(claims, "exp", True)
    iat = _finite_number(claims, "iat", False)
    if iat is not None:
        lifetime = exp - iat
        if lifetime <= 0:
            raise TokenError("claims.exp", "%s is not after iat %s" % (describe(exp), describe(iat)))
        check_lifetime(lifetime, "claims.exp")
    return claims


def check_lifetime(lifetime, field):
    """Raise TokenError naming ``field`` unless ``lifetime`` seconds is within 1 s .. 365 days."""
    if lifetime < MIN_LIFETIME_S or lifetime > MAX_LIFETIME_S:
        raise TokenError(
            field,
            "lifetime %s s is outside %d s .. %d s" % (describe(lifetime), MIN_LIFETIME_S, MAX_LIFETIME_S),
        )
