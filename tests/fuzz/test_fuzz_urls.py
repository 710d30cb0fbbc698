"""Differential test of the one URL rule (provisioning/weburl.py, issue 22 item 1) against the library
that connects: every random URL is either refused by our rule, or gets the same (host, port) from it as
from `requests`, read the way requests itself reads it.

requests prepares a URL with urllib3's `parse_url` (`PreparedRequest.prepare_url`: lstrip, parse_url,
IDNA for a non-ASCII host, then rebuilt and re-quoted), and its adapter then picks the connection pool
from the prepared URL with `urllib.parse.urlparse` (`build_connection_pool_key_attributes`). The oracle
runs that very code, on the string as received and on the URL rebuilt from what our rule approved (what
agent/ota/download.py actually hands to requests), and urllib3's `parse_url` on the raw string too. A URL
either of them cannot parse while ours accepts it counts as a disagreement.

Inputs are built from pieces that confuse authority parsers: `\\`, `@`, `:`, `#`, `?`, `/`, `%xx`,
unicode dots, whitespace and control characters, brackets, zone ids, numeric hosts, around two names
(`trusted.example`, `attacker`). Settings are tests/fuzz/inputs.FUZZ (derandomized in CI).
"""

from __future__ import annotations

import ipaddress

import requests
from hypothesis import example, given
from hypothesis import strategies as st
from requests.adapters import HTTPAdapter
from urllib3.util import parse_url

from provisioning.weburl import UrlError, parse_https_url
from tests.fuzz.inputs import FUZZ, tried

ADAPTER = HTTPAdapter()

PIECES = st.sampled_from([
    "trusted.example", "attacker", "attacker.example", "TRUSTED.Example", "127.0.0.1", "127.1", "0x7f.1",
    "2130706433", "[::1]", "[fd00::5]", "[FD00:0::5]", "[::ffff:127.0.0.1]", "[fe80::1%25eth0]", "[fe80::1%eth0]",
    "[v1.x]", "\\", "@", ":", "::", "#", "?", "/", "//", ".", "..", "%2e", "%40", "%5c", "%2f", "%00", "%",
    "\u3002", "\uff0e", "\uff61", " ", "\t", "\n", "\r", "\x00", "\x1b", "\x7f", "\u202e", "\u200b", "[", "]",
    ":443", ":8443", ":0", ":65536", ":", ":+1", ":0443", "user", "user:pw", "_", "-", "xn--bcher-kva", "b\u00fccher",
    "https://", "HTTPS://", "http://", "https:", "https:/", "https:\\\\", ";", "=", "&",
])
HOSTS = st.sampled_from(["trusted.example", "attacker", "TRUSTED.Example", "a-b_c.example", "127.0.0.1", "10.0.0.5",
                         "[::1]", "[fd00::5]", "[FD00:0::5]", "[::ffff:127.0.0.1]", "xn--bcher-kva.example"])
# anything at all after `https://`, and (so that about half the inputs are accepted and compared) a plain
# host and port followed by the confusing pieces where a path, query or fragment starts
URLS = st.one_of(
    st.builds(lambda head, parts: head + "".join(parts),
              st.sampled_from(["https://", "HTTPS://", "https:", "https:/", "https:\\", " https://", "", "//"]),
              st.lists(PIECES, max_size=10)),
    st.builds(lambda host, port, end, parts: "https://" + host + port + end + "".join(parts),
              HOSTS, st.sampled_from(["", ":443", ":8443", ":1", ":0443"]), st.sampled_from(["/", "?", "#", ""]),
              st.lists(PIECES.filter(lambda p: p.isascii() and p.isprintable() and " " not in p), max_size=8)),
)


def host_key(host: str | None) -> str | None:
    """Hosts compared as addresses where they are addresses: `[FD00:0::5]` and `fd00::5` are one host."""
    if host is None:
        return None
    host = host.lower().removeprefix("[").removesuffix("]")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def requests_target(url: str) -> tuple[str | None, int]:
    """(host, port) that requests would connect to for `url`: its own preparation, then its adapter's pool key."""
    prepared = requests.Request("GET", url).prepare()
    params, _ = ADAPTER.build_connection_pool_key_attributes(prepared, True, None)
    return host_key(params["host"]), params["port"] or 443


@FUZZ
@given(URLS)
@example("https://attacker\\@trusted.example/")  # the case of issue 22
@example("https://attacker:1\\@trusted.example:2/")
@example("https://trusted.example#@attacker/")
@example("https://[fe80::1%25eth0]/")
@example("https://trusted\u3002example/")
def test_our_rule_and_requests_agree_on_the_host_or_the_url_is_refused(url: str) -> None:
    tried("url authority (weburl vs requests)")
    try:
        approved = parse_https_url(url)
    except UrlError as exc:
        assert exc.reason and "\n" not in str(exc)
        return
    ours = (host_key(approved.host), approved.port)
    assert requests_target(url) == ours, f"requests connects elsewhere for {url!r}"
    assert requests_target(str(approved)) == ours, f"requests connects elsewhere for the rebuilt {approved}"
    raw = parse_url(url)
    assert (host_key(raw.host), raw.port or 443) == ours, f"urllib3.parse_url reads {url!r} as {raw}"
