"""Issue 13 case 7: one device-id rule (provisioning.identity.check_device_id) applied by the station
(OTP issue and enrollment), the agent (config load) and the lab (before any directory is made):
no '.' or '..' (SPIFFE path segments, directory traversal), no service identity of the lab (whose
ACL reads every device's topics), reserved names configurable on the station."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lab.core import Lab
from provisioning import ProvisioningError
from provisioning.identity import RESERVED_IDS, check_device_id
from tests.conftest import REPO, run_tether, write_config
from tests.security.stationbed import csr_body, post_enroll, set_settings
from tests.station.conftest import RunningStation, start_station, station_cli

BAD = [".", "..", "tether-token-service", "tether-ota-service", "a/b", "a:b", "", "x" * 65, "dev\n1"]


@pytest.mark.parametrize("device_id", BAD)
def test_the_rule_refuses_each_bad_id_naming_where_and_why(device_id: str) -> None:
    with pytest.raises(ProvisioningError, match="DEVICE_ID: "):
        check_device_id(device_id, "DEVICE_ID")


def test_the_lab_brokers_trust_exactly_the_station_s_configured_reserved_ids(tmp_path: Path) -> None:
    """Issue 26 item 4: an observer that reads device topics is a reserved id in station.toml, not a
    name in code; the lab's mosquitto ACL and its RabbitMQ auth answers both follow the setting."""
    from lab.rabbitauth import Decider

    lab = Lab(tmp_path / "lab")
    station_cli("init", "--dir", str(lab.station_dir))
    assert lab.services == set(RESERVED_IDS)
    set_settings(lab.station_dir, reserved_ids="tether-token-service,tether-ota-service,fleet-observer")
    assert lab.services == {"tether-token-service", "tether-ota-service", "fleet-observer"}
    broker = lab._start_broker(0)  # the ACL the lab's mosquitto really runs with
    try:
        assert "user fleet-observer\ntopic readwrite #" in (broker.directory / f"{broker.name}.acl").read_text()
    finally:
        broker.stop()
    read_all = {"username": "fleet-observer", "vhost": "/", "name": "amq.topic", "routing_key": "#"}
    assert Decider(services=lab.services).answer("topic", read_all) == "allow"
    assert Decider(services=set(RESERVED_IDS)).answer("topic", read_all) == "deny"


@pytest.mark.parametrize("device_id", [".", "..", "tether-ota-service"])
def test_the_station_issues_no_otp_for_a_bad_id(device_id: str, station_dir: Path) -> None:
    out = station_cli("otp", device_id, "--dir", str(station_dir), check=False)
    assert out.returncode == 1 and "DEVICE_ID" in out.stderr and out.stdout == "", out.stderr


@pytest.mark.parametrize("device_id", ["..", "tether-token-service"])
def test_the_station_refuses_to_enroll_a_bad_id(device_id: str, station: RunningStation) -> None:
    answer = post_enroll(station, device_id, "some-password", body=csr_body("dev-ok"))
    assert answer.status == 401 and "HTTP Basic user (the device id)" in answer.body, answer
    assert [r for r in station.ledger().rows() if r.device_id == device_id] == []


def test_reserved_ids_are_configured_on_the_station(station_dir: Path) -> None:
    set_settings(station_dir, reserved_ids="tether-token-service,tether-ota-service,factory-admin")
    out = station_cli("otp", "factory-admin", "--dir", str(station_dir), check=False)
    assert out.returncode == 1 and "reserved" in out.stderr
    running = start_station(station_dir, workers=1)
    try:
        answer = post_enroll(running, "factory-admin", "x", body=csr_body("factory-admin"))
        assert answer.status == 401 and "reserved" in answer.body
    finally:
        running.proc.stop()
    set_settings(station_dir, reserved_ids="")  # an operator may free the lab's names (a real platform)
    assert station_cli("otp", "tether-ota-service", "--dir", str(station_dir)).stdout.strip()


