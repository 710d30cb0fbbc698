"""Issue 26 item 2: re-enrollment where the server wants a password besides the client certificate.

libest's estserver, as shipped, answers `simplereenroll` with 401 until HTTP Basic comes too, even
after TLS client authentication succeeded (RFC 7030 3.2.3 allows it). The station can demand the same
(station.toml `reenroll_password_file`); the device sends it from `[est] reenroll_password_file`, and
without it a 401 ends renewal with one line naming that setting. Real station, real agent code, and
curl for the libest-style "TLS plus password" request.
"""

from __future__ import annotations

import base64
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from agent.config import load
from agent.errors import ConfigError
from agent.identity import DeviceIdentity
from agent.reenroll import basic_auth
from agent.renewal import Renewal
from provisioning import EnrollmentError
from provisioning.certs import load_certificates
from provisioning.station.ca import Station
from provisioning.station.errors import StationError
from tests.conftest import run_tether, write_config
from tests.station.conftest import RunningStation, start_station

PASSWORD = "estpwd-4b1d"


def private_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text + "\n")
    os.chmod(path, mode)
    return path


def demand_password(station_dir: Path) -> None:
    settings = station_dir / "station.toml"
    settings.write_text(settings.read_text().replace('reenroll_password_file = ""',
                                                     'reenroll_password_file = "reenroll.password"'))


@pytest.fixture
def demanding_station(station_dir: Path) -> Iterator[RunningStation]:
    """A station whose re-enrollment wants HTTP Basic (device id, PASSWORD) besides the client certificate."""
    private_file(station_dir / "reenroll.password", PASSWORD)
    demand_password(station_dir)
    running = start_station(station_dir)
    try:
        yield running
    finally:
        running.proc.stop()


def enrolled(tmp_path: Path, station: RunningStation, device_id: str, **est: str) -> Renewal:
    """A device enrolled with its one-time password, and its Renewal with `est` added to [est]."""
    otp_file = tmp_path / device_id / "otp"
    otp_file.parent.mkdir(parents=True)
    otp_file.write_text(station.otp(device_id) + "\n")
    config = write_config(tmp_path / device_id, device_id, keys={"backend": "file"},
                          est={"url": station.url, "ca_file": str(station.ca_file), "otp_file": str(otp_file), **est},
                          identity={"ca_file": str(station.ca_file)})
    out = run_tether("enroll", config=config)
    assert out.returncode == 0, out.stderr
    return Renewal(load(config), DeviceIdentity(load(config)))


def test_reenrollment_without_the_password_fails_with_one_line_naming_the_setting(
        tmp_path: Path, demanding_station: RunningStation) -> None:
    renewal = enrolled(tmp_path, demanding_station, "pw-none")
    with pytest.raises(EnrollmentError) as refused:
        renewal.renew_now()
    message = str(refused.value)
    assert refused.value.status == 401 and not refused.value.retryable
    assert "\n" not in message
    assert "set [est] reenroll_password_file" in message
    assert "station's re-enrollment password" in message  # the server's own reason is kept
    assert len(demanding_station.rows("pw-none")) == 1


def test_reenrollment_with_the_password_from_a_private_file_renews_and_never_logs_it(
        tmp_path: Path, demanding_station: RunningStation, caplog: pytest.LogCaptureFixture) -> None:
    password = private_file(tmp_path / "reenroll.password", PASSWORD)
    renewal = enrolled(tmp_path, demanding_station, "pw-good", reenroll_password_file=str(password))
    with caplog.at_level(logging.DEBUG):
        chain = renewal.renew_now()
    current = load_certificates((tmp_path / "pw-good" / "state" / "certs" / "chain.pem").read_bytes())[0]
    assert chain[0].serial_number != current.serial_number and chain[0].subject == current.subject
    assert len(demanding_station.rows("pw-good")) == 2
    assert PASSWORD not in caplog.text and PASSWORD not in repr(basic_auth(renewal.config, renewal.identity))


def test_a_wrong_password_is_refused_and_the_error_says_which_file_was_used(
        tmp_path: Path, demanding_station: RunningStation) -> None:
    password = private_file(tmp_path / "reenroll.password", "not-the-password")
    renewal = enrolled(tmp_path, demanding_station, "pw-wrong", reenroll_password_file=str(password))
    with pytest.raises(EnrollmentError) as refused:
        renewal.renew_now()
    assert "the password from [est] reenroll_password_file was refused" in str(refused.value)
    assert len(demanding_station.rows("pw-wrong")) == 1


def test_a_password_file_others_can_read_is_refused_naming_the_key(
        tmp_path: Path, demanding_station: RunningStation) -> None:
    password = private_file(tmp_path / "reenroll.password", PASSWORD, mode=0o644)
    renewal = enrolled(tmp_path, demanding_station, "pw-open", reenroll_password_file=str(password))
    with pytest.raises(ConfigError, match=r"\[est\] reenroll_password_file: .* readable by others .*chmod 600"):
        renewal.renew_now()
    assert len(demanding_station.rows("pw-open")) == 1


def test_curl_tls_plus_password_reenrolls_the_way_libest_clients_do(
        tmp_path: Path, demanding_station: RunningStation) -> None:
    renewal = enrolled(tmp_path, demanding_station, "pw-curl")
    state = tmp_path / "pw-curl" / "state"
    key = next((state / "keys").glob("*.pem"))
    csr = tmp_path / "csr.b64"
    csr.write_bytes(base64.b64encode(renewal.identity.csr().public_bytes(Encoding.DER)))

    def curl(*auth: str) -> str:
        out = subprocess.run(["curl", "--silent", "--show-error", "--cacert", str(demanding_station.ca_file),
                              "--cert", str(state / "certs" / "chain.pem"), "--key", str(key), *auth,
                              "-H", "Content-Type: application/pkcs10", "--data-binary", f"@{csr}",
                              "--output", "/dev/null", "--write-out", "%{http_code}",
                              f"{demanding_station.url}/.well-known/est/simplereenroll"],
                             capture_output=True, text=True, timeout=60, check=False)
        return out.stdout

    assert curl() == "401"
    assert curl("--user", f"pw-curl:{PASSWORD}x") == "401"
    assert curl("--user", f"someone-else:{PASSWORD}") == "401"
    assert curl("--user", f"pw-curl:{PASSWORD}") == "200"


def test_station_refuses_a_password_file_others_can_read(station_dir: Path) -> None:
    private_file(station_dir / "reenroll.password", PASSWORD, mode=0o640)
    demand_password(station_dir)
    with pytest.raises(StationError, match=r"reenroll_password_file: .* readable by others"):
        Station(station_dir).reenroll_password  # noqa: B018
