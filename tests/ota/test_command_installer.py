"""The `command` installer: a vendor script as an argv template, its exit status and last line as the result."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.core.smartrest import parse_line
from hal.slots import SlotError
from hal.slots.command import check_template, command_slots
from lab.procs import Proc
from tests.ota.conftest import Releases, op_line
from tests.ota.frameworks import Bed, hold_script, start_updater, wait_for
from tests.ota.test_swupdate import reboot, run_to_restart


def publish_image(bed: Bed, version: str, image: bytes) -> str:
    return bed.device.releases.publish(version, image)


def test_vendor_script_installs_and_the_commit_hook_runs(command_bed: Callable[..., Bed]) -> None:
    bed = command_bed()
    image = os.urandom(150_000)
    url = publish_image(bed, "1.1.0", image)
    assert run_to_restart(bed, url, "1.1.0") == "restarting", bed.device.lines
    assert bed.image("b").read_bytes() == image and bed.image("a").read_bytes() == b"factory a"
    assert bed.invocations()[0].endswith(" b 1.1.0") and "download/bundle-b" in bed.invocations()[0]
    assert "on trial" in reboot(bed)
    bed.device.agents[-1].on_session_up()
    bed.device.wait_state("committed")
    assert bed.device.lines[-2:] == ["503,c8y_Firmware", f"115,app,1.1.0,{url}"]
    assert bed.invocations()[-1] == "commit b"
    assert bed.env()["upgrade_available"] == "0"


def test_vendor_install_that_never_comes_online_is_rolled_back_and_the_hook_hears_it(
        command_bed: Callable[..., Bed]) -> None:
    bed = command_bed(commit_deadline=0.5)
    url = publish_image(bed, "1.1.0", os.urandom(10_000))
    assert run_to_restart(bed, url, "1.1.0") == "restarting"
    assert "on trial" in reboot(bed)
    bed.device.wait_state("rolled_back")
    assert bed.invocations()[-1] == "rollback b"  # the tool heard it while the new slot still ran
    assert bed.env()["tether_slot"] == "a"
    bed.device.agent().on_boot()
    bed.device.agents[-1].on_session_up()
    assert "did not reach a live session within 0.5 s" in parse_line(bed.device.failures()[-1])[2]


def test_failing_vendor_script_reports_its_exit_status_and_last_line(command_bed: Callable[..., Bed]) -> None:
    bed = command_bed(body='echo "erasing"\necho "flash write error at block 7" >&2\nexit 4\n')
    url = publish_image(bed, "1.1.0", os.urandom(10_000))
    assert run_to_restart(bed, url, "1.1.0") == "failed"
    reason = parse_line(bed.device.failures()[0])[2]
    assert reason == "vendor-install failed with exit status 4: flash write error at block 7"
    assert bed.env()["tether_slot"] == "a" and bed.device.restarts == 0


def test_tampered_bundle_never_reaches_the_vendor_script(command_bed: Callable[..., Bed],
                                                         releases: Releases) -> None:
    bed = command_bed()
    url = publish_image(bed, "1.1.0", os.urandom(50_000))
    payload = releases.payload("app", "1.1.0")
    payload.write_bytes(payload.read_bytes()[:-1] + b"!")
    assert run_to_restart(bed, url, "1.1.0") == "failed"
    assert "SHA-256" in parse_line(bed.device.failures()[0])[2]
    assert bed.invocations() == []


def test_power_cut_while_the_vendor_script_runs_keeps_the_old_slot(command_bed: Callable[..., Bed],
                                                                   procs: list[Proc], tmp_path: Path) -> None:
    hold = hold_script(tmp_path / "hold.sh", tmp_path / "installing")
    bed = command_bed(body=f'cp "$1" "{tmp_path}/device/disk/slot-$2.img"\nsh "{hold}"\n')
    marker = tmp_path / "installing"
    url = publish_image(bed, "1.1.0", os.urandom(50_000))
    proc = start_updater(bed, procs, "run", op_line(url, "1.1.0"))
    wait_for(marker, proc, "the vendor script to be half-way")
    proc.kill()
    agent = bed.device.agent()
    assert "interrupted while installing" in agent.on_boot()
    agent.on_session_up()
    assert "interrupted while installing app 1.1.0 into slot b" in parse_line(bed.device.failures()[0])[2]
    assert bed.env()["tether_slot"] == "a"


@pytest.mark.parametrize(("template", "message"), [
    ("", "install_command is empty"),
    ("vendor-install '{file}", "No closing quotation"),
    ("vendor-install {file} {partition}", "unknown placeholder(s) partition"),
    ("vendor-install --latest", "must contain {file}"),
])
def test_bad_install_command_is_refused_naming_the_key(template: str, message: str) -> None:
    with pytest.raises(SlotError, match=r"\[ota\] install_command") as err:
        check_template(template, "install_command", ("file",))
    assert message in str(err.value)


def test_command_backend_without_install_command_says_what_to_set(tmp_path: Path) -> None:
    with pytest.raises(SlotError, match=r"\[ota\] install_command is empty"):
        command_slots(tmp_path, env_config=tmp_path / "fw_env.config")
