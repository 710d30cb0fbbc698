"""Issue 22, item 1: one parser decided where a URL goes, another connected.

`https://attacker\\@trusted.example/` passed the OTA host check (urllib.parse sees host `trusted.example`)
while requests/urllib3 connected to `attacker` with the device's bearer token. Here the decoy is a real TLS
server on `localhost` (its certificate is valid, so TLS alone would not stop the leak) and the device
trusts only `127.0.0.1`; every URL and redirect hop names the decoy in the place one parser reads as the
host and the other does not. The decoy must never see a request, let alone the Authorization header.
The same for the EST client (HTTP Basic with the device's one-time password) and the config's URLs.
The rule itself is provisioning/weburl.py; tests/fuzz/test_fuzz_urls.py holds it against requests.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from agent import config as configmod
from agent.errors import ConfigError
from provisioning import EnrollmentError
from provisioning.est.client import BasicAuth, EstClient
from provisioning.weburl import UrlError, parse_host_port, parse_https_url
from tests.conftest import write_config
from tests.ota.conftest import Device, Releases
from tests.pki import Pki
from tests.security.test_artifact_hosts import Recorder, directory_slots, servers, update

__all__ = ["servers"]  # the fixture, imported for the tests below

BACKSLASH = "a backslash in the host part is refused"
USERINFO = "user info (user@ or user:password@) before the host is refused"


def port(recorder: Recorder) -> int:
    return int(recorder.httpd.server_address[1])


@directory_slots
def test_a_backslash_before_the_trusted_host_does_not_send_the_token_to_the_host_before_it(
        device: Device, releases: Releases, servers: Callable[..., Recorder]) -> None:
    releases.publish("1.1.0")
    decoy = servers("localhost")
    trusted = servers("127.0.0.1")
    url = f"https://localhost:{port(decoy)}\\@127.0.0.1:{port(trusted)}/app/1.1.0/"
    failure = update(device, url)
    assert BACKSLASH in failure, failure
    assert decoy.requests == [], f"the decoy got {decoy.tokens()}"
    assert trusted.requests == []


@directory_slots
def test_a_redirect_hop_with_a_backslash_authority_does_not_carry_the_token(
        device: Device, releases: Releases, servers: Callable[..., Recorder]) -> None:
    releases.publish("1.1.0")
    decoy = servers("localhost")
    trusted = servers("127.0.0.1")
    trusted.redirect_to = f"https://localhost:{port(decoy)}\\@127.0.0.1:{port(trusted)}"
    failure = update(device, trusted.url("app/1.1.0/"))
    assert BACKSLASH in failure, failure
    assert decoy.requests == [], f"the decoy got {decoy.tokens()}"
    assert str(trusted.tokens()[0]).startswith("Bearer ey")  # the first hop was trusted, and only it


@directory_slots
@pytest.mark.parametrize(("authority", "reason"), [
    ("localhost:{decoy}@127.0.0.1:{trusted}", USERINFO),
    ("127.0.0.1:{trusted} ", "whitespace (U+0020) is not allowed"),  # a tab the SmartREST parser refuses first
    ("[::ffff:127.0.0.1%25lo]:{trusted}", "percent-encoding in the host part is refused"),
    ("127.0.0.1:", "empty port after ':'"),
    ("127.1:{trusted}", "host '127.1' is numeric but not a dotted-quad IPv4 address"),
])
def test_an_authority_that_parsers_read_differently_is_refused_before_any_request(
        device: Device, releases: Releases, servers: Callable[..., Recorder], authority: str, reason: str) -> None:
    releases.publish("1.1.0")
    decoy = servers("localhost")
    trusted = servers("127.0.0.1")
    failure = update(device, "https://" + authority.format(decoy=port(decoy), trusted=port(trusted)) + "/app/1.1.0/")
    assert reason in failure and "artifact URL" in failure, failure
    assert decoy.requests == [] and trusted.requests == []


def test_the_est_client_never_sends_the_one_time_password_past_a_backslash(
        pki: Pki, servers: Callable[..., Recorder]) -> None:
    decoy = servers("localhost")
    url = f"https://localhost:{port(decoy)}\\@127.0.0.1:{port(decoy) ^ 1}"
    with pytest.raises(EnrollmentError) as refused:
        EstClient(url, str(pki.ca_chain_file), auth=BasicAuth("dev-1", "otp-secret")).cacerts()
    assert BACKSLASH in str(refused.value) and refused.value.retryable is False
    assert decoy.requests == []


@pytest.mark.parametrize(("section", "url", "reason"), [
    ("est", "https://localhost:1\\@station.example:8443", BACKSLASH),
    ("discovery", "https://dev-1:secret@discovery.example:8443", USERINFO),
    ("discovery", "https://[fe80::1%25eth0]:8443", "percent-encoding in the host part"),
    ("est", "https://station\u3002example", "a non-ASCII character (U+3002) is not allowed"),
])
def test_config_urls_follow_the_same_rule_and_name_the_key(tmp_path: Path, section: str, url: str,
                                                           reason: str) -> None:
    with pytest.raises(ConfigError) as refused:
        configmod.load(write_config(tmp_path, **{section: {"url": url}}))
    assert f"[{section}] url: " in str(refused.value) and reason in str(refused.value), refused.value
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(("url", "reason"), [
    ("https://attacker\\@trusted.example/", BACKSLASH),
    ("https://trusted.example\\attacker/", BACKSLASH),
    ("https://attacker@trusted.example/", USERINFO),
    ("https://a:b@trusted.example/", USERINFO),
    ("https://trusted%2eexample/", "percent-encoding in the host part"),
    ("https://[fe80::1%25eth0]/", "percent-encoding in the host part"),
    ("https://[fe80::1%eth0]/", "percent-encoding in the host part"),
    ("https://trusted.example:/x", "empty port after ':'"),
    ("https://trusted.example:+443/x", "port '+443' is not a number 1..65535"),
    ("https://trusted.example:0/x", "port '0' is not a number 1..65535"),
    ("https://trusted.example:65536/x", "port '65536' is not a number 1..65535"),
    ("https://trus ted.example/", "whitespace (U+0020)"),
    (" https://trusted.example/", "whitespace (U+0020)"),
    ("https://trusted.example\x1b/", "a control character (U+001B)"),
    ("https://trusted.example\n/", "whitespace (U+000A)"),
    ("https://tru\tsted.example/", "whitespace (U+0009)"),
    ("https://trusted.example/\x7f", "a control character (U+007F)"),
    ("https://trusted\u3002example/", "a non-ASCII character (U+3002)"),
    ("https://trusted\uff0eexample/", "a non-ASCII character (U+FF0E)"),
    ("https://trusted.example/\u202e", "a non-ASCII character (U+202E)"),
    ("https://[::1/", "unterminated [ around an IPv6 address"),
    ("https://[v1.x]/", "is not an IPv6 address"),
    ("https://[::1]x/", "expected :port after the IPv6 address"),
    ("https://::1/", "an IPv6 address must be in brackets"),
    ("https://trusted..example/", "has an empty label"),
    ("https://.trusted.example/", "has an empty label"),
    ("https://trusted.example./", "has an empty label"),
    ("https://*.trusted.example/", "'*' is not allowed in a host name"),
    ("https://2130706433/", "numeric but not a dotted-quad"),
    ("https://0x7f.1/", "numeric but not a dotted-quad"),
    ("https://127.000.000.001/", "numeric but not a dotted-quad"),
    ("https:///trusted.example/", "the URL names no host"),
    ("https://", "the URL names no host"),
    ("http://trusted.example/", "only https:// is fetched, got http://"),
    ("HTTP://trusted.example/", "only https:// is fetched, got HTTP://"),
    ("https:/\\trusted.example/", "only https:// is fetched, got no scheme"),
    ("//trusted.example/", "only https:// is fetched, got no scheme"),
    ("trusted.example", "only https:// is fetched, got no scheme"),
])
def test_the_rule_refuses_every_authority_that_parsers_read_differently_with_one_line(url: str, reason: str) -> None:
    with pytest.raises(UrlError) as refused:
        parse_https_url(url)
    assert reason in refused.value.reason, refused.value.reason
    assert "\n" not in str(refused.value) and "\x1b" not in str(refused.value)


@pytest.mark.parametrize(("url", "host", "port", "rebuilt"), [
    ("https://Trusted.Example/app/1.1.0/", "trusted.example", 443, "https://trusted.example/app/1.1.0/"),
    ("https://trusted.example:8443", "trusted.example", 8443, "https://trusted.example:8443"),
    ("HTTPS://a-b_c.example:0443/x?y=@z#\\w", "a-b_c.example", 443, "https://a-b_c.example:443/x?y=@z#\\w"),
    ("https://trusted.example#@attacker/", "trusted.example", 443, "https://trusted.example#@attacker/"),
    ("https://trusted.example?@attacker/", "trusted.example", 443, "https://trusted.example?@attacker/"),
    ("https://trusted.example/\\@attacker/", "trusted.example", 443, "https://trusted.example/\\@attacker/"),
    ("https://10.0.0.5:9443/x", "10.0.0.5", 9443, "https://10.0.0.5:9443/x"),
    ("https://[FD00:0::5]:9443/x", "fd00::5", 9443, "https://[fd00::5]:9443/x"),
])
def test_the_rule_approves_plain_urls_and_rebuilds_them_from_what_it_approved(url: str, host: str, port: int,
                                                                              rebuilt: str) -> None:
    approved = parse_https_url(url)
    assert (approved.host, approved.port, str(approved)) == (host, port, rebuilt)


@pytest.mark.parametrize(("text", "expected"), [
    ("cdn.example.net", ("cdn.example.net", None)), ("CDN.example.net:8443", ("cdn.example.net", 8443)),
    ("[FD00::5]", ("fd00::5", None)), ("10.0.0.5:443", ("10.0.0.5", 443)),
])
def test_host_entries_are_read_by_the_same_rule(text: str, expected: tuple[str, int | None]) -> None:
    assert parse_host_port(text) == expected


@pytest.mark.parametrize("text", ["evil\\@cdn.example.net", "user@cdn.example.net", "cdn.example.net/x",
                                  "[fe80::1%eth0]", "cdn.example.net:", "cdn .example.net"])
def test_host_entries_refuse_what_a_url_authority_refuses(text: str) -> None:
    with pytest.raises(UrlError):
        parse_host_port(text)


@directory_slots
def test_a_redirect_location_that_is_not_utf8_is_a_download_error_not_an_internal_one(
        device: Device, releases: Releases, servers: Callable[..., Recorder]) -> None:
    releases.publish("1.1.0")
    trusted = servers("127.0.0.1", redirect_to="https://127.0.0.1:1/\x9b31m")  # byte 0x9b on the wire
    failure = update(device, trusted.url("app/1.1.0/"))
    assert "the server's redirect Location is not UTF-8" in failure and "internal error" not in failure, failure


@pytest.mark.parametrize("hop", ["https://localhost:{decoy}\\@127.0.0.1:{trusted}", "https://localhost:{decoy}"])
def test_the_est_client_does_not_follow_a_redirect_to_another_origin_with_the_password(
        pki: Pki, servers: Callable[..., Recorder], hop: str) -> None:
    decoy = servers("localhost")
    station = servers("127.0.0.1")
    station.redirect_to = hop.format(decoy=port(decoy), trusted=port(station))
    with pytest.raises(EnrollmentError) as refused:
        EstClient(station.url(), str(pki.ca_chain_file), auth=BasicAuth("dev-1", "otp-secret")).cacerts()
    assert "redirect" in str(refused.value) and refused.value.retryable is False, refused.value
    assert [path for path, _ in station.requests] == ["/.well-known/est/cacerts"]
    assert decoy.requests == [], f"the decoy got {decoy.tokens()}"


def test_the_est_client_follows_redirects_within_its_origin_a_bounded_number_of_times(
        pki: Pki, servers: Callable[..., Recorder]) -> None:
    station = servers("127.0.0.1")
    station.redirect_to = station.url("moved")  # every path redirects again, on the same host and port
    with pytest.raises(EnrollmentError, match="more than 5 redirects"):
        EstClient(station.url(), str(pki.ca_chain_file), auth=BasicAuth("dev-1", "otp-secret")).cacerts()
    assert len(station.requests) == 6 and all(auth and auth.startswith("Basic ") for auth in station.tokens())
