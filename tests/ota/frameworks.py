"""Test beds for the installer backends with the real frameworks: SWUpdate (`swupdate -i`), RAUC (its D-Bus
service on a private bus) and a vendor script (`command`), all writing file-backed "partitions", with the
boot switch in the file-backed U-Boot environment the A/B tests use. Fixtures are imported by the tests.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from hal.slots.uboot import UBootEnv, write_env_config, write_env_image
from lab.procs import Proc, wait_until
from provisioning.release import sign_bundle
from tests.conftest import REPO, require_tool, write_config
from tests.ota.conftest import DEVICE_ID, Device, Releases
from tests.pki import Pki

HWREVISION = "tether-test:1.0"


def script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def hold_script(path: Path, marker: Path) -> Path:
    """A hook that marks the moment and then blocks (on a FIFO nobody writes) until its process is killed."""
    fifo = path.with_suffix(".fifo")
    os.mkfifo(fifo)
    return script(path, f'touch "{marker}"\nread never < "{fifo}"\n')


@dataclass
class Bed:
    """A device with a real update framework: the Device (config, agents, published lines) plus its disk."""

    device: Device
    tmp: Path

    @property
    def directory(self) -> Path:
        return self.device.directory

    def image(self, slot: str) -> Path:
        """The file-backed "partition" of `slot`."""
        return self.directory / "disk" / f"slot-{slot}.img"

    def env(self) -> dict[str, str]:
        return UBootEnv(self.directory / "fw_env.config").env()

    def invocations(self) -> list[str]:
        log = self.directory / "invocations.log"
        return log.read_text().splitlines() if log.exists() else []

    def publish(self, version: str, fmt: str, source: Path, signer_dir: Path | None = None) -> str:
        releases = self.device.releases
        sign_bundle(signer_dir or releases.signer_dir, "app", version, fmt, source, releases.www / "app" / version)
        return releases.server.url(f"app/{version}/")


def new_bed(tmp_path: Path, releases: Releases, pki: Pki, backend: str, name: str = "device",
            **ota: Any) -> Bed:
    directory = tmp_path / name
    (directory / "disk").mkdir(parents=True)
    for slot in "ab":
        (directory / "disk" / f"slot-{slot}.img").write_bytes(b"factory " + slot.encode())
    write_env_image(directory / "uboot.env", {"tether_slot": "a", "tether_booted": "a", "tether_state_a": "good",
                                              "upgrade_available": "0", "bootcount": "0", "bootlimit": "1"})
    write_env_config(directory / "fw_env.config", directory / "uboot.env")
    settings: dict[str, Any] = {"slots": backend, "slots_dir": str(directory / "slots"),
                                "trust_anchor": str(pki.root_file), "ca_file": str(pki.ca_chain_file),
                                "commit_deadline": 60.0, "download_timeout": 2.0, "download_attempts": 3,
                                "base_version": "1.0.0",
                                "artifact_hosts": ["127.0.0.1"],  # the lab's artifact server gets the token
                                **ota}
    if backend != "rauc":  # RAUC's own bootloader backend reads the environment (TETHER_FW_ENV_CONFIG)
        settings.setdefault("uboot_env_config", str(directory / "fw_env.config"))
    device = Device(directory, write_config(directory, DEVICE_ID, ota=settings), backend, releases)
    return Bed(device, tmp_path)


# -- SWUpdate --------------------------------------------------------------------------------------------
def swupdate_anchors(pki: Pki, directory: Path) -> Path:
    """SWUpdate's `-k` file: the release CA. SWUpdate 2022.12 builds the signer's chain from this file only
    (not from the certificates inside the CMS signature), so the issuing CA goes in beside the root."""
    path = directory / "swupdate-ca.pem"
    path.write_bytes(pki.root_file.read_bytes() + pki.issuing.cert.public_bytes(serialization.Encoding.PEM))
    return path


def swupdate_source(bed: Bed, name: str, image: bytes, scripts: dict[str, Path] | None = None) -> Path:
    """A payload directory for `--format swu`: one raw image, one image set per slot (`-e stable,a|b`)."""
    src = bed.tmp / name
    src.mkdir()
    (src / "rootfs.img").write_bytes(image)
    entries = ""
    for script_name, path in (scripts or {}).items():
        (src / script_name).write_bytes(path.read_bytes())
        entries += (f'      scripts: ( {{ filename = "{script_name}"; type = "postinstall"; '
                    f'sha256 = "$swupdate_get_sha256({script_name})"; }} );\n')
    sets = "".join(
        f'    {slot} = {{\n      images: ( {{ filename = "rootfs.img"; type = "raw"; device = "{bed.image(slot)}"; '
        f'sha256 = "$swupdate_get_sha256(rootfs.img)"; }} );\n{entries}    }};\n' for slot in "ab")
    (src / "sw-description").write_text(
        'software =\n{\n  version = "@@VERSION@@";\n  hardware-compatibility = [ "1.0" ];\n'
        f"  stable = {{\n{sets}  }};\n}}\n")
    return src


@pytest.fixture
def swupdate_bed(tmp_path: Path, releases: Releases, pki: Pki, monkeypatch: pytest.MonkeyPatch
                 ) -> Iterator[Callable[..., Bed]]:
    """Devices whose installer is the real `swupdate` (through a wrapper that records each invocation)."""
    swupdate = require_tool("swupdate")
    tmpdir = tmp_path / "tmp"  # SWUpdate's IPC and progress sockets live in $TMPDIR: one per test
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    beds: list[Bed] = []

    def make(name: str = "device", **ota: Any) -> Bed:
        directory = tmp_path / name
        directory.mkdir()
        anchors = swupdate_anchors(pki, directory)
        wrapper = script(directory / "swupdate-wrapper", f'echo "$*" >> "{directory}/invocations.log"\n'
                                                         f'exec {swupdate} "$@"\n')
        command = (f"{wrapper} -l 3 -H {HWREVISION} -k {anchors} --cert-purpose codeSigning -e stable,{{slot}} "
                   "-N {floor} -i {file}")
        bed = new_bed(tmp_path, releases, pki, "swupdate", name, **{"install_command": command, **ota})
        beds.append(bed)
        return bed

    yield make
    for bed in beds:
        bed.device.close()


# -- command ---------------------------------------------------------------------------------------------
@pytest.fixture
def command_bed(tmp_path: Path, releases: Releases, pki: Pki) -> Iterator[Callable[..., Bed]]:
    """Devices whose installer is a vendor script: it copies the bundle into the slot's "partition"."""
    beds: list[Bed] = []

    def make(name: str = "device", body: str = "", **ota: Any) -> Bed:
        directory = tmp_path / name
        directory.mkdir()
        log = directory / "invocations.log"
        install = script(directory / "vendor-install", f'echo "install $*" >> "{log}"\n' + (body or (
            'echo "writing $1 to slot $2"\n'
            f'cp "$1" "{directory}/disk/slot-$2.img"\n'
            'echo "installed version $3"\n')))
        hook = script(directory / "vendor-hook", f'echo "$*" >> "{log}"\n')
        settings = {"install_command": f"{install} {{file}} {{slot}} {{version}}",
                    "commit_command": f"{hook} commit {{slot}}", "rollback_command": f"{hook} rollback {{slot}}",
                    **ota}
        bed = new_bed(tmp_path, releases, pki, "command", name, **settings)
        beds.append(bed)
        return bed

    yield make
    for bed in beds:
        bed.device.close()


