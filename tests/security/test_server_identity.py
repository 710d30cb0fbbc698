"""The device refuses a broker it cannot authenticate: `tether check` (the same path as `tether run`)
against real mosquitto brokers whose certificates are wrong in one way each, and the precise reason
in its timeline. tests/integration/test_runtime.py shows `tether run` reports the first two in its
status file too."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from lab.mosquitto import BrokerFiles, Mosquitto
from tests.agent_bed import provisioned_device
from tests.conftest import run_tether
from tests.pki import Pki, now
from tests.security.conftest import check_output

DAY = dt.timedelta(days=1)


def broker_files(case: str, tmp_path: Path, pki: Pki) -> BrokerFiles:
    """The broker trusts the device's CA in every case; only its own certificate varies."""
    if case == "wrong-ca":
        other = Pki.create(tmp_path / "other-pki", "Other")
        cert, key = other.server_files("stranger")
    elif case == "hostname-mismatch":
        cert, key = pki.server_files("misnamed", dns=("core.example",), ips=())
    elif case == "expired":
        cert, key = pki.server_files("expired", not_before=now() - 2 * DAY, lifetime=DAY)
    elif case == "not-yet-valid":
        cert, key = pki.server_files("early", not_before=now() + DAY, lifetime=DAY)
    else:
        cert, key = pki.server_files("good")
    return BrokerFiles(pki.ca_chain_file, cert, key)


@pytest.mark.parametrize(("case", "reason"), [
    ("wrong-ca", "unknown CA"),
    ("hostname-mismatch", "hostname mismatch"),
    ("expired", "server certificate expired"),
    ("not-yet-valid", "server certificate not yet valid"),
])
def test_device_refuses_a_broker_certificate_that_does_not_verify(case: str, reason: str, tmp_path: Path,
                                                                  pki: Pki) -> None:
    broker = Mosquitto(tmp_path / case, broker_files(case, tmp_path, pki), name=case).start()
    try:
        config = provisioned_device(tmp_path, pki, token={"enabled": False},
                                    endpoints={"urls": [f"mqtts://localhost:{broker.port}"]})
        out = run_tether("check", config=config)
        assert out.returncode == 1, check_output(out)
        failed = [line for line in out.stdout.splitlines() if "FAIL  connect" in line]
        assert len(failed) == 1 and reason in failed[0], check_output(out)
        assert "PASS" not in out.stdout
        # the device aborted in the handshake: no MQTT session ever existed
        assert "New client connected" not in broker.log()
    finally:
        broker.stop()


def test_the_same_device_connects_to_a_broker_whose_certificate_verifies(tmp_path: Path, pki: Pki) -> None:
    """The control for the refusals above: the bed itself is sound."""
    broker = Mosquitto(tmp_path / "good", broker_files("good", tmp_path, pki), name="good").start()
    try:
        config = provisioned_device(tmp_path, pki, token={"enabled": False},
                                    endpoints={"urls": [f"mqtts://localhost:{broker.port}"]})
        out = run_tether("check", config=config)
        assert out.returncode == 0 and "PASS: dev-001" in out.stdout, check_output(out)
    finally:
        broker.stop()