@pytest.mark.parametrize("device_id", ["..", "tether-token-service"])
def test_the_agent_refuses_a_config_with_a_bad_id(device_id: str, tmp_path: Path) -> None:
    config = write_config(tmp_path, device_id)
    out = run_tether("config", "show", config=config)
    assert out.returncode != 0 and "[device] id" in out.stderr, out.stderr
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize("device_id", ["..", "../../escape", "tether-ota-service"])
def test_the_lab_validates_the_id_before_making_any_directory(device_id: str, tmp_path: Path) -> None:
    lab_root = tmp_path / "lab"
    lab_root.mkdir()
    out = subprocess.run([sys.executable, "-m", "lab.cli", "device", "--dir", str(lab_root), device_id],
                         capture_output=True, text=True, check=False, timeout=60, cwd=REPO)
    assert out.returncode == 1 and "DEVICE_ID" in out.stderr, out.stderr
    # and the library call used by tests and the demo, without a running lab
    with pytest.raises(ProvisioningError):
        Lab(lab_root).device(device_id)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["lab"]


def test_a_service_identity_is_issued_only_on_purpose(station_dir: Path, tmp_path: Path) -> None:
    """`issue` refuses a reserved name as a device; `issue --service` makes it, and only for reserved names."""
    args = ["--dir", str(station_dir)]
    refused = station_cli("issue", "tether-ota-service", "--out", str(tmp_path / "a"), *args, check=False)
    assert refused.returncode == 1 and "reserved" in refused.stderr
    not_reserved = station_cli("issue", "pump-1", "--service", "--out", str(tmp_path / "b"), *args, check=False)
    assert not_reserved.returncode == 1 and "not one of station.toml reserved_ids" in not_reserved.stderr
    station_cli("issue", "tether-ota-service", "--service", "--out", str(tmp_path / "c"), *args)
    listed = station_cli("ledger", "list", "--kind", "service", *args).stdout
    assert "tether-ota-service" in listed and not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_offline_signing_refuses_a_csr_for_a_reserved_id(station_dir: Path, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.serialization import Encoding

    from hal.keys.file import generate
    from provisioning.identity import spiffe_id
    from tests.pki import TRUST_DOMAIN
    from tests.security.test_station import csr_with

    # build_csr applies the rule itself, so this CSR is made by hand, as a hostile client would
    csr = csr_with(generate("ec-p256"), "tether-ota-service", [spiffe_id(TRUST_DOMAIN, "tether-ota-service")])
    path = tmp_path / "svc.csr"
    path.write_bytes(csr.public_bytes(Encoding.PEM))
    out = station_cli("sign", str(path), "--dir", str(station_dir), check=False)
    assert out.returncode == 1 and "reserved" in out.stderr and "BEGIN CERTIFICATE" not in out.stdout


def test_an_id_rabbitmq_cannot_carry_gets_no_otp_and_no_certificate_and_the_reason_says_why(
        station: RunningStation) -> None:
    """Issue 26: RabbitMQ's MQTT plugin reads '.' as a topic level separator, so device 'a.b' would
    get no token or operation there and device 'a' could read its topics (tests/integration/
    test_rabbitmq.py shows it on the real broker): the station gives out no such id."""
    out = station.cli("otp", "pump.7", check=False)
    assert out.returncode == 1 and out.stdout == "", out.stderr
    assert "DEVICE_ID: 'pump.7' contains '.', which RabbitMQ" in out.stderr and "\n" not in out.stderr.strip()
    answer = post_enroll(station, "pump.7", "some-password", body=csr_body("pump-7"))
    assert answer.status == 401 and "RabbitMQ" in answer.body, answer
    assert [r for r in station.ledger().rows() if r.device_id == "pump.7"] == []


def test_a_device_that_already_holds_a_dotted_id_still_loads_its_config(tmp_path: Path) -> None:
    """Ids with '.' were given out before the RabbitMQ limit was known; such a device keeps working on
    the brokers that carry it (mosquitto, amqtt), so the agent does not refuse its own id."""
    out = run_tether("config", "show", config=write_config(tmp_path, "pump.7"))
    assert out.returncode == 0, out.stderr
    with pytest.raises(ProvisioningError, match="RabbitMQ"):
        check_device_id("pump.7", "DEVICE_ID")
    assert check_device_id("pump.7", "DEVICE_ID", carried_by=("mosquitto", "amqtt")) == "pump.7"
