"""The `swupdate` installer with Debian's real `swupdate -i`: signed .swu from the station, raw images into
file-backed partitions, the switch in the file-backed U-Boot environment, progress from SWUpdate's socket."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from agent.core.smartrest import parse_line
from lab.procs import Proc, wait_until
from provisioning.release import create_release_signer
from tests.ota.conftest import Releases, op_line
from tests.ota.frameworks import Bed, hold_script, start_updater, swupdate_source, wait_for
from tests.pki import Pki


def run_to_restart(bed: Bed, url: str, version: str) -> str:
    """Boot, session up, the operation; return the state the work thread ended in (restarting or failed)."""
    device = bed.device
    agent = device.agent()
    agent.on_boot()
    agent.on_session_up()
    assert agent.on_operation(op_line(url, version))
    device.wait_state("restarting", "failed", timeout=60)
    assert agent.join(30)
    return str(device.state()["state"])


def reboot(bed: Bed) -> str:
    """Power-on: U-Boot counts the trial boot, then the agent of the new version starts."""
    bed.device.uboot_boot()
    return bed.device.agent().on_boot()


def test_swu_update_installs_with_swupdate_and_commits(swupdate_bed: Callable[..., Bed]) -> None:
    bed = swupdate_bed(health_command="true")
    image = os.urandom(300_000)
    url = bed.publish("1.1.0", "swu", swupdate_source(bed, "src-1.1.0", image))
    assert run_to_restart(bed, url, "1.1.0") == "restarting", bed.device.lines
    assert bed.image("b").read_bytes() == image          # SWUpdate wrote the inactive partition...
    assert bed.image("a").read_bytes() == b"factory a"   # ...and only that one
    [invocation] = bed.invocations()
    assert "-e stable,b" in invocation and "-N 1.0.0" in invocation  # anti-rollback floor handed to SWUpdate
    installing = [parse_line(line)[2] for line in bed.device.lines if line.startswith("400,") and "installing" in line]
    assert installing[0] == "app 1.1.0: installing with SWUpdate", bed.device.lines
    assert bed.env()["tether_slot"] == "b" and bed.env()["upgrade_available"] == "1"

    assert "on trial" in reboot(bed)
    bed.device.agents[-1].on_session_up()
    bed.device.wait_state("committed")
    assert bed.device.lines[-2:] == ["503,c8y_Firmware", f"115,app,1.1.0,{url}"]
    assert bed.env()["upgrade_available"] == "0" and bed.env()["tether_version_b"] == "1.1.0"
    assert bed.device.lines.count("503,c8y_Firmware") == 1


def test_swu_update_that_fails_its_health_check_rolls_back(swupdate_bed: Callable[..., Bed]) -> None:
    bed = swupdate_bed(health_command="sh -c 'echo database unreachable; exit 3'")
    url = bed.publish("1.1.0", "swu", swupdate_source(bed, "src", os.urandom(100_000)))
    assert run_to_restart(bed, url, "1.1.0") == "restarting", bed.device.lines
    assert "on trial" in reboot(bed)
    bed.device.agents[-1].on_session_up()
    bed.device.wait_state("rolled_back")
    reason = parse_line(bed.device.failures()[-1])[2]
    assert "failed its health check" in reason and "exited with status 3: database unreachable" in reason
    assert "rolled back to 1.0.0 in slot a" in reason
    assert bed.env()["tether_slot"] == "a" and bed.env()["upgrade_available"] == "0"
    assert bed.device.restarts == 2  # into the new version, and back
    assert bed.device.state()["installed"]["version"] == "1.0.0"
    assert len(bed.device.failures()) == 1 and "503,c8y_Firmware" not in bed.device.lines


def test_tampered_swu_is_refused_before_swupdate_runs(swupdate_bed: Callable[..., Bed],
                                                       releases: Releases) -> None:
    bed = swupdate_bed()
    url = bed.publish("1.1.0", "swu", swupdate_source(bed, "src", os.urandom(100_000)))
    payload = releases.payload("app", "1.1.0")
    data = bytearray(payload.read_bytes())
    data[-2000] ^= 0x01  # inside the image: SWUpdate would catch it too, but must never see it
    payload.write_bytes(bytes(data))
    assert run_to_restart(bed, url, "1.1.0") == "failed"
    assert "SHA-256" in parse_line(bed.device.failures()[0])[2]
    assert bed.invocations() == []  # swupdate was never started
    assert bed.image("b").read_bytes() == b"factory b"


def test_downgrade_is_refused_before_any_byte_is_fetched(swupdate_bed: Callable[..., Bed],
                                                         releases: Releases) -> None:
    bed = swupdate_bed()
    url = bed.publish("0.9.0", "swu", swupdate_source(bed, "src", os.urandom(10_000)))
    served_before = len(releases.server.log)
    assert run_to_restart(bed, url, "0.9.0") == "failed"
    assert "lower than the installed 1.0.0" in parse_line(bed.device.failures()[0])[2]
    assert releases.server.log[served_before:] == []  # not even the manifest was asked for
    assert bed.invocations() == []


def test_swupdate_refusal_is_reported_with_swupdates_own_reason(swupdate_bed: Callable[..., Bed],
                                                                releases: Releases, tmp_path: Path) -> None:
    """The manifest is the station's, but sw-description was signed by a key SWUpdate does not trust."""
    from provisioning.release import sign_release

    bed = swupdate_bed()
    rogue = Pki.create(tmp_path / "rogue", "Rogue")
    create_release_signer(rogue.issuing, tmp_path / "rogue-signer", chain=[rogue.root.cert])
    bed.publish("1.1.0", "swu", swupdate_source(bed, "src", os.urandom(10_000)), signer_dir=tmp_path / "rogue-signer")
    out = releases.www / "app" / "1.1.0"
    bundle = tmp_path / "rogue.swu"
    bundle.write_bytes((out / "payload").read_bytes())
    sign_release(releases.signer_dir, "app", "1.1.0", bundle, out)
    assert run_to_restart(bed, releases.server.url("app/1.1.0/"), "1.1.0") == "failed"
    reason = parse_line(bed.device.failures()[0])[2]
    assert reason.startswith("SWUpdate refused the bundle (exit status 1): ")
    assert "Authentication of all signatures failed" in reason
    assert bed.env()["tether_slot"] == "a" and bed.image("b").read_bytes() == b"factory b"


