"""Issue 22 case 3: an operator's revocation holds. After `revoke --device ID`, neither the device's factory
bootstrap certificate, nor a one-time password issued before the revocation, nor a crash-retry of an
earlier request enrolls it again; the CRL lists what was revoked. Only a new credential from the operator
lets it back in: a new `tether-station otp` (that password only) or `tether-station readmit` (the bootstrap
certificate). All against a real `tether-station serve` with a factory bootstrap CA."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from provisioning.certs import load_certificates
from tests.pki import Pki
from tests.security.stationbed import csr_body, post_enroll, post_enroll_with_cert, set_settings
from tests.station.conftest import RunningStation, start_station


@pytest.fixture
def factory(tmp_path: Path) -> Pki:
    """The factory's bootstrap PKI: its devices hold a certificate from it before they meet the station."""
    return Pki.create(tmp_path / "factory", "Factory")


@pytest.fixture
def bootstrapped(station_dir: Path, factory: Pki) -> Iterator[RunningStation]:
    (station_dir / "bootstrap-ca.pem").write_bytes(factory.ca_chain_file.read_bytes())
    set_settings(station_dir, bootstrap_ca="bootstrap-ca.pem")
    running = start_station(station_dir, workers=1)
    try:
        yield running
    finally:
        running.proc.stop()


def issued(reply_body: str) -> x509.Certificate:
    (leaf,) = load_certificates(base64.b64decode(reply_body), "the station's answer")
    return leaf


def crl_serials(station: RunningStation) -> set[int]:
    pem = station.cli("crl").stdout.encode()
    return {r.serial_number for r in x509.load_pem_x509_crl(pem)}


def test_a_revoked_device_cannot_come_back_through_its_bootstrap_certificate_until_readmitted(
        bootstrapped: RunningStation, factory: Pki) -> None:
    station = bootstrapped
    boot = factory.device_files("line-7")
    csr = csr_body("line-7")
    first = post_enroll_with_cert(station, boot, csr)
    assert first.status == 200, first
    serial = issued(first.body).serial_number
    # a crash-retry with the same CSR gets the same certificate (idempotent, no new row)
    again = post_enroll_with_cert(station, boot, csr)
    assert again.status == 200 and issued(again.body).serial_number == serial
    assert len(station.rows("line-7")) == 1

    station.cli("revoke", "--device", "line-7", "--reason", "keyCompromise")
    # the holder of the bootstrap certificate, with a fresh key, and the crash-retry: both refused
    for body in (csr_body("line-7"), csr):
        refused = post_enroll_with_cert(station, boot, body)
        assert refused.status == 403, refused
        assert "device 'line-7' was revoked (keyCompromise)" in refused.body
        assert "tether-station readmit line-7" in refused.body and "tether-station otp line-7" in refused.body
    rows = station.rows("line-7")
    assert len(rows) == 1 and rows[0].revoke_reason == "keyCompromise"
    assert serial in crl_serials(station)
    barred = station.cli("ledger", "barred").stdout
    assert "line-7" in barred and "keyCompromise" in barred

    # a password issued after the revocation admits the device; the bootstrap path stays shut
    fresh = post_enroll(station, "line-7", station.otp("line-7"))
    assert fresh.status == 200, fresh
    assert post_enroll_with_cert(station, boot, csr_body("line-7")).status == 403

    # readmit: the operator lets the bootstrap certificate in again
    assert "line-7 readmitted" in station.cli("readmit", "line-7").stdout
    back = post_enroll_with_cert(station, boot, csr_body("line-7"))
    assert back.status == 200, back
    assert "line-7" not in station.cli("ledger", "barred").stdout
    not_barred = station.cli("readmit", "line-7", check=False)
    assert not_barred.returncode == 1 and "device 'line-7' is not barred" in not_barred.stderr


def test_a_password_issued_before_the_revocation_is_void(station: RunningStation) -> None:
    spare = station.otp("pump-3")  # e.g. a second label printed for the same device
    used = station.otp("pump-3")
    csr = csr_body("pump-3")
    assert post_enroll(station, "pump-3", used, csr).status == 200
    station.cli("revoke", "--device", "pump-3", "--reason", "keyCompromise")

    void = post_enroll(station, "pump-3", spare)
    assert void.status == 403, void
    assert "issued before the device was revoked" in void.body and "tether-station otp pump-3" in void.body
    retry = post_enroll(station, "pump-3", used, csr)  # the crash-retry of the revoked enrollment
    assert retry.status == 401 and "revoked" in retry.body, retry
    assert len(station.rows("pump-3")) == 1

    assert post_enroll(station, "pump-3", station.otp("pump-3")).status == 200
    assert len(station.rows("pump-3")) == 2


def test_revoking_one_serial_bars_the_device_too(bootstrapped: RunningStation, factory: Pki) -> None:
    station = bootstrapped
    boot = factory.device_files("line-8")
    first = post_enroll_with_cert(station, boot, csr_body("line-8"))
    assert first.status == 200, first
    station.cli("revoke", f"{issued(first.body).serial_number:x}", "--reason", "keyCompromise")
    refused = post_enroll_with_cert(station, boot, csr_body("line-8"))
    assert refused.status == 403 and "was revoked (keyCompromise)" in refused.body, refused

