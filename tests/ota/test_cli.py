"""`tether ota status` through the real `tether` argument parser."""

from __future__ import annotations

import json

import pytest

from tests.ota.conftest import Device, Releases, op_line


def test_ota_status_json_reports_installed_version_and_slots(device: Device, releases: Releases,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from agent import cli
    from lab.procs import wait_until

    agent = device.agent()
    agent.on_operation(op_line(releases.publish("1.1.0"), "1.1.0"))
    device.wait_state("restarting")
    # "restarting" is persisted before the switch (a power cut there switches on the next boot): the
    # slots are read once the updater asked for its restart, which follows the switch
    wait_until(lambda: device.restarts == 1, 15, "the updater's restart request")
    assert cli.main(["--config", str(device.config_path), "ota", "status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert cli.main(["--config", str(device.config_path), "ota", "status"]) == 0
    text = capsys.readouterr().out
    assert status["state"] == "restarting" and status["installed"]["version"] == "1.0.0"
    assert status["operation"]["version"] == "1.1.0" and status["slots"]["active"] == "b"
    assert "state:      restarting" in text and "versions a=-, b=1.1.0" in text
