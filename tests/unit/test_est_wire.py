"""The EST client's pure pieces: Retry-After values, URLs with RFC 7030 labels, the PKCS#7 reader's
errors, the retry decision, and the `[est]` configuration checks."""

from __future__ import annotations

import email.utils
import logging
from pathlib import Path

import pytest

from agent.boot import retry_delay
from agent.config import Config, ConfigError, load
from provisioning import EnrollmentError, PemError
from provisioning.est.client import est_base, parse_retry_after
from provisioning.est.pkcs7 import SIGNED_DATA_OID, certificate_blobs

NOW = 1_800_000_000.0


@pytest.mark.parametrize("value,seconds", [
    ("600", 600.0), (" 5 ", 5.0), ("0", 0.0),
    (email.utils.formatdate(NOW + 90, usegmt=True), 90.0),      # IMF-fixdate
    (email.utils.formatdate(NOW - 90, usegmt=True), 0.0),       # a date already past: now
    (email.utils.formatdate(NOW + 30), 30.0),                   # "-0000" zone: GMT all the same
    (None, None), ("", None), ("soon", None), ("-5", None), ("1e3", None), ("5.5", None), ("٣", None),
])
def test_retry_after_is_delta_seconds_or_an_http_date(value: str | None, seconds: float | None) -> None:
    got = parse_retry_after(value, now=NOW)
    assert got == (None if seconds is None else pytest.approx(seconds, abs=1.0))


@pytest.mark.parametrize("url,label,base", [
    ("https://st:8443", "", "https://st:8443/.well-known/est"),
    ("https://st:8443/", "fleet-a", "https://st:8443/.well-known/est/fleet-a"),
    ("https://st:8443/.well-known/est", "", "https://st:8443/.well-known/est"),
    ("https://st:8443/.well-known/est/fleet-a/", "", "https://st:8443/.well-known/est/fleet-a"),
    ("https://st:8443/.well-known/est/fleet-a", "fleet-a", "https://st:8443/.well-known/est/fleet-a"),
    ("https://proxy/tenant", "a.b~c_d", "https://proxy/tenant/.well-known/est/a.b~c_d"),
])
def test_est_base_reaches_the_labelled_ca(url: str, label: str, base: str) -> None:
    assert est_base(url, label) == base


@pytest.mark.parametrize("url,label,message", [
    ("http://st", "", "only https:// is fetched"),
    ("https://evil\\@st/", "", "a backslash in the host part is refused"),
    ("https://dev-1:otp@st/", "", "user info (user@ or user:password@) before the host is refused"),
    ("https://st", "a/b", "EST label 'a/b' must be one path segment"),
    ("https://st", "a b", "EST label 'a b' must be one path segment"),
    ("https://st/.well-known/est/a/b", "", "'a/b' after /.well-known/est must be one label segment"),
    ("https://st/.well-known/est/a", "b", "names label 'a' but the label 'b' is configured too"),
    ("https://st/?x=1", "", "must not carry a query or fragment"),
])
def test_est_base_refuses_bad_urls_and_labels(url: str, label: str, message: str) -> None:
    with pytest.raises(EnrollmentError) as info:
        est_base(url, label)
    assert message in str(info.value) and info.value.retryable is False


# -- PKCS#7 reader errors -----------------------------------------------------------------------------------

def tlv(tag: int, body: bytes) -> bytes:
    assert len(body) < 0x10000
    length = bytes([len(body)]) if len(body) < 0x80 else b"\x82" + len(body).to_bytes(2, "big")
    return bytes([tag]) + length + body


def signed_data(*fields: bytes, oid: bytes = SIGNED_DATA_OID) -> bytes:
    return tlv(0x30, tlv(0x06, oid) + tlv(0xA0, tlv(0x30, b"".join(fields))))


VERSION, DIGESTS, ENCAP = tlv(0x02, b"\x01"), tlv(0x31, b""), tlv(0x30, tlv(0x06, bytes.fromhex("2a864886f70d010701")))


def test_certs_only_without_certificates_is_empty() -> None:
    assert certificate_blobs(signed_data(VERSION, DIGESTS, ENCAP, tlv(0x31, b""))) == []


def test_certificates_are_returned_in_the_order_sent() -> None:
    one, two = tlv(0x30, b"\x05\x00"), tlv(0x30, b"\x02\x01\x07")
    assert certificate_blobs(signed_data(VERSION, DIGESTS, ENCAP, tlv(0xA0, two + one), tlv(0x31, b""))) == [two, one]


