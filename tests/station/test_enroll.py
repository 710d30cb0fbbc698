"""Devices enroll over EST against a real `tether-station serve`: file key, TPM key, retries, re-enrollment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hal.keys.file import generate
from lab.swtpm import SoftTpm
from provisioning import EnrollmentError
from provisioning.certs import load_certificates, same_public_key, to_pem
from provisioning.csr import build_csr
from provisioning.est.client import BasicAuth, ClientCertAuth, EstClient
from tests.conftest import REPO, run_tether, write_config
from tests.pki import TRUST_DOMAIN
from tests.station.conftest import RunningStation


def openssl_verify(chain_file: Path, directory: Path) -> subprocess.CompletedProcess[str]:
    """`openssl verify -CAfile root -untrusted intermediate leaf` on a stored chain (leaf, issuing, root)."""
    leaf, inter, root = load_certificates(chain_file.read_bytes())
    for name, cert in (("leaf.pem", leaf), ("inter.pem", inter), ("root.pem", root)):
        (directory / name).write_bytes(to_pem([cert]))
    return subprocess.run(["openssl", "verify", "-CAfile", str(directory / "root.pem"), "-untrusted",
                           str(directory / "inter.pem"), str(directory / "leaf.pem")],
                          capture_output=True, text=True, check=False)


def device_config(tmp_path: Path, station: RunningStation, device_id: str, **keys: str) -> Path:
    otp_file = tmp_path / device_id / "otp"
    otp_file.parent.mkdir(parents=True)
    otp_file.write_text(station.otp(device_id) + "\n")
    return write_config(tmp_path / device_id, device_id,
                        est={"url": station.url, "ca_file": str(station.ca_file), "otp_file": str(otp_file)},
                        identity={"ca_file": str(station.ca_file)}, keys=keys or {"backend": "file"})


def test_file_key_device_enrolls_and_its_chain_verifies_with_openssl(tmp_path: Path,
                                                                    station: RunningStation) -> None:
    config = device_config(tmp_path, station, "file-dev-1")
    out = run_tether("enroll", config=config)
    assert out.returncode == 0, out.stderr
    assert "enrolled CN=file-dev-1" in out.stdout
    chain_file = tmp_path / "file-dev-1" / "state" / "certs" / "chain.pem"
    verified = openssl_verify(chain_file, tmp_path)
    assert verified.returncode == 0 and ": OK" in verified.stdout, verified.stdout + verified.stderr
    assert not (tmp_path / "file-dev-1" / "otp").exists(), "the spent one-time password must be removed"
    assert not (tmp_path / "file-dev-1" / "state" / "certs" / "pending.csr").exists()
    assert len(station.rows("file-dev-1")) == 1


@pytest.mark.tpm
def test_tpm_key_device_enrolls_and_reenrolls_over_mtls_with_its_tpm_key(tmp_path: Path, station: RunningStation,
                                                                         softtpm: SoftTpm) -> None:
    config = device_config(tmp_path, station, "tpm-dev-1", backend="tpm", tcti=softtpm.tcti)
    out = run_tether("enroll", config=config)
    assert out.returncode == 0, out.stderr
    state = tmp_path / "tpm-dev-1" / "state"
    assert (state / "keys" / "device.tss2.pem").exists()
    verified = openssl_verify(state / "certs" / "chain.pem", tmp_path)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    first = station.rows("tpm-dev-1")
    assert len(first) == 1

    # ssl reads OPENSSL_CONF when first imported, so TLS with the TPM key runs in a fresh process
    from hal.keys.tpm import TpmKeyStore

    env = {**os.environ, **TpmKeyStore(state / "keys", tcti=softtpm.tcti).tls_env()}
    script = (
        "import json, sys\n"
        "from agent.config import load\n"
        "from agent.identity import DeviceIdentity\n"
        "from provisioning.est.client import ClientCertAuth, EstClient\n"
        "from provisioning.certs import serial_of\n"
        "ident = DeviceIdentity(load(sys.argv[1]))\n"
        "auth = ClientCertAuth(str(ident.certstore.path()), str(ident.keystore.path('device')))\n"
        "with EstClient(sys.argv[2], sys.argv[3], auth=auth) as c:\n"
        "    chain = c.simplereenroll(ident.csr())\n"
        "print(json.dumps({'serial': serial_of(chain[0]), 'length': len(chain)}))\n")
    run = subprocess.run([sys.executable, "-c", script, str(config), station.url, str(station.ca_file)],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    renewed = json.loads(run.stdout)
    assert renewed["length"] == 3
    rows = station.rows("tpm-dev-1")
    assert len(rows) == 2 and {f"0x{r.serial}" for r in rows} == {f"0x{first[0].serial}", renewed["serial"]}


def test_retry_with_same_otp_and_csr_gets_the_same_certificate_and_one_ledger_row(
        station: RunningStation) -> None:
    key = generate("ec-p256")
    csr = build_csr(key, "retry-dev", TRUST_DOMAIN)
    with EstClient(station.url, str(station.ca_file), auth=BasicAuth("retry-dev", station.otp("retry-dev"))) as c:
        first = c.simpleenroll(csr)
        second = c.simpleenroll(csr)
        with pytest.raises(EnrollmentError) as refused:
            c.simpleenroll(build_csr(generate("ec-p256"), "retry-dev", TRUST_DOMAIN))
    assert first[0] == second[0]
    assert [c.subject for c in first[1:]] == [c.subject for c in load_certificates(
        (station.directory / "ca-chain.pem").read_bytes())]
    assert refused.value.status == 401 and "already used for another CSR" in str(refused.value)
    assert not refused.value.retryable
    assert len(station.rows("retry-dev")) == 1


def test_enroll_resumes_after_crash_between_send_and_store(tmp_path: Path, station: RunningStation) -> None:
    """The device sent its CSR, the station signed, the device died before storing: the retry gets the
    same certificate, and the ledger still holds one row."""
    from agent.config import load
    from agent.enroll import pending_csr
    from agent.identity import DeviceIdentity

    config_path = device_config(tmp_path, station, "crash-dev")
    config = load(config_path)
    identity = DeviceIdentity(config)
    identity.ensure_key()
    csr, reused = pending_csr(identity)
    assert not reused
    otp = Path(config.est.otp_file).read_text().strip()
    with EstClient(station.url, str(station.ca_file), auth=BasicAuth("crash-dev", otp)) as c:
        sent = c.simpleenroll(csr)  # ... and the device loses power here

    out = run_tether("enroll", config=config_path)
    assert out.returncode == 0, out.stderr
    stored = load_certificates((tmp_path / "crash-dev" / "state" / "certs" / "chain.pem").read_bytes())
    assert stored[0] == sent[0]
    assert len(station.rows("crash-dev")) == 1


def _enrolled(station: RunningStation, tmp_path: Path, device_id: str) -> tuple[Path, Path, object]:
    key = generate("ec-p256")
    with EstClient(station.url, str(station.ca_file), auth=BasicAuth(device_id, station.otp(device_id))) as c:
        chain = c.simpleenroll(build_csr(key, device_id, TRUST_DOMAIN))
    from tests.pki import key_pem

    cert_file, key_file = tmp_path / f"{device_id}.pem", tmp_path / f"{device_id}.key"
    cert_file.write_bytes(to_pem(chain))
    key_file.write_bytes(key_pem(key))
    return cert_file, key_file, key


def test_reenroll_over_mtls_issues_a_new_certificate_for_the_same_subject(tmp_path: Path,
                                                                         station: RunningStation) -> None:
    cert_file, key_file, _ = _enrolled(station, tmp_path, "renew-dev")
    new_key = generate("ec-p256")
    with EstClient(station.url, str(station.ca_file), auth=ClientCertAuth(str(cert_file), str(key_file))) as c:
        renewed = c.simplereenroll(build_csr(new_key, "renew-dev", TRUST_DOMAIN))
        with pytest.raises(EnrollmentError) as other:
            c.simplereenroll(build_csr(new_key, "someone-else", TRUST_DOMAIN))
    assert same_public_key(renewed[0].public_key(), new_key.public_key())
    assert other.value.status == 403
    assert "CN 'someone-else' does not match the device id 'renew-dev'" in str(other.value)
    assert len(station.rows("renew-dev")) == 2
    assert station.rows("someone-else") == []


def test_revoked_certificate_cannot_reenroll(tmp_path: Path, station: RunningStation) -> None:
    cert_file, key_file, key = _enrolled(station, tmp_path, "revoked-dev")
    (row,) = station.rows("revoked-dev")
    station.cli("revoke", row.serial)
    with EstClient(station.url, str(station.ca_file), auth=ClientCertAuth(str(cert_file), str(key_file))) as c, \
            pytest.raises(EnrollmentError) as refused:
        c.simplereenroll(build_csr(key, "revoked-dev", TRUST_DOMAIN))
    assert refused.value.status == 403 and "was revoked" in str(refused.value)
    assert len(station.rows("revoked-dev")) == 1
