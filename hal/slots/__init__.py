"""Boot slots for OTA: two places (A and B) for the software, one active, one to install into.

The OTA updater talks to one small `SlotBackend`; which one is configuration (`[ota] slots`). A backend
is a module plus one line in `BACKENDS`, imported only when chosen. Slot names are always "a" and "b".

Contract shared by every backend (the updater relies on it for power-loss safety):
- `active()` is the slot the running software came from; the updater never writes to it.
- `stage(slot)` is a regular file inside the inactive slot where a payload is streamed; its size is
  how many bytes arrived, so a download resumes from there (HTTP Range).
- `install()` and `switch()` are idempotent and each leaves the device bootable if cut at any point:
  until `switch()` returns, the active slot is unchanged; `switch()` flips one atomic thing (a symlink,
  one U-Boot environment write).
- After `switch()`, the new slot is on trial until `commit()`; `rollback()` makes the other slot active again.

A backend is composed, not inherited (hal/slots/composed.py): an `Installer` (where a payload is staged
and how it becomes a slot's content: `stage`, `prepare`, `install`) and a `BootSelector` (which slot
boots, its trial and each slot's recorded version: `active`, `switch`, `commit`, `rollback`). `uboot` is
slot images plus the U-Boot environment; `command` and `swupdate` are an installer tool plus the same
environment. `directory` and `rauc` are one class each: their install and their switch are one mechanism.

Installers (`swupdate`, `rauc`, `command`) are backends whose `install()` hands the verified, staged
bundle to the device's own update framework; their `stage()` is a download file beside the slots (a
bundle is a container, not a slot image). They take two hooks from the updater: `progress(text)` for
what the framework reports while it installs, and `floor()` (the lowest version the device may run:
SWUpdate's `-N`). `install()` raises SlotError whose message carries the framework's own reason.
RAUC switches the boot slot itself during `rauc install`, so for it `install()` also switches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple, Protocol

from hal import HalError, load_backend

SLOTS = ("a", "b")



class SlotBackendEntry(NamedTuple):
    """One `BACKENDS` entry, as hal/keys declares its key stores: where the class is, and what it takes."""

    target: str                         # "module:Class", imported only when this backend is chosen
    options: dict[str, str] = {}        # [ota] key -> the class's keyword argument, for the keys it reads
    hooks: tuple[str, ...] = ()         # the updater's hooks it takes: progress, floor


_UBOOT = {"uboot_env_config": "env_config"}
_COMMANDS = {**_UBOOT, "install_command": "install_command", "commit_command": "commit_command",
             "rollback_command": "rollback_command"}
# name -> entry; a new backend is a module plus one line here (its target a class or a function composing one)
BACKENDS: dict[str, SlotBackendEntry] = {
    "directory": SlotBackendEntry("hal.slots.directory:DirectorySlots"),
    "uboot": SlotBackendEntry("hal.slots.uboot:uboot_slots", _UBOOT),
    "swupdate": SlotBackendEntry("hal.slots.swupdate:swupdate_slots", _COMMANDS, ("progress", "floor")),
    "rauc": SlotBackendEntry("hal.slots.rauc:RaucSlots", {"rauc_slot_class": "rauc_slot_class"}, ("progress",)),
    "command": SlotBackendEntry("hal.slots.command:command_slots", _COMMANDS, ("progress", "floor")),
}
# every [ota] key some backend reads: set for another backend than the chosen one, it is refused
SLOT_OPTIONS = frozenset(key for entry in BACKENDS.values() for key in entry.options)


class SlotError(HalError):
    """A slot could not be prepared, written, switched or read; the message names the slot and path."""


def other(slot: str) -> str:
    """The slot that is not `slot` ("a" <-> "b"); SlotError for anything else."""
    if slot not in SLOTS:
        raise SlotError(f"slot {slot!r} is not one of {', '.join(SLOTS)}")
    return "b" if slot == "a" else "a"


class SlotBackend(Protocol):
    """Two boot slots and the switch between them."""

    backend: str

    def active(self) -> str:
        """The slot the device runs from now ("a" or "b")."""
        ...

    def stage(self, slot: str) -> Path:
        """The regular file inside `slot` where a payload is streamed (may not exist yet)."""
        ...

    def prepare(self, slot: str) -> None:
        """Empty `slot` for a new payload; SlotError if `slot` is the active one."""
        ...

    def install(self, slot: str, name: str, version: str) -> None:
        """Turn the verified staged payload into the slot's content, recording `name` and `version`."""
        ...

    def switch(self, slot: str) -> None:
        """Make `slot` the one the next start boots, on trial until `commit`."""
        ...

    def commit(self) -> None:
        """Accept the active slot for good (clear the trial: no fallback on the next boot)."""
        ...

    def rollback(self, slot: str) -> None:
        """Make `slot` (the previous, known-good one) active again and clear the trial."""
        ...

    def version(self, slot: str) -> str | None:
        """The version installed in `slot`, or None when unknown or empty."""
        ...

    def describe(self) -> dict[str, Any]:
        """Facts for `tether ota status`: backend, active slot, trial flag, per-slot versions."""
        ...


