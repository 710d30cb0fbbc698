"""`tether-station` offline commands: init (new or imported CA), issue, sign, server-cert, revoke, crl, export."""

from __future__ import annotations

import csv
import io
import json
import stat
import subprocess
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, load_der_private_key, load_pem_private_key

from hal.keys.file import generate
from provisioning.certs import load_certificates, same_public_key
from provisioning.csr import build_csr
from provisioning.policy import ChainPolicy
from tests.pki import TRUST_DOMAIN, Pki, key_pem
from tests.station.conftest import station_cli


def run(station_dir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return station_cli(*args, "--dir", str(station_dir), check=check)


def ledger_json(station_dir: Path) -> list[dict]:
    return json.loads(run(station_dir, "ledger", "list", "--json").stdout)


def test_init_makes_root_and_issuing_ca_with_private_key_files_0600(station_dir: Path) -> None:
    root = load_certificates((station_dir / "ca.pem").read_bytes())[0]
    issuing, chain_root = load_certificates((station_dir / "ca-chain.pem").read_bytes())
    assert chain_root == root
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 1
    bc = issuing.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    for key in ("root.key", "issuing.key", "server.key"):
        assert stat.S_IMODE((station_dir / key).stat().st_mode) == 0o600, key
    again = run(station_dir, "init", check=False)
    assert again.returncode == 1 and "already holds a station" in again.stderr


def test_init_with_a_passphrase_encrypts_the_ca_keys_and_commands_need_it(tmp_path: Path) -> None:
    secret = tmp_path / "pass"
    secret.write_text("correct horse\n")
    directory = tmp_path / "enc"
    station_cli("init", "--dir", str(directory), "--passphrase-file", str(secret))
    assert b"ENCRYPTED" in (directory / "issuing.key").read_bytes()
    refused = run(directory, "issue", "board-1", "--out", str(tmp_path / "b"), check=False)
    assert refused.returncode == 1 and "passphrase-encrypted" in refused.stderr
    station_cli("issue", "board-1", "--out", str(tmp_path / "b"), "--dir", str(directory),
                "--passphrase-file", str(secret))


def test_init_imports_an_existing_ca_and_signs_with_it(tmp_path: Path) -> None:
    pki = Pki.create(tmp_path / "byo", name="BYO")
    (tmp_path / "issuing.pem").write_bytes(pki.issuing.cert.public_bytes(Encoding.PEM))
    (tmp_path / "issuing.key").write_bytes(key_pem(pki.issuing.key))
    directory = tmp_path / "imported"
    station_cli("init", "--dir", str(directory), "--trust-domain", TRUST_DOMAIN, "--import",
                str(tmp_path / "issuing.pem"), str(tmp_path / "issuing.key"), str(pki.root_file))
    run(directory, "issue", "byo-dev", "--out", str(tmp_path / "out"))
    chain = load_certificates((tmp_path / "out" / "device.pem").read_bytes())
    assert chain[1] == pki.issuing.cert and chain[2] == pki.root.cert
    ChainPolicy(trust_domain=TRUST_DOMAIN, anchors=(pki.root.cert,)).check_chain(chain, device_id="byo-dev")

    wrong = tmp_path / "wrong.key"
    wrong.write_bytes(key_pem(generate("ec-p256")))
    refused = station_cli("init", "--dir", str(tmp_path / "x"), "--import", str(tmp_path / "issuing.pem"),
                          str(wrong), str(pki.root_file), check=False)
    assert refused.returncode == 1 and "does not belong to" in refused.stderr


def test_issue_der_writes_the_three_files_a_micropython_board_loads(tmp_path: Path, station_dir: Path) -> None:
    out = tmp_path / "board"
    run(station_dir, "issue", "mpy-1", "--format", "der", "--out", str(out))
    assert sorted(p.name for p in out.iterdir()) == ["ca.crt.der", "device.crt.der", "device.key.der"]
    cert = x509.load_der_x509_certificate((out / "device.crt.der").read_bytes())
    key = load_der_private_key((out / "device.key.der").read_bytes(), None)
    assert same_public_key(cert.public_key(), key.public_key())
    assert x509.load_der_x509_certificate((out / "ca.crt.der").read_bytes()) == \
        load_certificates((station_dir / "ca.pem").read_bytes())[0]
    assert stat.S_IMODE((out / "device.key.der").stat().st_mode) == 0o600


def test_issue_pem_writes_chain_key_and_ca(tmp_path: Path, station_dir: Path) -> None:
    out = tmp_path / "board"
    run(station_dir, "issue", "mpy-2", "--out", str(out))
    assert sorted(p.name for p in out.iterdir()) == ["ca.pem", "device.key", "device.pem"]
    chain = load_certificates((out / "device.pem").read_bytes())
    key = load_pem_private_key((out / "device.key").read_bytes(), None)
    root = load_certificates((station_dir / "ca.pem").read_bytes())[0]
    ChainPolicy(trust_domain=TRUST_DOMAIN, anchors=(root,)).check_chain(chain, device_id="mpy-2",
                                                                         device_key=key.public_key())


def test_sign_offline_records_one_row_and_a_second_sign_returns_the_same_certificate(
        tmp_path: Path, station_dir: Path) -> None:
    csr_file = tmp_path / "dev.csr"
    csr_file.write_bytes(build_csr(generate("ec-p256"), "offline-1", TRUST_DOMAIN).public_bytes(Encoding.PEM))
    first = run(station_dir, "sign", str(csr_file)).stdout
    second = run(station_dir, "sign", str(csr_file)).stdout
    assert first == second and len(load_certificates(first.encode())) == 3
    assert [r["device_id"] for r in ledger_json(station_dir) if r["kind"] == "device"] == ["offline-1"]

    bad = tmp_path / "bad.csr"
    bad.write_bytes(build_csr(generate("ec-p256"), "offline-2", "other.domain").public_bytes(Encoding.PEM))
    refused = run(station_dir, "sign", str(bad), check=False)
    assert refused.returncode == 1 and "spiffe-id" in refused.stderr


def test_server_cert_carries_the_requested_sans(tmp_path: Path, station_dir: Path) -> None:
    out = tmp_path / "broker"
    run(station_dir, "server-cert", "--dns", "core1.local", "--dns", "localhost", "--ip", "10.0.0.5",
        "--out", str(out))
    cert, issuing = load_certificates((out / "server.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["core1.local", "localhost"]
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert cert.issuer == issuing.subject
    verified = subprocess.run(["openssl", "verify", "-CAfile", str(out / "ca.pem"), "-untrusted",
                               str(station_dir / "issuing.pem"), "-purpose", "sslserver",
                               "-verify_hostname", "core1.local", str(out / "server.pem")],
                              capture_output=True, text=True, check=False)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_revoked_serial_appears_in_the_crl_signed_by_the_issuing_ca(tmp_path: Path, station_dir: Path) -> None:
    run(station_dir, "issue", "gone-1", "--out", str(tmp_path / "a"))
    run(station_dir, "issue", "kept-1", "--out", str(tmp_path / "b"))
    serial = next(r["serial"] for r in ledger_json(station_dir) if r["device_id"] == "gone-1")
    run(station_dir, "revoke", f"0x{serial}")
    again = run(station_dir, "revoke", serial, check=False)
    assert again.returncode == 1 and "already revoked" in again.stderr
    run(station_dir, "crl", "--out", str(tmp_path / "crl.der"), "--format", "der")
    crl = x509.load_der_x509_crl((tmp_path / "crl.der").read_bytes())
    issuing = load_certificates((station_dir / "issuing.pem").read_bytes())[0]
    assert crl.is_signature_valid(issuing.public_key())
    assert [f"{r.serial_number:x}" for r in crl] == [serial]
    pem = run(station_dir, "crl").stdout
    assert pem.startswith("-----BEGIN X509 CRL-----")


def test_c8y_bulk_export_lists_unrevoked_devices_with_certificate_auth(tmp_path: Path, station_dir: Path) -> None:
    for device in ("c8y-b", "c8y-a", "c8y-gone"):
        run(station_dir, "issue", device, "--out", str(tmp_path / device))
    gone = next(r["serial"] for r in ledger_json(station_dir) if r["device_id"] == "c8y-gone")
    run(station_dir, "revoke", gone)
    text = run(station_dir, "export", "c8y-bulk").stdout
    rows = list(csv.DictReader(io.StringIO(text), delimiter=";"))
    assert [r["ID"] for r in rows] == ["c8y-a", "c8y-b"]
    assert all(r["AUTH_TYPE"] == "CERTIFICATES" and r["CREDENTIALS"] == "" for r in rows)


def test_otp_prints_only_the_password_on_stdout(station_dir: Path) -> None:
    out = run(station_dir, "otp", "otp-dev", "--ttl", "60")
    assert len(out.stdout.strip()) == 26 and "\n" not in out.stdout.strip()
    assert "otp-dev" in out.stderr
    bad = run(station_dir, "otp", "bad:id", check=False)
    assert bad.returncode == 1 and "contains ':'" in bad.stderr


def test_station_dir_comes_from_the_environment(station_dir: Path) -> None:
    out = station_cli("ledger", "list", env={"TETHER_STATION_DIR": str(station_dir)})
    assert "est-server" in out.stdout
    missing = station_cli("ledger", "list", env={"TETHER_STATION_DIR": ""}, check=False)
    assert missing.returncode == 1 and "TETHER_STATION_DIR" in missing.stderr


def test_release_keygen_and_sign_use_the_station_issuing_ca(tmp_path: Path, station_dir: Path) -> None:
    out = run(station_dir, "release", "keygen")
    assert "codeSigning" in out.stdout
    again = run(station_dir, "release", "keygen", check=False)
    assert again.returncode == 1 and "exists already" in again.stderr
    payload = tmp_path / "app-1.2.0.bin"
    payload.write_bytes(b"firmware" * 100)
    manifest = json.loads(run(station_dir, "release", "sign", "--name", "app", "--version", "1.2.0", str(payload),
                              "--out", str(tmp_path / "rel"), "--min-version", "1.0.0").stdout)
    assert manifest["name"] == "app" and manifest["version"] == "1.2.0" and manifest["size"] == 800
    signer = load_certificates((station_dir / "release" / "release.pem").read_bytes())
    assert signer[-1] == load_certificates((station_dir / "ca.pem").read_bytes())[0]
