"""Release version comparison: dotted numbers with an optional pre-release suffix.

Shape: ``1``, ``1.4``, ``1.4.0``, ``2.0.0-rc.1`` (at most 8 numeric parts). Ordering follows
Semantic Versioning 2.0.0 section 11 for the parts we allow: numeric parts compare as numbers and
missing ones count as 0 (``1.4`` == ``1.4.0``); a version with a pre-release sorts before the same
version without one; pre-release identifiers compare numerically when both are digits, otherwise as
text, and a numeric identifier sorts before a textual one. Pure and MicroPython-compatible.
"""

from agent.core.errors import CoreError

MAX_PARTS = 8
MAX_CHARS = 64


class VersionError(CoreError):
    """A version string that is not dotted numbers with an optional ``-suffix``."""


def _is_digits(text):
    if not text:
        return False
    for ch in text:
        if ch < "0" or ch > "9":
            return False
    return True


def _is_ident(text):
    if not text:
        return False
    for ch in text:
        if not (("0" <= ch <= "9") or ("a" <= ch <= "z") or ("A" <= ch <= "Z")):
            return False
    return True


def parse_version(text, field="version"):
    """Return ``(numbers, pre)``: a tuple of ints (trailing zeros dropped) and a tuple of identifiers.

    Raises VersionError naming ``field`` for anything else.
    """
    if not isinstance(text, str):
        raise VersionError(field, "expected text, got %s" % type(text).__name__)
    if not text or len(text) > MAX_CHARS:
        raise VersionError(field, "expected 1..%d characters, got %d" % (MAX_CHARS, len(text)))
    dash = text.find("-")
    core = text if dash < 0 else text[:dash]
    suffix = "" if dash < 0 else text[dash + 1:]
    parts = core.split(".")
    if len(parts) > MAX_PARTS:
        raise VersionError(field, "%d numeric parts, at most %d" % (len(parts), MAX_PARTS))
    numbers = []
    for part in parts:
        if not _is_digits(part):
            raise VersionError(field, "%r is not dotted numbers with an optional -suffix" % text)
        numbers.append(int(part))
    while len(numbers) > 1 and numbers[-1] == 0:
        numbers.pop()
    pre = ()  # type: tuple[str, ...]
    if dash >= 0:
        idents = suffix.split(".")
        for ident in idents:
            if not _is_ident(ident):
                raise VersionError(field, "pre-release %r: use letters and digits, separated by dots" % suffix)
        pre = tuple(idents)
    return (tuple(numbers), pre)


def _cmp(a, b):
    return (a > b) - (a < b)


def _cmp_pre(a, b):
    if not a or not b:
        # No pre-release ranks above any pre-release of the same numbers.
        return _cmp(not a, not b)
    for i in range(min(len(a), len(b))):  # zip(strict=) does not exist on MicroPython
        x, y = a[i], b[i]
        xd, yd = _is_digits(x), _is_digits(y)
        if xd and yd:
            c = _cmp(int(x), int(y))
        elif xd != yd:
            c = -1 if xd else 1
        else:
            c = _cmp(x, y)
        if c:
            return c
    return _cmp(len(a), len(b))


def compare_versions(a, b):
    """-1, 0 or 1 as version ``a`` is lower than, equal to or higher than ``b``; VersionError if malformed."""
    na, pa = parse_version(a, "version a")
    nb, pb = parse_version(b, "version b")
    width = max(len(na), len(nb))
    na = na + (0,) * (width - len(na))
    nb = nb + (0,) * (width - len(nb))
    return _cmp(na, nb) or _cmp_pre(pa, pb)
