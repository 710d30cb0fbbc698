"""A/B slots switched through the U-Boot environment, with `fw_printenv`/`fw_setenv` (libubootenv-tool).

Variables (the names U-Boot's bootcount feature and our boot script use):
    tether_slot         a | b: the slot the boot script loads
    upgrade_available   1 while the switched-to slot is on trial; U-Boot then counts boots
    bootcount           incremented by U-Boot on each boot while upgrade_available=1
    bootlimit           when bootcount exceeds it, U-Boot runs `altbootcmd` (boot the other slot)
    tether_version_a/b  the version installed in each slot, for `tether ota status`

`switch()` sets slot, upgrade_available and bootcount in one `fw_setenv` call, which is one write of
the environment (use a redundant environment on real devices so that write is power-safe too).
Slot images are files `<slots_dir>/slot-a.img` and `slot-b.img`; on a device with partitions they
would be the block devices (not covered yet: a block device has no size to resume from).

For tests, `write_env_image` builds a file-backed environment: a little-endian CRC-32 of the data area
followed by `name=value\\0` pairs, a final `\\0` and 0xff padding (what `mkenvimage` produces).
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path
from typing import Any

from hal import StorageError, storage
from hal.slots import SLOTS, SlotError
from hal.slots.composed import Slots

DEFAULT_ENV_CONFIG = "/etc/fw_env.config"
DEFAULT_ENV_SIZE = 0x4000
TOOL_TIMEOUT = 10.0


def write_env_image(image: Path, variables: dict[str, str], size: int = DEFAULT_ENV_SIZE) -> None:
    """Write a non-redundant U-Boot environment image holding `variables` (the `mkenvimage` format)."""
    body = b"".join(f"{k}={v}".encode() + b"\0" for k, v in sorted(variables.items())) + b"\0"
    if len(body) > size - 4:
        raise SlotError(f"{image}: {len(body)} bytes of variables do not fit a {size}-byte environment")
    data = body.ljust(size - 4, b"\xff")
    storage.atomic_write(image, struct.pack("<I", zlib.crc32(data)) + data, storage.PUBLIC_MODE)


def write_env_config(config: Path, image: Path, size: int = DEFAULT_ENV_SIZE) -> None:
    """Write an fw_env.config naming `image` as the (file-backed) environment device."""
    storage.atomic_write(config, f"{image} 0x0 0x{size:x}\n".encode(), storage.PUBLIC_MODE)


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")
    if path is None:
        raise SlotError(f"{name} is not installed: install the Debian package libubootenv-tool")
    return path


class UBootEnv:
    """The boot selector of `uboot`, `command` and `swupdate` slots: the active slot, the trial and the
    per-slot versions in the U-Boot environment (`env_config`: the fw_env.config naming it)."""

    def __init__(self, env_config: str | Path = "") -> None:
        self.env_config = str(env_config or DEFAULT_ENV_CONFIG)

    def _run(self, argv: list[str]) -> str:
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SlotError(f"{' '.join(argv)}: {exc}") from exc
        if proc.returncode != 0:
            raise SlotError(f"{' '.join(argv)} failed with exit status {proc.returncode}: "
                            f"{proc.stderr.strip() or proc.stdout.strip()} (check {self.env_config})")
        return proc.stdout

    def env(self) -> dict[str, str]:
        """Every variable of the environment."""
        out = self._run([_tool("fw_printenv"), "-c", self.env_config])
        pairs = (line.partition("=") for line in out.splitlines() if "=" in line)
        return {k: v for k, _, v in pairs}

    def setenv(self, **variables: str) -> None:
        """Set several variables in one write of the environment (values must not be empty)."""
        argv = [_tool("fw_setenv"), "-c", self.env_config]
        for k, v in variables.items():
            if not v:
                raise SlotError(f"internal: empty value for U-Boot variable {k} would delete it")
            argv += [k, v]
        self._run(argv)

    # -- BootSelector -------------------------------------------------------------------------------
    def active(self) -> str:
        slot = self.env().get("tether_slot", "a") or "a"
        if slot not in SLOTS:
            raise SlotError(f"U-Boot environment ({self.env_config}): tether_slot={slot!r}, expected a or b")
        return slot

    def switch(self, slot: str) -> None:
        # One fw_setenv: the slot and its trial flags change together or not at all.
        self.setenv(tether_slot=slot, upgrade_available="1", bootcount="0")

    def commit(self) -> None:
        self.setenv(upgrade_available="0", bootcount="0")

    def rollback(self, slot: str) -> None:
        self.setenv(tether_slot=slot, upgrade_available="0", bootcount="0")

    def version(self, slot: str) -> str | None:
        value = self.env().get(f"tether_version_{slot}")
        return None if value in (None, "", "-") else value

    def record(self, slot: str, version: str | None) -> None:
        self.setenv(**{f"tether_version_{slot}": version or "-"})  # "-": an empty value would delete it

    def describe(self) -> dict[str, Any]:
        env = self.env()
        versions = {s: (None if env.get(f"tether_version_{s}") in (None, "", "-") else env[f"tether_version_{s}"])
                    for s in SLOTS}
        return {"env_config": self.env_config, "active": env.get("tether_slot", "a"),
                "trial": env.get("upgrade_available") == "1", "bootcount": env.get("bootcount"),
                "bootlimit": env.get("bootlimit"), "versions": versions}


def make_slot_dir(directory: Path) -> Path:
    try:
        return storage.ensure_dir(directory, 0o755)
    except StorageError as exc:
        raise SlotError(f"{directory}: cannot create the slot directory: {exc}") from exc


def empty_file(path: Path, slot: str) -> None:
    """Truncate `path` (a slot image, a bundle) to nothing, durably."""
    try:
        with open(path, "wb") as fh:
            os.fsync(fh.fileno())
    except OSError as exc:
        raise SlotError(f"{path}: cannot empty slot {slot}: {exc.strerror}") from exc


class ImageInstaller:
    """The installer of `uboot` slots: the payload is streamed straight into `<directory>/slot-<s>.img`;
    installing makes it durable."""

    def __init__(self, directory: Path) -> None:
        self.directory = make_slot_dir(Path(directory))

    def stage(self, slot: str) -> Path:
        return self.directory / f"slot-{slot}.img"

    def prepare(self, slot: str) -> None:
        empty_file(self.stage(slot), slot)

    def install(self, slot: str, name: str, version: str) -> None:
        image = self.stage(slot)
        try:
            fd = os.open(image, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise SlotError(f"{image}: cannot install into slot {slot}: {exc.strerror}") from exc

    def describe(self) -> dict[str, Any]:
        return {}


def uboot_slots(directory: Path, env_config: str | Path = "") -> Slots:
    """`[ota] slots = "uboot"`: slot images in `directory`, switched through the U-Boot environment."""
    return Slots("uboot", ImageInstaller(directory), UBootEnv(env_config))