class Installer(Protocol):
    """Where a payload is staged and how it becomes a slot's content (a composed backend's first part)."""

    def stage(self, slot: str) -> Path:
        """The regular file a payload for `slot` is streamed into (may not exist yet)."""
        ...

    def prepare(self, slot: str) -> None:
        """Empty what `stage(slot)` holds for a new payload (the backend has checked `slot` is inactive)."""
        ...

    def install(self, slot: str, name: str, version: str) -> None:
        """Turn the verified staged payload into `slot`'s content; SlotError with the tool's reason."""
        ...

    def describe(self) -> dict[str, Any]:
        """Facts for `tether ota status` (the installer's command line), or {}."""
        ...


class BootSelector(Protocol):
    """Which slot boots, its trial, and each slot's recorded version (a composed backend's second part)."""

    def active(self) -> str:
        ...

    def switch(self, slot: str) -> None:
        ...

    def commit(self) -> None:
        ...

    def rollback(self, slot: str) -> None:
        ...

    def version(self, slot: str) -> str | None:
        ...

    def record(self, slot: str, version: str | None) -> None:
        """Remember what `slot` holds: `version` once installed, None while it is being emptied."""
        ...

    def describe(self) -> dict[str, Any]:
        ...


def slot_backend(name: str) -> SlotBackendEntry:
    """The registered backend `name`; SlotError listing the known ones otherwise."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise SlotError(f"slot backend {name!r} is unknown: expected one of {', '.join(sorted(BACKENDS))}") from None


def open_slots(backend: str, directory: str | Path, options: dict[str, Any] | None = None,
               **hooks: Any) -> SlotBackend:
    """Instantiate the slot backend named `backend` keeping its files in `directory`.

    `options`: [ota] key -> value, each one the backend declares (SlotError naming the key and what
    the backend takes otherwise: an option is never silently ignored); `hooks`: the updater's
    `progress` and `floor`, passed to the backends that take them. SlotError for an unknown backend.
    """
    entry = slot_backend(backend)
    kwargs: dict[str, Any] = {}
    for key, value in (options or {}).items():
        if key not in entry.options:
            raise SlotError(f"[ota] {key}: slots = {backend!r} takes no such option; it takes "
                            f"{', '.join(sorted(entry.options)) or 'none'}")
        kwargs[entry.options[key]] = value
    kwargs.update({name: hook for name, hook in hooks.items() if name in entry.hooks and hook is not None})
    cls = load_backend({name: e.target for name, e in BACKENDS.items()}, backend, "slot", SlotError)
    slots: SlotBackend = cls(Path(directory), **kwargs)
    return slots
