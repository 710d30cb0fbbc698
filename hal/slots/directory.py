"""Directory slots for application bundles: `slot-a/`, `slot-b/` and an atomic `current` symlink.

    <slots_dir>/slot-a/            one bundle (files of a tar payload, or `payload` for a single file)
    <slots_dir>/slot-b/
    <slots_dir>/current -> slot-a  what the service runs; replaced with rename(2), so never missing
    <slots_dir>/trial              present while a switched-to slot is not committed (holds the previous slot)

The service's unit points at `<slots_dir>/current/...`; restarting it after `switch()` runs the new bundle.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tarfile
from pathlib import Path
from typing import Any

from hal import StorageError, storage
from hal.slots import SLOTS, SlotError, other, unpack

STAGE_NAME = ".payload.part"
RELEASE_NAME = ".tether-release.json"


class DirectorySlots:
    """Two directories and a symlink; see the module docstring for the layout."""

    backend = "directory"

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.current = self.directory / "current"
        self.trial_file = self.directory / "trial"
        self._init_layout()

    def _init_layout(self) -> None:
        try:
            storage.ensure_dir(self.directory, 0o755)
            for slot in SLOTS:
                storage.ensure_dir(self.slot_dir(slot), 0o755)
            if not self.current.is_symlink():
                self._point_current("a")
        except (OSError, StorageError) as exc:
            raise SlotError(f"{self.directory}: cannot set up directory slots: {exc}") from exc

    def slot_dir(self, slot: str) -> Path:
        other(slot)  # validates the name
        return self.directory / f"slot-{slot}"

    def active(self) -> str:
        try:
            target = os.readlink(self.current)
        except OSError as exc:
            raise SlotError(f"{self.current}: cannot read the active-slot symlink: {exc.strerror}") from exc
        name = Path(target).name
        if name not in ("slot-a", "slot-b"):
            raise SlotError(f"{self.current} points at {target!r}, expected slot-a or slot-b")
        return name[-1]

    def stage(self, slot: str) -> Path:
        return self.slot_dir(slot) / STAGE_NAME

    def _refuse_active(self, slot: str, action: str) -> None:
        if slot == self.active():
            raise SlotError(f"refusing to {action} slot {slot} ({self.slot_dir(slot)}): it is the active slot")

    def prepare(self, slot: str) -> None:
        self._refuse_active(slot, "empty")
        self._clear(self.slot_dir(slot), keep=None)

    def _clear(self, directory: Path, keep: str | None) -> None:
        try:
            for entry in directory.iterdir():
                if entry.name == keep:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            storage.fsync_dir(directory)
        except OSError as exc:
            raise SlotError(f"{directory}: cannot empty the slot: {exc}") from exc

    def install(self, slot: str, name: str, version: str) -> None:
        """Unpack the staged payload into the slot (a tar archive) or keep it as `payload` (anything else).

        The release record is written last, so a slot cut mid-install has no version and is never
        mistaken for a complete one.
        """
        self._refuse_active(slot, "install into")
        directory = self.slot_dir(slot)
        staged = self.stage(slot)
        if not staged.is_file():
            raise SlotError(f"{staged}: no staged payload to install into slot {slot}")
        self._clear(directory, keep=STAGE_NAME)
        try:
            if tarfile.is_tarfile(staged):
                # Our own extraction, not tarfile's filter: see hal/slots/unpack.py (CVE-2025-4517).
                unpack.extract_tar(staged, directory, reserved=(STAGE_NAME, RELEASE_NAME))
                staged.unlink()
            else:
                os.replace(staged, directory / "payload")
            storage.fsync_dir(directory)
        except (OSError, tarfile.TarError, SlotError) as exc:
            # Nothing half-extracted or refused stays behind: the slot is left empty, the active one untouched.
            try:
                self._clear(directory, keep=None)
            except SlotError as cleanup:
                raise SlotError(f"cannot install into slot {slot}: {exc}; and emptying the slot failed: "
                                f"{cleanup}") from exc
            raise SlotError(f"cannot install into slot {slot}: {exc}; slot {slot} was emptied") from exc
        record = json.dumps({"name": name, "version": version}, sort_keys=True).encode()
        storage.atomic_write(directory / RELEASE_NAME, record, storage.PUBLIC_MODE)

    def _point_current(self, slot: str) -> None:
        tmp = self.directory / f".current.tmp-{secrets.token_hex(8)}"
        try:
            tmp.unlink(missing_ok=True)
            os.symlink(f"slot-{slot}", tmp)
            os.replace(tmp, self.current)  # rename(2) over the old link: `current` always exists
            storage.fsync_dir(self.directory)
        except OSError as exc:
            raise SlotError(f"{self.current}: cannot point at slot-{slot}: {exc.strerror}") from exc

    def switch(self, slot: str) -> None:
        if slot == self.active():
            return  # idempotent: a resumed switch after a power cut finds it done
        storage.atomic_write(self.trial_file, self.active().encode(), storage.PUBLIC_MODE)
        self._point_current(slot)

    def commit(self) -> None:
        storage.remove(self.trial_file)

    def rollback(self, slot: str) -> None:
        self._point_current(slot)
        storage.remove(self.trial_file)

    def version(self, slot: str) -> str | None:
        data = storage.read_bytes(self.slot_dir(slot) / RELEASE_NAME)
        if data is None:
            return None
        try:
            version = json.loads(data).get("version")
        except (ValueError, AttributeError):
            return None
        return version if isinstance(version, str) else None

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "directory": str(self.directory), "active": self.active(),
                "trial": self.trial_file.exists(),
                "versions": {slot: self.version(slot) for slot in SLOTS}}