def test_power_cut_while_swupdate_installs_keeps_the_old_slot(swupdate_bed: Callable[..., Bed],
                                                              procs: list[Proc]) -> None:
    bed = swupdate_bed()
    marker = bed.directory / "installing"
    hold = hold_script(bed.tmp / "hold.sh", marker)
    url = bed.publish("1.1.0", "swu", swupdate_source(bed, "src", os.urandom(200_000), scripts={"hold.sh": hold}))
    proc = start_updater(bed, procs, "run", op_line(url, "1.1.0"))
    wait_for(marker, proc, "SWUpdate to run the bundle's script, mid-install")
    assert bed.device.state()["state"] == "installing"
    proc.kill()  # power cut: the agent, swupdate and its script die together

    agent = bed.device.agent()
    assert "interrupted while installing" in agent.on_boot()
    assert bed.env()["tether_slot"] == "a" and bed.device.restarts == 0
    agent.on_session_up()
    reason = parse_line(bed.device.failures()[0])[2]
    assert "interrupted while installing app 1.1.0 into slot b" in reason
    assert bed.device.state()["installed"]["version"] == "1.0.0"


def test_swu_goes_through_a_running_swupdate_daemon_with_swupdate_client(
        swupdate_bed: Callable[..., Bed], pki: Pki, procs: list[Proc]) -> None:
    """When SWUpdate runs as a daemon (it owns the IPC socket), the installer is its client."""
    from tests.conftest import require_tool
    from tests.ota.frameworks import swupdate_anchors

    bed = swupdate_bed(install_command=f"{require_tool('swupdate-client')} -e stable,{{slot}} {{file}}")
    daemon = Proc("swupdate-daemon", [require_tool("swupdate"), "-H", "tether-test:1.0", "-k",
                                      str(swupdate_anchors(pki, bed.directory)), "--cert-purpose", "codeSigning",
                                      "-N", "1.0.0", "-q", "stable,a", "-q", "stable,b"],
                  bed.directory / "swupdate-daemon.log")
    procs.append(daemon)
    socket_path = Path(os.environ["TMPDIR"]) / "sockinstctrl"
    wait_for(socket_path, daemon, "the SWUpdate daemon's IPC socket")
    image = os.urandom(100_000)
    url = bed.publish("1.1.0", "swu", swupdate_source(bed, "src", image))
    assert run_to_restart(bed, url, "1.1.0") == "restarting", bed.device.lines
    assert bed.image("b").read_bytes() == image and bed.env()["tether_slot"] == "b"
    # SWUpdate's own verdict, its first: "Installation in progress" is logged before a failure too
    verdict = wait_until(lambda: next((line for line in daemon.log.read_text().splitlines()
                                       if "SWUPDATE successful" in line or "SWUPDATE failed" in line), None),
                         30, "SWUpdate's verdict in the daemon's log", describe=daemon.log.read_text)
    assert "SWUPDATE successful !" in str(verdict) and "SWUPDATE failed" not in daemon.log.read_text(), verdict
