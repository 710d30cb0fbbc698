"""Issue 13 case 3: a stolen certificate does not outlive its revocation. The thief re-enrolls to a key
of their own with the victim's certificate; revoking the stolen serial revokes the thief's certificate
too, renewals of the revoked lineage are refused, the CRL lists the whole lineage, and
`tether-station revoke --device` revokes everything a device holds."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from hal.keys.file import generate
from provisioning import EnrollmentError
from provisioning.certs import to_pem
from provisioning.csr import build_csr
from provisioning.est.client import BasicAuth, ClientCertAuth, EstClient
from provisioning.station.ledger import serial_hex
from tests.pki import TRUST_DOMAIN, key_pem
from tests.security.stationbed import set_settings
from tests.station.conftest import RunningStation, start_station


def enroll(station: RunningStation, device_id: str, tmp_path: Path, name: str) -> tuple[Path, Path]:
    key = generate("ec-p256")
    with EstClient(station.url, str(station.ca_file), auth=BasicAuth(device_id, station.otp(device_id))) as c:
        chain = c.simpleenroll(build_csr(key, device_id, TRUST_DOMAIN))
    return save(tmp_path, name, chain, key)


def save(tmp_path: Path, name: str, chain: list[x509.Certificate], key: object) -> tuple[Path, Path]:
    cert_file, key_file = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    cert_file.write_bytes(to_pem(chain))
    key_file.write_bytes(key_pem(key))
    return cert_file, key_file


def reenroll(station: RunningStation, creds: tuple[Path, Path], device_id: str,
             tmp_path: Path, name: str) -> tuple[Path, Path]:
    key = generate("ec-p256")
    with EstClient(station.url, str(station.ca_file), auth=ClientCertAuth(str(creds[0]), str(creds[1]))) as c:
        chain = c.simplereenroll(build_csr(key, device_id, TRUST_DOMAIN))
    return save(tmp_path, name, chain, key)


def serial_in(creds: tuple[Path, Path]) -> str:
    return serial_hex(x509.load_pem_x509_certificates(creds[0].read_bytes())[0].serial_number)


def crl_serials(station: RunningStation, tmp_path: Path) -> dict[str, x509.ReasonFlags | None]:
    out = tmp_path / "crl.pem"
    station.cli("crl", "--out", str(out))
    crl = x509.load_pem_x509_crl(out.read_bytes())
    listed: dict[str, x509.ReasonFlags | None] = {}
    for entry in crl:
        try:
            reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
            listed[serial_hex(entry.serial_number)] = reason
        except x509.ExtensionNotFound:
            listed[serial_hex(entry.serial_number)] = None
    return listed


def test_revoking_a_stolen_serial_revokes_the_thiefs_reenrolled_certificate(tmp_path: Path,
                                                                             station: RunningStation) -> None:
    victim = enroll(station, "victim-1", tmp_path, "victim")
    thief = reenroll(station, victim, "victim-1", tmp_path, "thief")          # with the stolen cert and key
    thief_renewed = reenroll(station, thief, "victim-1", tmp_path, "thief2")  # the thief's own renewal
    stolen = serial_in(victim)
    assert station.ledger().get(serial_in(thief)).predecessor == stolen  # type: ignore[union-attr]

    out = station.cli("revoke", stolen, "--reason", "keyCompromise")
    assert serial_in(thief) in out.stdout and serial_in(thief_renewed) in out.stdout, out.stdout
    for creds in (victim, thief, thief_renewed):
        with pytest.raises(EnrollmentError) as refused:
            reenroll(station, creds, "victim-1", tmp_path, "again")
        assert refused.value.status == 403 and "cannot re-enroll" in str(refused.value), str(refused.value)
    assert len(station.rows("victim-1")) == 3
    listed = crl_serials(station, tmp_path)
    for creds in (victim, thief, thief_renewed):
        assert listed[serial_in(creds)] == x509.ReasonFlags.key_compromise


@pytest.fixture
def roomy(station_dir: Path) -> Iterator[RunningStation]:
    """A station whose devices may hold 5 certificates, so only use (not the cap) supersedes."""
    set_settings(station_dir, max_valid_certs=5)
    running = start_station(station_dir)
    try:
        yield running
    finally:
        running.proc.stop()


def test_a_used_successor_supersedes_its_predecessor_on_the_crl(tmp_path: Path, roomy: RunningStation) -> None:
    station = roomy
    first = enroll(station, "renewer-1", tmp_path, "first")
    second = reenroll(station, first, "renewer-1", tmp_path, "second")
    assert serial_in(first) not in crl_serials(station, tmp_path)  # the device may not have stored `second` yet
    third = reenroll(station, second, "renewer-1", tmp_path, "third")  # `second` is in use: `first` is done
    listed = crl_serials(station, tmp_path)
    assert listed[serial_in(first)] == x509.ReasonFlags.superseded
    assert serial_in(second) not in listed and serial_in(third) not in listed
    with pytest.raises(EnrollmentError) as refused:
        reenroll(station, first, "renewer-1", tmp_path, "old")
    assert refused.value.status == 403 and "superseded" in str(refused.value)


def test_revoke_device_revokes_every_certificate_it_holds(tmp_path: Path, station: RunningStation) -> None:
    first = enroll(station, "gone-1", tmp_path, "first")
    second = reenroll(station, first, "gone-1", tmp_path, "second")
    other = enroll(station, "stays-1", tmp_path, "other")
    out = station.cli("revoke", "--device", "gone-1", "--reason", "cessationOfOperation")
    assert serial_in(first) in out.stdout and serial_in(second) in out.stdout
    listed = crl_serials(station, tmp_path)
    assert {serial_in(first), serial_in(second)} <= set(listed) and serial_in(other) not in listed
    refused = station.cli("revoke", "--device", "gone-1", check=False)
    assert refused.returncode == 1 and "already revoked" in refused.stderr
    both = station.cli("revoke", serial_in(other), "--device", "stays-1", check=False)
    assert both.returncode == 1 and "either a SERIAL or --device" in both.stderr
