"""Issue 12: the station as an RFC 7030 server for clients that are not ours, driven with plain tools:
`openssl req` makes CN-only CSRs, `curl` posts them (chunked), `openssl pkcs7`/`verify`/`x509` read
the answers. The commands are the ones docs/station.md shows in "Using another EST client"."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.pki import TRUST_DOMAIN
from tests.station.conftest import RunningStation, start_station, station_cli

EST = "/.well-known/est"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: install the Debian package {name}", pytrace=False)
    return path


def run(*argv: str, cwd: Path) -> str:
    out = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=60, check=False)
    assert out.returncode == 0, f"{' '.join(argv)} exited {out.returncode}:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def curl(station: RunningStation, cwd: Path, path: str, *args: str, out: str = "answer") -> int:
    """curl against the station; the body goes to cwd/out, the HTTP status is returned."""
    code = run(tool("curl"), "--silent", "--show-error", "--cacert", str(station.ca_file), "--output", out,
               "--write-out", "%{http_code}", *args, f"{station.url}{EST}/{path}", cwd=cwd)
    return int(code)


def cn_only_csr(cwd: Path, device_id: str, key: str = "device.key", *extra: str, one_line: bool = False) -> None:
    """openssl req: a new P-256 key (unless `key` exists) and a CSR with only CN=<id>, base64 DER in csr.b64
    (in 64-character lines, or on one line with `one_line`, as RFC 8951 clients send it)."""
    keyopts = ["-key", key] if (cwd / key).exists() else ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                                                           "-nodes", "-keyout", key]
    run(tool("openssl"), "req", "-new", *keyopts, "-subj", f"/CN={device_id}", *extra, "-outform", "DER",
        "-out", "csr.der", cwd=cwd)
    run(tool("openssl"), "base64", *(["-A"] if one_line else []), "-in", "csr.der", "-out", "csr.b64", cwd=cwd)


def certs_in(cwd: Path, answer: str, pem: str) -> int:
    """openssl: base64 PKCS#7 answer -> PEM certificates in `pem`; returns how many.

    `openssl base64 -d -A` reads the base64 as one line, the way decoders that do not skip whitespace
    do (issue 26): it turns a body wrapped in lines into nothing, and `pkcs7` then fails. RFC 7030's
    erratum 5904 and RFC 8951 say EST bodies carry no line breaks."""
    run(tool("openssl"), "base64", "-d", "-A", "-in", answer, "-out", answer + ".der", cwd=cwd)
    run(tool("openssl"), "pkcs7", "-inform", "DER", "-in", answer + ".der", "-print_certs", "-out", pem, cwd=cwd)
    return (cwd / pem).read_text().count("-----BEGIN CERTIFICATE-----")


CHUNKED = ("-H", "Content-Type: application/pkcs10", "-H", "Transfer-Encoding: chunked", "--data-binary", "@csr.b64")


def test_curl_and_openssl_enroll_a_cn_only_csr_chunked_and_reenroll_with_the_leaf_alone(
        tmp_path: Path, station: RunningStation) -> None:
    otp = station.otp("curl-dev")
    cn_only_csr(tmp_path, "curl-dev")
    assert curl(station, tmp_path, "simpleenroll", "--user", f"curl-dev:{otp}", *CHUNKED) == 200, \
        (tmp_path / "answer").read_text(errors="replace")
    assert certs_in(tmp_path, "answer", "leaf.pem") == 1  # RFC 7030 4.2.3: the issued certificate alone

    assert curl(station, tmp_path, "cacerts", out="cacerts") == 200
    assert certs_in(tmp_path, "cacerts", "cas.pem") == 2  # issuing CA and root
    run(tool("openssl"), "verify", "-CAfile", str(station.ca_file), "-untrusted", "cas.pem", "leaf.pem", cwd=tmp_path)
    san = run(tool("openssl"), "x509", "-in", "leaf.pem", "-noout", "-ext", "subjectAltName", cwd=tmp_path)
    assert f"URI:spiffe://{TRUST_DOMAIN}/device/curl-dev" in san

    # re-enroll over mTLS presenting the leaf alone (no issuing CA from the client), body chunked again
    cn_only_csr(tmp_path, "curl-dev")
    status = curl(station, tmp_path, "simplereenroll", "--cert", "leaf.pem", "--key", "device.key", *CHUNKED,
                  out="renewed")
    assert status == 200, (tmp_path / "renewed").read_text(errors="replace")
    assert certs_in(tmp_path, "renewed", "renewed.pem") == 1
    run(tool("openssl"), "verify", "-CAfile", str(station.ca_file), "-untrusted", "cas.pem", "renewed.pem",
        cwd=tmp_path)
    serials = {run(tool("openssl"), "x509", "-in", f, "-noout", "-serial", cwd=tmp_path)
               for f in ("leaf.pem", "renewed.pem")}
    assert len(serials) == 2
    assert len(station.rows("curl-dev")) == 2


def test_answers_are_one_line_base64_and_a_client_that_failed_to_read_one_gets_the_same_certificate_again(
        tmp_path: Path, station: RunningStation) -> None:
    """A client sends its CSR on one line, decodes strictly, and (having failed to parse the answer,
    as such clients did when the station wrapped it) asks again with the same CSR and one-time
    password: the station, which keeps issuance idempotent, answers with the same certificate."""
    otp = station.otp("oneline-dev")
    cn_only_csr(tmp_path, "oneline-dev", one_line=True)
    assert b"\n" not in (tmp_path / "csr.b64").read_bytes().rstrip(b"\n")
    for answer in ("first", "again"):
        status = curl(station, tmp_path, "simpleenroll", "--user", f"oneline-dev:{otp}", "-H",
                      "Content-Type: application/pkcs10", "--data-binary", "@csr.b64", out=answer)
        assert status == 200, (tmp_path / answer).read_text(errors="replace")
        assert b"\n" not in (tmp_path / answer).read_bytes().strip()
        assert certs_in(tmp_path, answer, answer + ".pem") == 1
    assert (tmp_path / "first.pem").read_text() == (tmp_path / "again.pem").read_text()
    assert len(station.rows("oneline-dev")) == 1
    assert curl(station, tmp_path, "cacerts", out="cacerts") == 200
    assert b"\n" not in (tmp_path / "cacerts").read_bytes().strip()


def test_dns_and_ip_sans_of_a_csr_are_not_copied(tmp_path: Path, station: RunningStation) -> None:
    otp = station.otp("san-dev")
    cn_only_csr(tmp_path, "san-dev", "device.key", "-addext", "subjectAltName=DNS:bank.example,IP:10.0.0.1")
    assert curl(station, tmp_path, "simpleenroll", "--user", f"san-dev:{otp}", *CHUNKED) == 200
    certs_in(tmp_path, "answer", "leaf.pem")
    san = run(tool("openssl"), "x509", "-in", "leaf.pem", "-noout", "-ext", "subjectAltName", cwd=tmp_path)
    assert f"URI:spiffe://{TRUST_DOMAIN}/device/san-dev" in san
    assert "bank.example" not in san and "10.0.0.1" not in san


def test_a_csr_whose_san_names_another_device_is_still_refused(tmp_path: Path, station: RunningStation) -> None:
    otp = station.otp("honest-dev")
    cn_only_csr(tmp_path, "honest-dev", "device.key",
                "-addext", f"subjectAltName=URI:spiffe://{TRUST_DOMAIN}/device/victim")
    assert curl(station, tmp_path, "simpleenroll", "--user", f"honest-dev:{otp}", *CHUNKED) == 403
    assert "another identity" in (tmp_path / "answer").read_text()
    assert station.rows("honest-dev") == []


def test_csrattrs_says_what_the_station_wants_and_serverkeygen_is_a_readable_501(
        tmp_path: Path, station: RunningStation) -> None:
    assert curl(station, tmp_path, "csrattrs", out="attrs") == 200
    run(tool("openssl"), "base64", "-d", "-A", "-in", "attrs", "-out", "attrs.der", cwd=tmp_path)
    parsed = run(tool("openssl"), "asn1parse", "-inform", "DER", "-in", "attrs.der", cwd=tmp_path)
    for wanted in ("commonName", "ecdsa-with-SHA256", "id-ecPublicKey", "prime256v1"):
        assert wanted in parsed, parsed
    otp = station.otp("keygen-dev")
    cn_only_csr(tmp_path, "keygen-dev")
    assert curl(station, tmp_path, "serverkeygen", "--user", f"keygen-dev:{otp}", *CHUNKED, out="keygen") == 501
    assert "make the key on the device" in (tmp_path / "keygen").read_text()
    assert station.serving()


def test_one_tier_station_issues_chains_of_two(tmp_path: Path) -> None:
    directory = tmp_path / "one-tier"
    station_cli("init", "--dir", str(directory), "--trust-domain", TRUST_DOMAIN, "--tiers", "1")
    station = start_station(directory, workers=1)
    try:
        assert curl(station, tmp_path, "cacerts", out="cacerts") == 200
        assert certs_in(tmp_path, "cacerts", "cas.pem") == 1
        otp = station.otp("c8y-dev")
        cn_only_csr(tmp_path, "c8y-dev")
        assert curl(station, tmp_path, "simpleenroll", "--user", f"c8y-dev:{otp}", *CHUNKED) == 200
        certs_in(tmp_path, "answer", "leaf.pem")
        # the CA signs the device directly: leaf + ca.pem is the whole chain, nothing untrusted in between
        run(tool("openssl"), "verify", "-CAfile", str(station.ca_file), "leaf.pem", cwd=tmp_path)
        issuer = run(tool("openssl"), "x509", "-in", "leaf.pem", "-noout", "-issuer", cwd=tmp_path)
        subject = run(tool("openssl"), "x509", "-in", str(station.ca_file), "-noout", "-subject", cwd=tmp_path)
        assert issuer.removeprefix("issuer=") == subject.removeprefix("subject=")
    finally:
        station.proc.stop()


def test_init_refuses_tiers_other_than_one_or_two(tmp_path: Path) -> None:
    out = station_cli("init", "--dir", str(tmp_path / "s"), "--tiers", "3", check=False)
    assert out.returncode == 2 and "--tiers" in out.stderr
    assert not (tmp_path / "s" / "station.toml").exists()
    pem = str(tmp_path / "x.pem")
    out = station_cli("init", "--dir", str(tmp_path / "s"), "--tiers", "1", "--import", pem, pem, pem, check=False)
    assert out.returncode == 1 and "--import" in out.stderr
    assert not (tmp_path / "s" / "station.toml").exists()


def test_c8y_signed_verification_code_verifies_with_openssl(tmp_path: Path, station_dir: Path) -> None:
    code = "x7Kq0vVZ3pQm2bY8"
    signed = station_cli("cloud", "c8y-pop", "--dir", str(station_dir), "--code", code).stdout.strip()
    (tmp_path / "signed.b64").write_text(signed)
    (tmp_path / "code.txt").write_text(code)  # exactly the code, no newline: what the signature covers
    run(tool("openssl"), "base64", "-d", "-A", "-in", "signed.b64", "-out", "signed.der", cwd=tmp_path)
    run(tool("openssl"), "x509", "-in", str(station_dir / "issuing.pem"), "-pubkey", "-noout", "-out", "ca.pub",
        cwd=tmp_path)
    run(tool("openssl"), "dgst", "-sha256", "-verify", "ca.pub", "-signature", "signed.der", "code.txt", cwd=tmp_path)
    bad = station_cli("cloud", "c8y-pop", "--dir", str(station_dir), "--code", "two words", check=False)
    assert bad.returncode == 1 and "--code" in bad.stderr


def test_aws_verification_certificate_has_the_code_as_cn_and_is_signed_by_the_ca(tmp_path: Path,
                                                                                 station_dir: Path) -> None:
    code = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"  # 64 hex digits, like AWS's
    station_cli("cloud", "aws-verification-cert", "--dir", str(station_dir), "--code", code,
                "--out", str(tmp_path / "verification.pem"))
    run(tool("openssl"), "verify", "-CAfile", str(station_dir / "ca.pem"), "-untrusted",
        str(station_dir / "issuing.pem"), "verification.pem", cwd=tmp_path)
    subject = run(tool("openssl"), "x509", "-in", "verification.pem", "-noout", "-subject", "-nameopt", "RFC2253",
                  cwd=tmp_path)
    assert subject.strip() == f"subject=CN={code}"
    too_long = station_cli("cloud", "aws-verification-cert", "--dir", str(station_dir), "--code", "a" * 65,
                           "--out", str(tmp_path / "x.pem"), check=False)
    assert too_long.returncode == 1 and not (tmp_path / "x.pem").exists()


def test_init_station_api_refuses_other_tiers(tmp_path: Path) -> None:
    from provisioning.station.ca import init_station
    from provisioning.station.errors import StationError

    with pytest.raises(StationError, match="--tiers 3"):
        init_station(tmp_path / "s", TRUST_DOMAIN, tiers=3)
    assert not (tmp_path / "s").exists()
