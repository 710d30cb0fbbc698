"""The `rauc` installer with Debian's real RAUC: `rauc bundle` at the station, `rauc install` through the
RAUC service on a private D-Bus bus, file-backed slots, scripts/rauc-fwenv-backend.sh as the bootloader."""

from __future__ import annotations

import os
from collections.abc import Callable

from agent.core.smartrest import parse_line
from lab.procs import Proc
from tests.ota.conftest import Releases, op_line
from tests.ota.frameworks import RaucBed, hold_script, start_updater, wait_for
from tests.ota.test_swupdate import run_to_restart


def reboot(bed: RaucBed) -> str:
    """Power-on: U-Boot counts a trial boot (falls back past bootlimit), RAUC starts, then the agent."""
    bed.device.uboot_boot()
    bed.start_service()
    return bed.device.agent().on_boot()


def test_raucb_update_installs_with_rauc_and_commits_with_mark_good(rauc_bed: Callable[..., RaucBed]) -> None:
    bed = rauc_bed()
    image = os.urandom(300_000)
    url = bed.publish("1.1.0", "raucb", bed.raucb_source("src", image))
    assert run_to_restart(bed, url, "1.1.0") == "restarting", bed.device.lines
    assert bed.image("b").read_bytes() == image and bed.image("a").read_bytes() == b"factory a"
    assert bed.env()["tether_slot"] == "b" and bed.env()["upgrade_available"] == "1"  # RAUC switched, on trial
    progress = [parse_line(line)[2] for line in bed.device.lines if line.startswith("400,") and "installing" in line]
    assert progress and progress[-1].startswith("app 1.1.0: installing: 100%"), bed.device.lines

    assert "on trial" in reboot(bed)
    assert bed.device.state()["slots"]["trial"] is True
    bed.device.agents[-1].on_session_up()
    bed.device.wait_state("committed")
    assert bed.device.lines[-2:] == ["503,c8y_Firmware", f"115,app,1.1.0,{url}"]
    assert bed.env()["tether_state_b"] == "good" and bed.env()["upgrade_available"] == "0"  # rauc mark-good
    status = bed.device.state()["slots"]
    assert status["active"] == "b" and status["trial"] is False and status["versions"]["b"] == "1.1.0"


def test_raucb_update_that_fails_its_health_check_is_marked_bad(rauc_bed: Callable[..., RaucBed]) -> None:
    bed = rauc_bed(health_command="sh -c 'echo no route to the PLC; exit 1'")
    url = bed.publish("1.1.0", "raucb", bed.raucb_source("src", os.urandom(50_000)))
    assert run_to_restart(bed, url, "1.1.0") == "restarting", bed.device.lines
    assert "on trial" in reboot(bed)
    bed.device.agents[-1].on_session_up()
    bed.device.wait_state("rolled_back")
    reason = parse_line(bed.device.failures()[-1])[2]
    assert "failed its health check" in reason and "no route to the PLC" in reason
    env = bed.env()
    assert env["tether_slot"] == "a" and env["upgrade_available"] == "0"  # rauc mark-active a
    assert env["tether_state_b"] == "bad"                                   # rauc mark-bad b
    assert bed.device.restarts == 2  # into the new version, and back
    assert reboot(bed).startswith("no update pending")  # back on slot a: nothing left to decide or report
    assert bed.device.state()["slots"]["active"] == "a"


def test_tampered_raucb_never_reaches_rauc(rauc_bed: Callable[..., RaucBed], releases: Releases) -> None:
    bed = rauc_bed()
    url = bed.publish("1.1.0", "raucb", bed.raucb_source("src", os.urandom(50_000)))
    payload = releases.payload("app", "1.1.0")
    data = bytearray(payload.read_bytes())
    data[100] ^= 0xFF
    payload.write_bytes(bytes(data))
    assert run_to_restart(bed, url, "1.1.0") == "failed"
    assert "SHA-256" in parse_line(bed.device.failures()[0])[2]
    assert "installing" not in bed.service_log()  # the RAUC service never got an install request
    assert bed.env()["tether_slot"] == "a"


def test_a_bundle_rauc_itself_refuses_fails_with_raucs_reason(rauc_bed: Callable[..., RaucBed]) -> None:
    # Signed by the release key and intact, so every check of ours passes; but built for another board,
    # which only RAUC knows: its refusal (exit status 1) must be the operation's reason, in its own words.
    bed = rauc_bed()
    url = bed.publish("1.1.0", "raucb", bed.raucb_source("src", os.urandom(50_000), compatible="another-board"))
    assert run_to_restart(bed, url, "1.1.0") == "failed", bed.device.lines
    failures = bed.device.failures()
    assert len(failures) == 1, bed.device.lines
    reason = parse_line(failures[0])[2]
    assert "RAUC refused the bundle (exit status 1)" in reason, reason
    assert "another-board" in reason and "tether-test" in reason, reason  # RAUC's compatible mismatch
    assert "installing" in bed.service_log()  # RAUC got the request: the refusal is its own
    assert bed.image("b").read_bytes() == b"factory b" and bed.env()["tether_slot"] == "a"
    assert bed.device.state()["slots"]["active"] == "a"


def test_raucb_downgrade_is_refused_before_the_download(rauc_bed: Callable[..., RaucBed],
                                                        releases: Releases) -> None:
    bed = rauc_bed()
    url = bed.publish("0.9.0", "raucb", bed.raucb_source("src", os.urandom(10_000)))
    before = len(releases.server.log)
    assert run_to_restart(bed, url, "0.9.0") == "failed"
    assert "refusing a downgrade" in parse_line(bed.device.failures()[0])[2]
    assert releases.server.log[before:] == []


def test_power_cut_after_rauc_switched_rolls_back_to_the_old_slot(rauc_bed: Callable[..., RaucBed],
                                                                  procs: list[Proc]) -> None:
    bed = rauc_bed()
    marker = bed.directory / "installing"
    bed.start_service(post_install=hold_script(bed.directory / "hold.sh", marker))
    url = bed.publish("1.1.0", "raucb", bed.raucb_source("src", os.urandom(100_000)))
    proc = start_updater(bed, procs, "run", op_line(url, "1.1.0"))
    wait_for(marker, proc, "RAUC's post-install handler (slot written and made primary)")
    assert bed.device.state()["state"] == "installing" and bed.env()["tether_slot"] == "b"
    proc.kill()           # power cut: the agent...
    bed.stop_service()    # ...and the RAUC service with its handler

    assert "interrupted while installing" in reboot(bed)  # U-Boot boots the new slot on trial...
    assert bed.device.restarts == 1                         # ...which the agent leaves at once
    assert bed.env()["tether_slot"] == "a" and bed.env()["tether_state_b"] == "bad"
    bed.device.agents[-1].on_session_up()
    reason = parse_line(bed.device.failures()[0])[2]
    assert "interrupted while installing app 1.1.0 into slot b" in reason
    reboot(bed)
    assert bed.device.state()["slots"]["active"] == "a" and len(bed.device.failures()) == 1