@pytest.mark.parametrize("data,message", [
    (b"\x30", "truncated"),
    (b"\x30\x05\x02\x01", "claims 5 bytes"),
    (b"\x30\x85\x00\x00\x00\x00\x01\x00", "bad length"),
    (b"\x1f\x01\x00", "multi-byte tag"),
    (b"\x04\x80\x00\x00", "indefinite length on a primitive element"),
    (b"\x30\x80\x02\x01\x01", "has no end-of-contents"),
    (b"\x30\x80" * 40 + b"\x00\x00" * 40, "nested more than 32 levels"),
    (signed_data(VERSION, DIGESTS, ENCAP) + b"\x00", "1 bytes after the ContentInfo"),
    (tlv(0x31, b""), "expected tag 0x30"),
    (tlv(0x30, tlv(0x02, b"\x01")), "expected contentType and content"),
    (signed_data(VERSION, DIGESTS, ENCAP, oid=bytes.fromhex("2a864886f70d010701")), "contentType is not signedData"),
    (signed_data(VERSION, ENCAP), "expected version, digestAlgorithms and encapContentInfo"),
    (signed_data(VERSION, DIGESTS, ENCAP, tlv(0xA0, tlv(0xA1, b""))), "certificate 1 is not an X.509 certificate"),
    (tlv(0x30, tlv(0x06, SIGNED_DATA_OID) + tlv(0xA0, b"")), "expected one SignedData, got 0"),
])
def test_malformed_pkcs7_is_refused_naming_the_field(data: bytes, message: str) -> None:
    with pytest.raises(PemError) as info:
        certificate_blobs(data, "answer")
    assert message in str(info.value) and str(info.value).startswith("answer")


# -- the retry decision ------------------------------------------------------------------------------------

@pytest.fixture
def config(tmp_path: Path) -> Config:
    path = tmp_path / "t.toml"
    path.write_text('[device]\nid = "dev-1"\n[est]\nretry_after_max = 60\n')
    return load(path)


def test_retry_delay_honours_retry_after_and_caps_it(config: Config, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    assert retry_delay(EnrollmentError("pending", retryable=True, status=202, retry_after=30), config, 1.0) == 30
    assert retry_delay(EnrollmentError("busy", retryable=True, status=503, retry_after=600), config, 1.0) == 60
    assert "station asked to retry after 600 s (capped at 60 s)" in caplog.text


def test_retry_delay_never_goes_below_the_backoff(config: Config) -> None:
    # a station answering "Retry-After: 0" must not make a device hammer it
    assert retry_delay(EnrollmentError("busy", retryable=True, status=503, retry_after=0), config, 4.0) == 4.0
    assert retry_delay(EnrollmentError("reset", retryable=True), config, 2.5) == 2.5


def test_retry_delay_is_none_for_a_refusal(config: Config) -> None:
    assert retry_delay(EnrollmentError("OTP spent", retryable=False, status=403), config, 1.0) is None
    assert retry_delay(ConfigError("other errors keep the backoff"), config, 1.5) == 1.5


def test_an_attested_device_asks_again_after_a_refusal_at_the_longest_wait(tmp_path: Path) -> None:
    # nothing on the device can change (no password file to replace): the operator fixes it at the station
    path = tmp_path / "t.toml"
    path.write_text('[device]\nid = "dev-1"\n[est]\nretry_after_max = 60\n[enroll]\nmethod = "tpm-attestation"\n')
    refusal = EnrollmentError("EK not on the allow-list", retryable=False, status=403)
    assert retry_delay(refusal, load(path), 1.0) == 60


# -- [est] configuration -----------------------------------------------------------------------------------

@pytest.mark.parametrize("body,message", [
    ("retry_after_max = 0", "[est] retry_after_max must be > 0 seconds, got 0.0"),
    ("retry_after_max = -5.0", "[est] retry_after_max must be > 0 seconds"),
    ('label = "a/b"', "[est] label: 'a/b' must be one URL path segment"),
    ('label = "fleet a"', "[est] label: 'fleet a' must be one URL path segment"),
])
def test_bad_est_keys_are_refused_naming_the_key(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "t.toml"
    path.write_text(f'[device]\nid = "dev-1"\n[est]\n{body}\n')
    with pytest.raises(ConfigError) as info:
        load(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_est_defaults(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text('[device]\nid = "dev-1"\n[est]\nlabel = "fleet-a"\n')
    est = load(path).est
    assert est.label == "fleet-a" and est.retry_after_max == 600.0
