"""`rauc` installer: a verified `.raucb` handed to the RAUC service (`rauc install`), which writes and switches.

    [ota]
    slots = "rauc"
    rauc_slot_class = "rootfs"      # the class in /etc/rauc/system.conf whose two slots are a and b

Slot "a" is `<class>.0` and "b" is `<class>.1`. Everything goes through the `rauc` command line, which
talks to the RAUC service on the system D-Bus (`DBUS_SYSTEM_BUS_ADDRESS` picks another bus):
- `active()`: the slot `rauc status --output-format=json` reports as booted;
- `install()`: `rauc install FILE` (RAUC verifies the bundle's CMS signature against its keyring and its
  `compatible`, writes the inactive slot and makes it primary): output lines `NN% text` become progress,
  a failure's reason is RAUC's own `LastError:` line;
- `switch()`: checks that RAUC made the slot primary (`rauc status mark-active` if not);
- `commit()`: `rauc status mark-good booted`; `rollback(slot)`: `mark-active` the good slot, then
  `mark-bad` the other.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hal import StorageError, storage
from hal.slots import SLOTS, SlotError, other
from hal.slots.command import run_streaming

log = logging.getLogger(__name__)

TOOL_TIMEOUT = 60.0
PERCENT_RE = re.compile(r"^\s*(\d{1,3})%\s+(.*)$")


def _rauc() -> str:
    path = shutil.which("rauc")
    if path is None:
        raise SlotError("rauc is not installed: install the Debian package rauc (and run its service)")
    return path


def refusal(tail: list[str]) -> str:
    """RAUC's reason for a failed `rauc install`, from the last lines it printed.

    `rauc install` (1.8, Debian's) ends a failure with `LastError: <reason>` (e.g. "Installation error:
    Compatible mismatch: Expected 'x' but bundle manifest has 'y'") and then a summary line, "Installing
    `FILE` failed", that names no reason; so the LastError line wins, then any line saying failed/error.
    """
    for line in reversed(tail):
        if line.startswith("LastError:"):
            return line.partition(":")[2].strip()
    failed = [t for t in tail if "failed" in t.lower() or "error" in t.lower()]
    return (failed or tail or ["no output"])[-1]


class RaucSlots:
    """Two RAUC slots of one class; see the module docstring."""

    backend = "rauc"

    def __init__(self, directory: Path, rauc_slot_class: str = "rootfs",
                 progress: Callable[[str], None] | None = None) -> None:
        self.directory = Path(directory)
        self.slot_class = rauc_slot_class or "rootfs"
        self.progress = progress or (lambda text: None)
        try:
            storage.ensure_dir(self.directory, 0o755)
        except StorageError as exc:
            raise SlotError(f"{self.directory}: cannot create the slot directory: {exc}") from exc

    # -- rauc ----------------------------------------------------------------------------------------
    def _run(self, *args: str) -> str:
        argv = [_rauc(), *args]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False,
                                  env=dict(os.environ))
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SlotError(f"{' '.join(argv)}: {exc}") from exc
        if proc.returncode != 0:
            raise SlotError(f"{' '.join(argv[1:])} failed with exit status {proc.returncode}: "
                            f"{(proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:]} "
                            "(is the RAUC service running on the system bus?)")
        return proc.stdout

    def status(self) -> dict[str, Any]:
        """`rauc status --detailed --output-format=json`, parsed."""
        out = self._run("status", "--detailed", "--output-format=json")
        try:
            data = json.loads(out)
        except ValueError as exc:
            raise SlotError(f"rauc status printed no JSON ({exc}): {out[:200]!r}") from exc
        if not isinstance(data, dict):
            raise SlotError(f"rauc status: expected a JSON object, got {type(data).__name__}")
        return data

    def _slots(self, status: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
        """{"a": (rauc name, info), "b": ...} for `<class>.0` and `<class>.1`."""
        found: dict[str, dict[str, Any]] = {}
        for entry in status.get("slots", []):
            for name, info in entry.items():
                found[name] = info
        out = {}
        for index, slot in enumerate(SLOTS):
            name = f"{self.slot_class}.{index}"
            if name not in found:
                raise SlotError(f"RAUC has no slot {name} ([ota] rauc_slot_class = {self.slot_class!r}); "
                                f"its slots: {', '.join(sorted(found)) or 'none'}")
            out[slot] = (name, found[name])
        return out

    def name(self, slot: str) -> str:
        other(slot)
        return f"{self.slot_class}.{SLOTS.index(slot)}"

    # -- SlotBackend ---------------------------------------------------------------------------------
    def active(self) -> str:
        status = self.status()
        for slot, (_name, info) in self._slots(status).items():
            if info.get("state") == "booted" or info.get("bootname") == status.get("booted"):
                return slot
        raise SlotError(f"RAUC reports booted slot {status.get('booted')!r}, which is neither "
                        f"{self.name('a')} nor {self.name('b')}")

    def primary(self) -> str | None:
        status = self.status()
        for slot, (name, _info) in self._slots(status).items():
            if status.get("boot_primary") == name:
                return slot
        return None

    def stage(self, slot: str) -> Path:
        other(slot)
        return self.directory / "download" / f"bundle-{slot}.raucb"  # RAUC wants the .raucb suffix

    def _refuse_active(self, slot: str, action: str) -> None:
        if slot == self.active():
            raise SlotError(f"refusing to {action} slot {slot} ({self.name(slot)}): it is the booted slot")

    def prepare(self, slot: str) -> None:
        self._refuse_active(slot, "empty")
        stage = self.stage(slot)
        try:
            storage.ensure_dir(stage.parent, 0o700)
            with open(stage, "wb") as fh:
                os.fsync(fh.fileno())
        except (OSError, StorageError) as exc:
            raise SlotError(f"{stage}: cannot empty the download file: {exc}") from exc

    def install(self, slot: str, name: str, version: str) -> None:
        """`rauc install` the staged bundle; SlotError with RAUC's reason, or if it chose another slot."""
        self._refuse_active(slot, "install into")
        last = [-1]

        def line(text: str) -> None:
            m = PERCENT_RE.match(text)
            if m and int(m.group(1)) != last[0]:
                last[0] = int(m.group(1))
                self.progress(f"installing: {m.group(1)}% {m.group(2)}")

        outcome = run_streaming([_rauc(), "install", str(self.stage(slot))], line, env=dict(os.environ))
        if outcome.returncode != 0:
            raise SlotError(f"RAUC refused the bundle (exit status {outcome.returncode}): {refusal(outcome.tail)}")
        primary = self.primary()
        if primary != slot:
            raise SlotError(f"RAUC installed {name} {version} but made {primary or 'no slot'} primary, "
                            f"expected slot {slot} ({self.name(slot)})")

    def switch(self, slot: str) -> None:
        if self.primary() != slot:  # after a power cut between install and here, or a manual change
            self._run("status", "mark-active", self.name(slot))

    def commit(self) -> None:
        self._run("status", "mark-good", "booted")

    def rollback(self, slot: str) -> None:
        # The good slot first: a cut between the two calls still boots it.
        self._run("status", "mark-active", self.name(slot))
        self._run("status", "mark-bad", self.name(other(slot)))

    def version(self, slot: str) -> str | None:
        return self._version(self._slots(self.status())[slot][1])

    @staticmethod
    def _version(info: dict[str, Any]) -> str | None:
        bundle = (info.get("slot_status") or {}).get("bundle") or {}
        version = bundle.get("version")
        return version if isinstance(version, str) and version else None

    def describe(self) -> dict[str, Any]:
        status = self.status()
        slots = self._slots(status)
        active = next((s for s, (_n, i) in slots.items() if i.get("state") == "booted"), None)
        primary = next((s for s, (n, _i) in slots.items() if status.get("boot_primary") == n), None)
        return {"backend": self.backend, "active": active, "primary": primary,
                "trial": active is not None and slots[active][1].get("boot_status") != "good",
                "boot_status": {s: i.get("boot_status") for s, (_n, i) in slots.items()},
                "versions": {s: self._version(i) for s, (_n, i) in slots.items()}}
