"""A slot backend made of two parts (hal/slots/__init__.py): an `Installer` and a `BootSelector`.

The rules every backend keeps for power-loss safety live here once: nothing is emptied or installed
into the active slot, a slot's recorded version is cleared before it is emptied and set only after
its install succeeded, and the switch is the selector's one atomic change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hal.slots import BootSelector, Installer, SlotError, other


class Slots:
    """`SlotBackend` from an installer and a boot selector; `backend` is its registry name."""

    def __init__(self, backend: str, installer: Installer, selector: BootSelector) -> None:
        self.backend = backend
        self.installer = installer
        self.selector = selector

    def active(self) -> str:
        return self.selector.active()

    def stage(self, slot: str) -> Path:
        other(slot)
        return self.installer.stage(slot)

    def _refuse_active(self, slot: str, action: str) -> None:
        if slot == self.active():
            raise SlotError(f"refusing to {action} slot {slot} ({self.stage(slot)}): it is the active slot")

    def prepare(self, slot: str) -> None:
        self._refuse_active(slot, "empty")
        self.selector.record(slot, None)
        self.installer.prepare(slot)

    def install(self, slot: str, name: str, version: str) -> None:
        self._refuse_active(slot, "install into")
        self.installer.install(slot, name, version)
        self.selector.record(slot, version)

    def switch(self, slot: str) -> None:
        other(slot)
        self.selector.switch(slot)

    def commit(self) -> None:
        self.selector.commit()

    def rollback(self, slot: str) -> None:
        other(slot)
        self.selector.rollback(slot)

    def version(self, slot: str) -> str | None:
        other(slot)
        return self.selector.version(slot)

    def describe(self) -> dict[str, Any]:
        return {**self.selector.describe(), "backend": self.backend, **self.installer.describe()}
