"""First boot with no secret carried to the device: the real CLI enrolls by TPM attestation against the
real station, on swtpm TPMs whose EK certificates come from swtpm's local CA."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509

from lab.mosquitto import BrokerFiles, Mosquitto
from lab.swtpm import SoftTpm
from provisioning.attest.verify import ek_digest
from provisioning.station.attestation import TPM_FIXED, TPM_RESIDENCY
from tests.attest.conftest import TCTI, attest_config
from tests.conftest import run_tether, write_config
from tests.station.conftest import RunningStation, station_cli


def ek_digests(station: RunningStation, device_id: str) -> list[str | None]:
    ledger = station.ledger()
    try:
        with ledger.db.transaction(write=False) as q:
            return [r[0] for r in q("SELECT ek_digest FROM certs WHERE device_id = ?", (device_id,))]
    finally:
        ledger.close()


@pytest.mark.parametrize("ek", ["rsa", "ecc"])
def test_first_boot_enrolls_by_attestation_with_no_otp(tmp_path: Path, attest_station: RunningStation,
                                                       attested_tpm: SoftTpm, ek: str) -> None:
    config = attest_config(tmp_path, attest_station, enroll={"method": "tpm-attestation", "ek": ek})
    out = run_tether("enroll", config=config)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "via tpm-attestation" in out.stdout
    chain = x509.load_pem_x509_certificates((tmp_path / "dev-att" / "state" / "certs" / "chain.pem").read_bytes())
    policies = chain[0].extensions.get_extension_for_class(x509.CertificatePolicies).value
    assert {p.policy_identifier for p in policies} == {TPM_RESIDENCY, TPM_FIXED}
    [digest] = ek_digests(attest_station, "dev-att")
    assert digest is not None and digest.startswith("sha256:")


def test_tether_check_first_boot_enrolls_by_attestation_and_connects_with_the_tpm_key(
        tmp_path: Path, attest_station: RunningStation, attested_tpm: SoftTpm) -> None:
    out_dir = tmp_path / "broker-cert"
    station_cli("server-cert", "--dir", str(attest_station.directory), "--dns", "localhost", "--ip", "127.0.0.1",
                "--out", str(out_dir))
    broker = Mosquitto(tmp_path / "broker", BrokerFiles(attest_station.directory / "ca-chain.pem",
                                                        out_dir / "server.pem", out_dir / "server.key")).start()
    try:
        config = attest_config(tmp_path, attest_station, endpoints={"urls": [f"mqtts://localhost:{broker.port}"]},
                               token={"enabled": False},
                               mqtt={"backoff_base": 0.2, "backoff_cap": 1.0, "connect_timeout": 3.0})
        out = run_tether("check", config=config)
        assert out.returncode == 0, out.stdout + out.stderr
        for step in ("key", "enroll", "connect"):
            assert f"ok   {step}" in out.stdout
        assert len(attest_station.rows("dev-att")) == 1
    finally:
        broker.stop()


def test_the_ledger_names_the_ek_of_the_tpm(tmp_path: Path, attest_station: RunningStation,
                                           attested_tpm: SoftTpm) -> None:
    from hal.keys.tpm import TpmKeyStore
    from hal.keys.tpm_attest import attester

    config = attest_config(tmp_path, attest_station, enroll={"method": "tpm-attestation", "ek": "rsa"})
    assert run_tether("enroll", config=config).returncode == 0
    with attester(TpmKeyStore(tmp_path / "probe", tcti=TCTI), "rsa") as tpm:
        assert tpm.endorsement is not None
        expected = ek_digest(x509.load_der_x509_certificate(tpm.endorsement.certificate))
    assert ek_digests(attest_station, "dev-att") == [expected]


def test_a_file_key_is_refused_in_one_line(tmp_path: Path, attest_station: RunningStation) -> None:
    config = attest_config(tmp_path, attest_station, keys={"uri": "file:"})
    out = run_tether("enroll", config=config)
    assert out.returncode != 0
    [line] = [x for x in out.stderr.splitlines() if x.strip()]
    assert "needs the device key in the TPM" in line and "'file'" in line, out.stderr
    assert attest_station.rows("dev-att") == []


def test_a_tpm_without_an_ek_certificate_is_refused_in_one_line(tmp_path: Path, attest_station: RunningStation,
                                                                softtpm: SoftTpm) -> None:
    config = write_config(tmp_path / "dev-att", "dev-att", keys={"uri": f"tpm:?tcti={TCTI}"},
                          enroll={"method": "tpm-attestation"},
                          est={"url": attest_station.url, "ca_file": str(attest_station.ca_file)})
    out = run_tether("enroll", config=config)
    assert out.returncode != 0
    [line] = [x for x in out.stderr.splitlines() if x.strip() and not x.startswith(("WARNING:esys", "ERROR:esys"))]
    assert "holds no EK certificate" in line and "0x01c00002" in line, out.stderr