# -- power cuts ------------------------------------------------------------------------------------------
def start_updater(bed: Bed, procs: list[Proc], *args: str, env: dict[str, str] | None = None) -> Proc:
    """The updater in its own process (tests/ota/updater_proc.py), so a test can SIGKILL it mid-install."""
    device = bed.device
    key = device.releases.token_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption())
    (device.directory / "token.key").write_bytes(key)
    proc = Proc(f"updater-{len(procs)}", [sys.executable, "-m", "tests.ota.updater_proc", str(device.config_path),
                                          *args], device.directory / f"updater-{len(procs)}.log", env=env, cwd=REPO)
    procs.append(proc)
    return proc


def wait_for(path: Path, proc: Proc, what: str, timeout: float = 60) -> None:
    def ready() -> bool:
        proc.check_alive()
        return path.exists()
    wait_until(ready, timeout, what)


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        p.kill()


# -- RAUC ------------------------------------------------------------------------------------------------
BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:tmpdir=/tmp</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


class RaucBed(Bed):
    """A device with the RAUC service on a private D-Bus bus, `rootfs.0`/`rootfs.1` as file-backed partitions,
    and scripts/rauc-fwenv-backend.sh as its bootloader over the file-backed U-Boot environment."""

    bus: str = ""
    service: Proc | None = None
    procs: list[Proc]

    def system_conf(self, post_install: Path | None = None) -> Path:
        conf = self.directory / "system.conf"
        handlers = f"bootloader-custom-backend={REPO / 'scripts' / 'rauc-fwenv-backend.sh'}\n"
        if post_install:
            handlers += f"post-install={post_install}\n"
        conf.write_text(
            "[system]\ncompatible=tether-test\nbootloader=custom\n"
            f"data-directory={self.directory / 'rauc-data'}\n\n"
            f"[handlers]\n{handlers}\n"
            f"[keyring]\npath={self.directory / 'rauc-keyring.pem'}\ncheck-purpose=codesign\n\n"
            f"[slot.rootfs.0]\ndevice={self.image('a')}\ntype=raw\nbootname=a\n\n"
            f"[slot.rootfs.1]\ndevice={self.image('b')}\ntype=raw\nbootname=b\n")
        return conf

    def start_service(self, post_install: Path | None = None) -> None:
        """(Re)start `rauc service`, booted from the slot the U-Boot environment names (as U-Boot would)."""
        self.stop_service()
        booted = self.env()["tether_slot"]
        UBootEnv(self.directory / "fw_env.config").setenv(tether_booted=booted)
        (self.directory / "mnt").mkdir(exist_ok=True)
        self.service = Proc(f"rauc-{len(self.procs)}", [
            require_tool("rauc"), f"--conf={self.system_conf(post_install)}", f"--mount={self.directory / 'mnt'}",
            "service", f"--override-boot-slot={booted}"], self.directory / f"rauc-{len(self.procs)}.log",
            env={"DBUS_SYSTEM_BUS_ADDRESS": self.bus,
                 "TETHER_FW_ENV_CONFIG": str(self.directory / "fw_env.config")})
        self.procs.append(self.service)

        def ready() -> bool:
            assert self.service is not None
            self.service.check_alive()
            return subprocess.run(["rauc", "status"], capture_output=True, check=False,
                                  env={**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": self.bus}).returncode == 0
        wait_until(ready, 30, "the RAUC service on the private bus")

    def stop_service(self) -> None:
        if self.service is not None:
            self.service.kill()
            self.service = None

    def service_log(self) -> str:
        return "".join(p.log.read_text() for p in self.procs if p.log.exists() and p.name.startswith("rauc"))

    def raucb_source(self, name: str, image: bytes, compatible: str = "tether-test") -> Path:
        """A bundle source; `compatible` other than the system's makes RAUC itself refuse the bundle."""
        src = self.tmp / name
        src.mkdir()
        (src / "rootfs.img").write_bytes(image)
        (src / "manifest.raucm").write_text(f"[update]\ncompatible={compatible}\nversion=@@VERSION@@\n\n"
                                            "[bundle]\nformat=plain\n\n[image.rootfs]\nfilename=rootfs.img\n")
        return src


@pytest.fixture
def rauc_bed(tmp_path: Path, releases: Releases, pki: Pki, monkeypatch: pytest.MonkeyPatch
             ) -> Iterator[Callable[..., RaucBed]]:
    for tool in ("rauc", "mksquashfs", "dbus-daemon", "fw_setenv"):
        require_tool(tool)
    started: list[Proc] = []
    bus_dir = tmp_path / "bus"
    bus_dir.mkdir()
    (bus_dir / "bus.conf").write_text(BUS_CONFIG)
    bus = Proc("dbus", ["dbus-daemon", f"--config-file={bus_dir / 'bus.conf'}", "--nofork", "--print-address=1"],
               bus_dir / "dbus.log")
    started.append(bus)
    address = str(wait_until(lambda: bus.check_alive() or bus.log.read_text().strip(), 20, "the private D-Bus"))
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", address)  # the rauc command line the agent runs uses it
    beds: list[RaucBed] = []

    def make(name: str = "device", **ota: Any) -> RaucBed:
        base = new_bed(tmp_path, releases, pki, "rauc", name, **ota)
        bed = RaucBed(base.device, tmp_path)
        bed.bus, bed.procs = address, started
        (bed.directory / "rauc-keyring.pem").write_bytes(pki.root_file.read_bytes())
        bed.start_service()
        beds.append(bed)
        return bed

    yield make
    for bed in beds:
        bed.device.close()
    for proc in reversed(started):
        proc.kill()
    for bed in beds:
        unmount_below(bed.directory / "mnt")


def unmount_below(directory: Path) -> None:
    """Unmount what a killed RAUC service left mounted (a reboot would); its loop device is auto-cleared."""
    prefix = str(directory) + "/"
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
              if line.split()[1].startswith(prefix)]
    for mountpoint in sorted(mounts, reverse=True):
        subprocess.run(["umount", mountpoint], check=True, capture_output=True)
