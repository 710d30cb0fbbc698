"""The one rule for where an https URL connects: its host and port, decided once, for every client.

Issue 22, item 1: the OTA host check read a URL with `urllib.parse` while `requests` (urllib3) connected
with its own parser, and the two disagree on an authority such as `https://attacker\\@trusted.example/`:
urllib.parse sees user `attacker\\` at host `trusted.example`; urllib3, like the WHATWG URL standard,
ends the host at the backslash and connects to `attacker`, with the device's bearer token. The same split
exists for other characters: userinfo (`user:pw@`), `%` (an IPv6 zone id `[fe80::1%25eth0]` is
`fe80::1%25eth0` to one and `fe80::1%eth0` to the other), whitespace and control characters (urllib.parse
deletes tab and newline anywhere, requests strips leading spaces), non-ASCII (IDNA maps `。` to `.`),
an empty port, numbers that `inet_aton` reads as IPv4 (`127.1`, `0x7f.1`).

So this module accepts only an authority that every parser reads the same way: a DNS name of ASCII
letters, digits, `-` and `_` in non-empty labels, a dotted-quad IPv4 address or a bracketed IPv6 address
without a zone, and an optional decimal port 1..65535. Everything else is refused with a one-line reason.
Callers connect to the approved `host` and `port`, or to `str(url)`, which is rebuilt from them; the
differential property test (tests/fuzz/test_fuzz_urls.py) holds this rule against
`requests.PreparedRequest` and urllib3's `parse_url` on random authority-confusing strings.
"""

from __future__ import annotations

import ipaddress
import string

from hal.value import Value
from provisioning import ProvisioningError

HTTPS = "https://"
DEFAULT_PORT = 443
_NAME = frozenset(string.ascii_letters + string.digits + "-_.")
_IPV6 = frozenset(string.hexdigits + ":.")
_ENDS = "/?#"  # RFC 3986 3.2: the authority ends at the first of these


class UrlError(ProvisioningError):
    """A URL (or a host[:port]) refused by the rule above; `reason` is the one-line why."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"{url!a}: {reason}")
        self.url = url
        self.reason = reason


class HttpsUrl(Value):
    """An https URL whose authority every parser reads alike.

    `host` is lower case (an IPv6 address without brackets); `port` is the port connected to (443 when
    the URL names none); `rest` is everything after the authority (path, query, fragment) as given.
    """

    host: str
    port: int
    rest: str
    explicit_port: bool = False

    @property
    def netloc(self) -> str:
        """`host[:port]` as written in a URL (brackets around IPv6); the port only when the URL had one,
        so the Host header stays what the server expects."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}" if self.explicit_port else host

    def __str__(self) -> str:
        return f"{HTTPS}{self.netloc}{self.rest}"


def parse_https_url(url: str) -> HttpsUrl:
    """The approved host and port of `url`; UrlError with the reason when the URL is not https, or its
    authority is one that parsers could read differently (see the module docstring)."""
    if not isinstance(url, str):
        raise UrlError(repr(url), f"expected a URL string, got {type(url).__name__}")
    _check_characters(url, url)
    scheme, sep, after = url.partition("://")
    if not sep or scheme.lower() != "https":
        shown = f"{scheme}://" if sep else "no scheme"
        raise UrlError(url, f"only https:// is fetched, got {shown} (the request, and any token with it, would "
                            "travel in clear text)")
    end = min((i for i in (after.find(c) for c in _ENDS) if i >= 0), default=len(after))
    host, port = _authority(after[:end], url)
    return HttpsUrl(host, port or DEFAULT_PORT, after[end:], port is not None)


def parse_host_port(text: str) -> tuple[str, int | None]:
    """(lower-case host, port or None) of a bare `host[:port]` (IPv6 in brackets), by the same rule as
    a URL's authority; UrlError with the reason otherwise."""
    _check_characters(text, text)
    if any(c in text for c in _ENDS):
        raise UrlError(text, "a host[:port] has no path, query or fragment")
    return _authority(text, text)


def _check_characters(text: str, url: str) -> None:
    for ch in text:
        if not "\x21" <= ch <= "\x7e":
            what = "whitespace" if ch.isspace() else "a control character" if ch < "\x20" or "\x7f" <= ch <= "\x9f" \
                else "a non-ASCII character"
            raise UrlError(url, f"{what} (U+{ord(ch):04X}) is not allowed: a URL is printable ASCII (percent-encode "
                                "the path, write a name in its punycode form)")


def _authority(authority: str, url: str) -> tuple[str, int | None]:
    for bad, reason in (
            ("\\", "a backslash in the host part is refused: urllib3 and browsers end the host there, "
                   "urllib.parse does not, so each would connect somewhere else"),
            ("@", "user info (user@ or user:password@) before the host is refused: parsers disagree on where it "
                  "ends, and the host that gets the request must be the one checked"),
            ("%", "percent-encoding in the host part is refused (an IPv6 zone id or an encoded name decodes "
                  "differently in different parsers)")):
        if bad in authority:
            raise UrlError(url, reason)
    if not authority:
        raise UrlError(url, "the URL names no host")
    if authority.startswith("["):
        close = authority.find("]")
        if close < 0:
            raise UrlError(url, "unterminated [ around an IPv6 address")
        host, tail = authority[1:close], authority[close + 1:]
        if not host or not set(host) <= _IPV6:
            raise UrlError(url, f"[{host}] is not an IPv6 address (no zone ids, no IPvFuture)")
        try:
            host = str(ipaddress.IPv6Address(host))
        except ValueError as exc:
            raise UrlError(url, f"[{host}] is not an IPv6 address: {exc}") from None
        if tail and not tail.startswith(":"):
            raise UrlError(url, f"expected :port after the IPv6 address, got {tail!r}")
    else:
        host, colon, port_text = authority.partition(":")
        if ":" in port_text:
            raise UrlError(url, "an IPv6 address must be in brackets, and a host has one port")
        tail = colon + port_text
        if not host:
            raise UrlError(url, "the URL names no host")
        _check_name(host, url)
    return host.lower(), _port(tail[1:], url) if tail else None


def _check_name(host: str, url: str) -> None:
    bad = sorted(set(host) - _NAME)
    if bad:
        raise UrlError(url, f"{bad[0]!r} is not allowed in a host name (letters, digits, '-', '_' and dots)")
    if "" in host.split("."):
        raise UrlError(url, f"host {host!r} has an empty label (a leading, doubled or trailing dot)")
    last = host.rsplit(".", 1)[-1].lower()
    if last.isdigit() or last.startswith("0x"):
        # the resolver (inet_aton) reads 127.1, 2130706433 and 0x7f.1 as IPv4 addresses: only the dotted
        # quad means the same thing to the check and to the connection
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise UrlError(url, f"host {host!r} is numeric but not a dotted-quad IPv4 address") from None


def _port(text: str, url: str) -> int:
    if not text:
        raise UrlError(url, "empty port after ':'")
    if not text.isdigit() or len(text) > 5 or not 1 <= int(text) <= 65535:
        raise UrlError(url, f"port {text!r} is not a number 1..65535")
    return int(text)
