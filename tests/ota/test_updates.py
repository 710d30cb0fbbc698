"""OTA behaviour against a real HTTPS artifact server and real slots, both backends (in-process agent)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from agent.core.smartrest import parse_line
from tests.ota.conftest import Device, Releases, op_line
from tests.pki import Pki


def update_to_trial(device: Device, url: str, version: str) -> None:
    """Run an operation up to the restart, then start 'the new version' (a new agent) on trial."""
    agent = device.agent()
    assert agent.on_boot().startswith("no update pending")
    agent.on_session_up()
    assert agent.on_operation(op_line(url, version))
    device.wait_state("restarting", "failed")
    assert agent.join(10)
    assert device.state()["state"] == "restarting", device.lines
    assert device.restarts == 1
    if device.backend == "uboot":
        device.uboot_boot()
    assert "on trial" in device.agent().on_boot()


def test_update_commits_once_the_new_version_reaches_a_session(device: Device, releases: Releases) -> None:
    url = releases.publish("1.1.0")
    update_to_trial(device, url, "1.1.0")
    assert device.active() == "b"
    assert device.running_app() == "app 1.1.0"
    assert device.lines[0] == "501,c8y_Firmware"
    progress = [line for line in device.lines if line.startswith("400,c8y_FirmwareProgress")]
    assert progress and parse_line(progress[-1])[2].endswith("100%")

    device.agents[-1].on_session_up()
    assert device.lines[-2:] == ["503,c8y_Firmware", f"115,app,1.1.0,{url}"]
    status = device.state()
    assert status["state"] == "committed" and status["reported"]
    assert status["installed"] == {"name": "app", "version": "1.1.0", "floor": "1.1.0"}
    assert status["slots"]["trial"] is False and status["slots"]["versions"]["b"] == "1.1.0"
    # A session that comes back later does not report the same update twice.
    device.agents[-1].on_session_up()
    assert device.lines.count("503,c8y_Firmware") == 1


def test_operation_that_is_not_firmware_is_left_to_others(device: Device) -> None:
    assert device.agent().on_operation("511,dev-001,ls -l") is False
    assert device.lines == []


def run_failing(device: Device, url: str, version: str, active: str = "a", app: str = "app factory") -> str:
    """Run an operation that must fail; the active slot and what it runs must not change."""
    agent = device.agent()
    restarts = device.restarts
    agent.on_boot()
    agent.on_session_up()
    assert agent.on_operation(op_line(url, version))
    device.wait_state("failed", "restarting")
    assert agent.join(10)
    assert device.state()["state"] == "failed", device.lines
    assert device.active() == active
    assert device.running_app() == app
    assert device.restarts == restarts
    failures = device.failures()
    assert len(failures) == 1
    return parse_line(failures[0])[2]


def test_payload_with_one_flipped_bit_is_rejected(device: Device, releases: Releases) -> None:
    url = releases.publish("1.1.0")
    payload = releases.payload("app", "1.1.0")
    data = bytearray(payload.read_bytes())
    data[len(data) // 2] ^= 0x10
    payload.write_bytes(bytes(data))
    assert "SHA-256" in run_failing(device, url, "1.1.0")


def test_truncated_payload_is_rejected(device: Device, releases: Releases) -> None:
    url = releases.publish("1.1.0")
    payload = releases.payload("app", "1.1.0")
    payload.write_bytes(payload.read_bytes()[:-1000])
    assert "truncated" in run_failing(device, url, "1.1.0")


def test_manifest_signed_by_a_key_outside_the_station_ca_is_rejected(device: Device, releases: Releases,
                                                                     tmp_path: Path) -> None:
    from provisioning.release import create_release_signer

    rogue = Pki.create(tmp_path / "rogue", "Rogue")
    create_release_signer(rogue.issuing, tmp_path / "rogue-signer", chain=[rogue.root.cert])
    url = releases.publish("1.1.0", signer_dir=tmp_path / "rogue-signer")
    assert "does not chain to a trusted release authority" in run_failing(device, url, "1.1.0")
    assert releases.server.served("/payload") == []  # rejected before a payload byte moved


def test_manifest_signature_by_another_key_with_a_valid_signer_chain_is_rejected(device: Device,
                                                                                 releases: Releases,
                                                                                 tmp_path: Path) -> None:
    from provisioning.release import create_release_signer

    create_release_signer(releases.pki.issuing, tmp_path / "other-signer", chain=[releases.pki.root.cert])
    url = releases.publish("1.1.0", signer_dir=tmp_path / "other-signer")
    # keep the other signer's signature, present the official signer's certificate
    (releases.www / "app" / "1.1.0" / "signer.pem").write_bytes((releases.signer_dir / "release.pem").read_bytes())
    assert "signature does not verify" in run_failing(device, url, "1.1.0")


def test_replayed_older_release_is_refused_after_a_newer_commit(device: Device, releases: Releases) -> None:
    old_url = releases.publish("1.0.5")
    url = releases.publish("1.1.0")
    update_to_trial(device, url, "1.1.0")
    device.agents[-1].on_session_up()
    device.lines.clear()
    reason = run_failing(device, old_url, "1.0.5", active="b", app="app 1.1.0")
    assert "lower than the installed 1.1.0" in reason and "anti-rollback" in reason


def test_release_requiring_a_newer_installed_version_is_refused(device: Device, releases: Releases) -> None:
    url = releases.publish("2.0.0", min_version="1.5.0")
    assert "requires at least 1.5.0 installed" in run_failing(device, url, "2.0.0")


def test_url_that_404s_fails_with_the_status(device: Device, releases: Releases) -> None:
    reason = run_failing(device, releases.server.url("app/9.9.9/"), "9.9.9")
    assert "HTTP 404" in reason and "manifest.json" in reason


def test_url_that_stalls_fails_after_the_timeout(device_factory, releases: Releases) -> None:
    device = device_factory(download_timeout=0.5, download_attempts=2)
    url = releases.publish("1.1.0")
    releases.server.faults.only = "/payload"
    releases.server.faults.stall_after = 0
    reason = run_failing(device, url, "1.1.0")
    assert "stalled: no data for 0.5 s" in reason and "2 attempt(s)" in reason


def test_download_cut_midway_resumes_with_range(device: Device, releases: Releases) -> None:
    url = releases.publish("1.1.0", b"x" * 50_000 + bytes(range(256)) * 2000)
    size = releases.payload("app", "1.1.0").stat().st_size
    releases.server.faults.only = "/payload"
    releases.server.faults.drop_after = 100_000
    update_to_trial(device, url, "1.1.0")
    served = releases.server.served("/payload")
    assert [s.range for s in served] == [None, "bytes=100000-"]
    assert [s.status for s in served] == [200, 206]
    assert sum(s.sent for s in served) == size


def test_second_operation_while_one_runs_is_refused(device: Device, releases: Releases) -> None:
    url = releases.publish("1.1.0")
    releases.server.faults.only = "/payload"
    releases.server.faults.stall_after = 50_000
    releases.server.faults.stall_times = 1
    agent = device.agent()
    agent.on_boot()
    agent.on_session_up()
    assert agent.on_operation(op_line(url, "1.1.0"))
    from lab.procs import wait_until

    wait_until(lambda: releases.server.served("/payload") or agent.status()["progress"]["bytes"] >= 50_000
               or any(line.startswith("400,") for line in device.lines), 10, "the download to start")
    assert agent.on_operation(op_line(url, "1.2.0"))
    refusal = device.failures()
    assert len(refusal) == 1 and "refused app 1.2.0" in refusal[0] and "app 1.1.0 is in progress" in refusal[0]
    releases.server.release.set()
    device.wait_state("restarting")
    assert device.state()["operation"]["version"] == "1.1.0"


@pytest.mark.parametrize("deadline", [0.3])
def test_new_version_that_never_reaches_a_session_is_rolled_back_at_the_deadline(
        device_factory, releases: Releases, deadline: float) -> None:
    device = device_factory(commit_deadline=deadline)
    url = releases.publish("1.1.0")
    update_to_trial(device, url, "1.1.0")
    device.wait_state("rolled_back")
    assert device.restarts == 2  # once into the new version, once back
    assert device.active() == "a" and device.running_app() == "app factory"
    device.agent().on_boot()
    device.agents[-1].on_session_up()
    reason = parse_line(device.failures()[-1])[2]
    assert "did not reach a live session within 0.3 s" in reason
    assert device.state()["installed"]["version"] == "1.0.0"


def test_a_version_on_trial_waits_for_its_deadline_on_the_control_loop_without_a_thread(
        device: Device, releases: Releases) -> None:
    """The commit deadline is a time the loop wakes at (`wake_at`), not a timer thread: an updater with
    nothing to do but wait holds no thread of its own (the fleet benchmark counts threads per device)."""
    update_to_trial(device, releases.publish("1.1.0"), "1.1.0")
    deadline = device.state()["deadline"]
    assert device.agents[-1].wake_at() == deadline
    assert [t.name for t in threading.enumerate()
            if t.name.startswith("tether-ota") or isinstance(t, threading.Timer)] == []


def test_malformed_firmware_operation_is_reported(device: Device) -> None:
    assert device.agent().on_operation("515,dev-001,app,,https://x/")
    assert "515.version" in device.failures()[0]
