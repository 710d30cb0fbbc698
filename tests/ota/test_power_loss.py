"""Power cuts (SIGKILL of the updater's process) during download, during install and before commit.

Whatever the moment, the device boots a working slot, and the outcome reaches the platform once a
session is up again: the download resumes with Range, an install or an uncommitted version fails or
rolls back with a 502 naming what happened.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from agent.core.smartrest import parse_line
from lab.procs import Proc, wait_until
from tests.conftest import REPO
from tests.ota.conftest import Device, Releases, op_line


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        p.kill()


def start_updater(device: Device, procs: list[Proc], *args: str, env: dict[str, str] | None = None) -> Proc:
    key = device.releases.token_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption())
    (device.directory / "token.key").write_bytes(key)
    (device.directory / "marker").unlink(missing_ok=True)
    proc = Proc(f"updater-{len(procs)}", [sys.executable, "-m", "tests.ota.updater_proc", str(device.config_path),
                                          *args], device.directory / f"updater-{len(procs)}.log", env=env, cwd=REPO)
    procs.append(proc)
    return proc


def published(device: Device) -> list[str]:
    path = device.directory / "published.txt"
    return path.read_text().splitlines() if path.exists() else []


def wait_marker(device: Device, proc: Proc) -> None:
    def ready() -> bool:
        proc.check_alive()
        return (device.directory / "marker").exists()
    wait_until(ready, 20, "the updater to reach the moment of the power cut")


def test_power_loss_during_download_resumes_with_range_after_restart(device: Device, releases: Releases,
                                                                     procs: list[Proc]) -> None:
    url = releases.publish("1.1.0", bytes(range(256)) * 4096)  # 1 MiB
    size = releases.payload("app", "1.1.0").stat().st_size
    releases.server.faults.only = "/payload"
    releases.server.faults.stall_after = 300_000
    releases.server.faults.stall_times = -1  # every attempt stalls until the power cut, however slow the machine
    proc = start_updater(device, procs, "run", op_line(url, "1.1.0"))
    stage = device.agent().slots.stage("b")
    wait_until(lambda: proc.check_alive() or (stage.exists() and stage.stat().st_size >= 300_000), 20,
               "300 kB of the payload on disk")
    proc.kill()  # power cut in the middle of the download
    on_disk = stage.stat().st_size
    before = len(releases.server.served("/payload"))
    releases.server.faults.stall_after = None  # the network is fine after the reboot

    agent = device.agent()
    assert device.active() == "a" and device.running_app() == "app factory"
    assert "resumes when the session is up" in agent.on_boot()
    agent.on_session_up()
    device.wait_state("restarting", "failed")
    assert device.state()["state"] == "restarting", device.lines
    served = releases.server.served("/payload")[before:]
    assert served[0].range == f"bytes={on_disk}-" and served[0].status == 206
    assert sum(s.sent for s in served) == size - on_disk  # what was on disk is not fetched again
    assert published(device)[0] == "501,c8y_Firmware"


def test_power_loss_during_install_keeps_the_old_slot_and_reports_the_failure(device: Device, releases: Releases,
                                                                              procs: list[Proc]) -> None:
    url = releases.publish("1.1.0")
    proc = start_updater(device, procs, "run", op_line(url, "1.1.0"), env={"PAUSE_AT": "install"})
    wait_marker(device, proc)
    assert device.state()["state"] == "installing"
    proc.kill()

    agent = device.agent()
    assert "interrupted while installing" in agent.on_boot()
    assert device.active() == "a" and device.running_app() == "app factory"
    assert device.lines == []  # offline: nothing can be reported yet
    agent.on_session_up()
    reason = parse_line(device.failures()[0])[2]
    assert "interrupted while installing app 1.1.0 into slot b" in reason
    assert device.state()["installed"]["version"] == "1.0.0"


def test_power_loss_before_commit_rolls_back_on_the_next_boot(device: Device, releases: Releases,
                                                              procs: list[Proc]) -> None:
    url = releases.publish("1.1.0")
    start_updater(device, procs, "run", op_line(url, "1.1.0"))
    device.wait_state("restarting", "failed")
    wait_until(lambda: (device.directory / "restart-requested").exists(), 10, "the restart request")
    if device.backend == "uboot":
        device.uboot_boot()
    proc = start_updater(device, procs, "boot")  # the new version starts, on trial...
    wait_marker(device, proc)
    assert device.state()["state"] == "confirming" and device.active() == "b"
    proc.kill()  # ...and loses power before its session comes up
    if device.backend == "uboot":
        device.uboot_boot()  # bootcount 2 > bootlimit 1: U-Boot itself falls back to slot a

    agent = device.agent()
    assert "rolled back" in agent.on_boot()
    assert device.active() == "a" and device.running_app() == "app factory"
    agent.on_session_up()
    reason = parse_line(device.failures()[0])[2]
    assert "app 1.1.0" in reason and "rolled back to 1.0.0 in slot a" in reason
    status = device.state()
    assert status["state"] == "rolled_back" and status["reported"] and status["slots"]["trial"] is False
    assert status["installed"]["version"] == "1.0.0"


@pytest.mark.parametrize("device_factory", ["uboot"], indirect=True)  # only U-Boot falls back by itself
def test_bootloader_fallback_before_the_agent_starts_is_reported(device_factory, releases: Releases) -> None:
    device = device_factory()
    url = releases.publish("1.1.0")
    agent = device.agent()
    agent.on_operation(op_line(url, "1.1.0"))
    device.wait_state("restarting", "failed")
    device.uboot_boot()
    device.uboot_boot()  # the new kernel never reached user space twice: U-Boot boots slot a again
    assert "the new slot did not start" in device.agent().on_boot()
    device.agents[-1].on_session_up()
    assert "bootloader fell back" in device.failures()[-1]
    assert device.active() == "a"


def test_stage_file_names_are_inside_the_inactive_slot(device: Device) -> None:
    slots = device.agent().slots
    assert Path(slots.stage("b")).parent == Path(device.config.ota.slots_dir) / (
        "slot-b" if device.backend == "directory" else "")
