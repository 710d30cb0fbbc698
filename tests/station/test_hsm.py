"""The station's keys in a PKCS#11 token (SoftHSM2, its own config and token directory per test): a real
`tether-station serve` enrolls devices with them, every signature comes from the token, the keys
cannot be read out, a wrong PIN stops the start with one line, and a token that goes away while
serving costs 503 + Retry-After (nothing written) until it is back.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hal.keys.file import generate
from lab.procs import wait_until
from lab.softhsm import SoftHsm
from provisioning.certs import load_certificates, same_public_key
from provisioning.csr import build_csr
from provisioning.release import verify_release
from tests.conftest import REPO, run_tether
from tests.pki import TRUST_DOMAIN
from tests.station.conftest import RunningStation, serving, start_station, station_cli
from tests.station.test_enroll import device_config, openssl_verify


@pytest.fixture
def hsm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SoftHsm:
    token = SoftHsm(tmp_path / "softhsm")
    monkeypatch.setenv("SOFTHSM2_CONF", str(token.conf))  # every station child process reads this token
    return token


@pytest.fixture
def hsm_station_dir(tmp_path: Path, hsm: SoftHsm) -> Path:
    directory = tmp_path / "station"
    station_cli("init", "--dir", str(directory), "--trust-domain", TRUST_DOMAIN, "--keys", hsm.key_uri())
    return directory


@pytest.fixture
def hsm_station(hsm_station_dir: Path) -> Iterator[RunningStation]:
    with serving(hsm_station_dir) as running:
        yield running


def token_attributes(hsm: SoftHsm, labels: list[str]) -> dict[str, dict[str, object]]:
    """The private keys' attributes, read in a child process (SoftHSM2 reads SOFTHSM2_CONF once per process)."""
    code = f"""
import json, pkcs11
from pkcs11 import Attribute, ObjectClass
from pkcs11.exceptions import AttributeSensitive
session = pkcs11.lib({str(hsm_module())!r}).get_token(token_label={hsm.label!r}).open(user_pin={hsm.pin!r})
out = {{}}
for label in {labels!r}:
    key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=label)
    facts = {{a.name: bool(key[a]) for a in (Attribute.EXTRACTABLE, Attribute.SENSITIVE, Attribute.NEVER_EXTRACTABLE,
                                             Attribute.ALWAYS_SENSITIVE)}}
    try:
        key[Attribute.VALUE]
        facts["VALUE"] = "readable"
    except AttributeSensitive:
        facts["VALUE"] = "CKR_ATTRIBUTE_SENSITIVE"
    out[label] = facts
print(json.dumps(out))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=REPO,
                          env=hsm.env_full, timeout=60)
    assert done.returncode == 0, done.stderr
    result: dict[str, dict[str, object]] = json.loads(done.stdout)
    return result


def hsm_module() -> str:
    from lab.softhsm import MODULE

    return MODULE


def test_a_device_enrolls_against_a_station_whose_keys_are_in_softhsm(tmp_path: Path, hsm_station: RunningStation,
                                                                     hsm_station_dir: Path) -> None:
    assert sorted(p.name for p in hsm_station_dir.rglob("*.key")) == ["server.key"], \
        "root.key and issuing.key are token objects, never files"
    config = device_config(tmp_path, hsm_station, "hsm-dev-1")
    out = run_tether("enroll", config=config)
    assert out.returncode == 0, out.stderr
    verified = openssl_verify(tmp_path / "hsm-dev-1" / "state" / "certs" / "chain.pem", tmp_path)
    assert verified.returncode == 0 and ": OK" in verified.stdout, verified.stdout + verified.stderr
    assert len(hsm_station.rows("hsm-dev-1")) == 1
    # a token's signature may take far longer than a handshake: the pool signs, not the workers' loops
    log = (hsm_station.directory / "serve.log").read_text()
    assert "a pool of 8 threads per worker (the CA key is in an HSM" in log


def test_the_token_keys_are_sensitive_and_never_extractable(hsm: SoftHsm, hsm_station_dir: Path) -> None:
    station_cli("release", "keygen", "--dir", str(hsm_station_dir))
    facts = token_attributes(hsm, ["ca-root", "ca-issuing", "ca-release"])
    for label, attrs in facts.items():
        assert attrs == {"EXTRACTABLE": False, "SENSITIVE": True, "NEVER_EXTRACTABLE": True,
                         "ALWAYS_SENSITIVE": True, "VALUE": "CKR_ATTRIBUTE_SENSITIVE"}, label


def test_crl_release_and_cloud_proof_are_signed_by_the_token(tmp_path: Path, hsm_station_dir: Path) -> None:
    issuing = load_certificates((hsm_station_dir / "issuing.pem").read_bytes())[0]
    issuing_key = issuing.public_key()
    assert isinstance(issuing_key, ec.EllipticCurvePublicKey)
    # CRL
    station_cli("crl", "--dir", str(hsm_station_dir), "--out", str(tmp_path / "crl.pem"))
    crl = x509.load_pem_x509_crl((tmp_path / "crl.pem").read_bytes())
    assert crl.is_signature_valid(issuing_key)
    # Cumulocity proof of possession: the code's signature by the issuing key
    pop = station_cli("cloud", "c8y-pop", "--dir", str(hsm_station_dir), "--code", "abc123").stdout
    signature = base64.b64decode(pop.strip())  # stdout carries only the signed code
    issuing_key.verify(signature, b"abc123", ec.ECDSA(hashes.SHA256()))
    # AWS verification certificate: issued by the issuing CA
    station_cli("cloud", "aws-verification-cert", "--dir", str(hsm_station_dir), "--code", "reg-1",
                "--out", str(tmp_path / "aws.pem"))
    load_certificates((tmp_path / "aws.pem").read_bytes())[0].verify_directly_issued_by(issuing)
    # an OTA release, signed by the release key the token holds
    station_cli("release", "keygen", "--dir", str(hsm_station_dir))
    assert not (hsm_station_dir / "release" / "release.key").exists()
    (tmp_path / "fw.bin").write_bytes(b"firmware")
    station_cli("release", "sign", "--dir", str(hsm_station_dir), "--name", "fw", "--version", "1.0.0",
                str(tmp_path / "fw.bin"), "--out", str(tmp_path / "rel"))
    rel = tmp_path / "rel"
    root = load_certificates((hsm_station_dir / "ca.pem").read_bytes())
    manifest = verify_release((rel / "manifest.json").read_bytes(), (rel / "manifest.sig").read_bytes(),
                              (rel / "signer.pem").read_bytes(), root)
    assert manifest.version == "1.0.0"


def test_a_wrong_pin_is_one_line_at_start(tmp_path: Path, hsm: SoftHsm, hsm_station_dir: Path) -> None:
    hsm.pin_file.write_text("000000\n")
    done = station_cli("serve", "--dir", str(hsm_station_dir), "--listen", "127.0.0.1:0", check=False, timeout=60)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "the token refused the user PIN (CKR_PIN_INCORRECT)" in lines[0]
    assert "000000" not in done.stderr and hsm.pin not in done.stderr


def _enroll_request(station: RunningStation, device_id: str, otp: str, csr_pem: bytes) -> requests.Response:
    body = base64.b64encode(x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER))
    return requests.post(f"{station.url}/.well-known/est/simpleenroll", data=body, auth=(device_id, otp),
                         headers={"Content-Type": "application/pkcs10", "Content-Transfer-Encoding": "base64"},
                         verify=str(station.ca_file), timeout=30)


def test_a_token_that_goes_away_answers_503_and_comes_back(tmp_path: Path, hsm: SoftHsm,
                                                           hsm_station_dir: Path) -> None:
    # one worker: the one that signed before the token went away is the one that must sign after it
    station = start_station(hsm_station_dir, workers=1)
    try:
        check_token_goes_away_and_comes_back(hsm, station)
    finally:
        station.proc.stop()


def check_token_goes_away_and_comes_back(hsm: SoftHsm, hsm_station: RunningStation) -> None:
    warm = generate("ec-p256")
    answer = _enroll_request(hsm_station, "warm-dev", hsm_station.otp("warm-dev"),
                             build_csr(warm, "warm-dev", TRUST_DOMAIN).public_bytes(serialization.Encoding.PEM))
    assert answer.status_code == 200, answer.text  # the worker holds a session and the key's handle now
    key = generate("ec-p256")
    csr = build_csr(key, "away-dev", TRUST_DOMAIN).public_bytes(serialization.Encoding.PEM)
    otp = hsm_station.otp("away-dev")
    away = hsm.directory / "tokens-away"
    hsm.tokens.rename(away)  # the token's files are gone, as when a USB token is pulled: SoftHSM2 fails C_Sign
    try:
        for _ in range(3):  # more than once: the worker lives on
            answer = _enroll_request(hsm_station, "away-dev", otp, csr)
            assert answer.status_code == 503, answer.text
            assert answer.headers["Retry-After"] == "5"
            assert "token does not answer" in answer.text
        hsm_station.proc.check_alive()
        assert hsm_station.rows("away-dev") == [], "a refused enrollment writes no ledger row"
    finally:
        away.rename(hsm.tokens)
    # the same one-time password still works: the 503s consumed nothing
    answer = _enroll_request(hsm_station, "away-dev", otp, csr)
    assert answer.status_code == 200, answer.text
    rows = hsm_station.rows("away-dev")
    assert len(rows) == 1 and same_public_key(rows[0].certificate.public_key(), key.public_key())
    wait_until(hsm_station.serving, 10, "the station still serving")
    log = (hsm_station.directory / "serve.log").read_text()
    assert "restarted as" not in log and "Traceback" not in log, "no worker died of the missing token"


@pytest.mark.parametrize("uri", ["file:", "tpm:", "pkcs11:object=ca?module-path=/usr/lib/softhsm/libsofthsm2.so"])
def test_init_refuses_keys_that_are_no_token_and_writes_nothing(tmp_path: Path, uri: str) -> None:
    done = station_cli("init", "--dir", str(tmp_path / "st"), "--keys", uri, check=False)
    assert done.returncode == 1
    assert done.stderr.startswith("tether-station: error: --keys: ") and len(done.stderr.splitlines()) == 1
    assert not (tmp_path / "st").exists()


def test_init_with_a_wrong_pin_or_a_taken_prefix_writes_nothing(tmp_path: Path, hsm: SoftHsm,
                                                                hsm_station_dir: Path) -> None:
    again = station_cli("init", "--dir", str(tmp_path / "second"), "--keys", hsm.key_uri(), check=False)
    assert again.returncode == 1
    assert again.stderr == ("tether-station: error: --keys: the token holds ca-root, ca-issuing already (another "
                            "station's keys?); give this station another object= prefix\n")
    hsm.pin_file.write_text("000000\n")
    wrong = station_cli("init", "--dir", str(tmp_path / "third"), "--keys", hsm.key_uri("other"), check=False)
    assert wrong.returncode == 1 and len(wrong.stderr.splitlines()) == 1
    assert "the token refused the user PIN (CKR_PIN_INCORRECT)" in wrong.stderr
    assert not (tmp_path / "second").exists() and not (tmp_path / "third").exists()
