"""The OTA state machine as data, and its record on disk.

Every state change is written (atomically) before the action it announces, so a power cut at any
point is found on the next start in the state that was being worked on (mender's update daemon does
the same). `on_boot` decides from that state what a cut meant: resume, fail or roll back.

    idle|committed|rolled_back|failed --start--> downloading --downloaded--> verifying --verified-->
    installing --installed--> restarting --booted--> confirming --session_up--> committed
                                                      confirming --deadline|unhealthy|unconfirmed_boot--> rolled_back
    any busy state --fail--> failed;  restarting --not_switched--> rolled_back;  verifying --resume--> downloading
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from agent.ota.errors import TransitionError
from agent.state import Record, RecordError
from hal import storage

FINAL = ("idle", "committed", "rolled_back", "failed")
BUSY = ("downloading", "verifying", "installing", "restarting", "confirming")

TRANSITIONS: dict[tuple[str, str], str] = {
    **{(s, "start"): "downloading" for s in FINAL},
    ("downloading", "downloaded"): "verifying",
    ("verifying", "verified"): "installing",
    ("verifying", "resume"): "downloading",      # cut while hashing: the staged bytes are checked again
    ("installing", "installed"): "restarting",
    ("restarting", "booted"): "confirming",
    ("restarting", "not_switched"): "rolled_back",  # cut before the switch, or the bootloader fell back
    ("confirming", "session_up"): "committed",
    ("confirming", "deadline"): "rolled_back",
    ("confirming", "unhealthy"): "rolled_back",     # [ota] health_command said no
    ("confirming", "unconfirmed_boot"): "rolled_back",  # the new version restarted without going online
    **{(s, "fail"): "failed" for s in BUSY},
}


@dataclass(frozen=True)
class Operation:
    """The `515` request being worked on."""

    serial: str
    name: str
    version: str
    url: str


@dataclass(frozen=True)
class OtaState:
    """One update's progress, as persisted in `<state_dir>/ota/state.json`."""

    state: str = "idle"
    operation: Operation | None = None
    manifest: dict[str, Any] | None = None
    target: str = ""                 # slot being installed into
    previous: str = ""               # slot to fall back to
    previous_version: str = ""
    reason: str = ""                 # why it failed or rolled back (the 502 text)
    reported: bool = True            # the final outcome reached the platform
    downloaded: int = 0              # payload bytes on disk (for progress)
    size: int = 0
    boots: int = 0                   # starts of the new version while confirming
    deadline: float = 0.0            # wall-clock time by which the new version must be online
    updated: float = 0.0

    @property
    def busy(self) -> bool:
        return self.state in BUSY

    @property
    def release(self) -> str:
        """`name version` of the operation, for reports and log lines."""
        op = self.operation
        return f"{op.name if op else ''} {op.version if op else ''}"

    def advance(self, event: str, **changes: Any) -> OtaState:
        """The state after `event`; TransitionError naming state and event if the table has no such edge."""
        try:
            nxt = TRANSITIONS[(self.state, event)]
        except KeyError:
            raise TransitionError(f"OTA state machine: event {event!r} is not allowed in state "
                                  f"{self.state!r}") from None
        return replace(self, state=nxt, updated=time.time(), **changes)

    def to_fields(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_fields(cls, raw: dict[str, Any]) -> OtaState:
        """The state from a record's fields; TransitionError naming what is wrong."""
        try:
            op = raw.pop("operation", None)
            state = cls(**raw, operation=Operation(**op) if op else None)
        except TypeError as exc:
            raise TransitionError(f"unreadable OTA state ({exc})") from exc
        if state.state not in FINAL + BUSY:
            raise TransitionError(f"unknown OTA state {state.state!r}")
        return state


@dataclass(frozen=True)
class Installed:
    """What runs now, and the anti-rollback floor: the highest version ever committed (never lowered)."""

    name: str = ""
    version: str = ""
    url: str = ""
    floor: str = ""
    history: list[str] = field(default_factory=list)


class StateStore:
    """`state.json` and `installed.json` in one directory: records of agent/state.py (a version, atomic
    saves). A bad state.json is set aside (the update it described is forgotten, the slots keep what they
    hold: a trial boot falls back by the boot loader's own count); a bad installed.json is refused, since
    forgetting the floor would let a replayed older release in."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.state_file = self.directory / "state.json"
        self.installed_file = self.directory / "installed.json"
        self.state_record = Record(str(self.state_file), then="no update in progress")
        self.installed_record = Record(str(self.installed_file), keep=True, version_field="format",  # has a version
                                       then="the anti-rollback floor is unknown, restore it from a backup or "
                                            "re-provision")

    def load(self) -> OtaState:
        """The persisted state; idle when there is none or it was set aside."""
        fields = self.state_record.load()
        if fields is None:
            return OtaState()
        try:
            return OtaState.from_fields(fields)
        except TransitionError as exc:
            self.state_record.refuse(str(exc))
            return OtaState()

    def save(self, state: OtaState) -> OtaState:
        storage.ensure_dir(self.directory)
        self.state_record.save(state.to_fields())
        return state

    def installed(self, base_version: str) -> Installed:
        fields = self.installed_record.load()
        if fields is None:
            return Installed(version=base_version, floor=base_version)
        try:
            return Installed(**fields)
        except TypeError as exc:
            raise RecordError(f"{self.installed_file}: unreadable ({exc}); {self.installed_record.then}") from None

    def save_installed(self, installed: Installed) -> None:
        storage.ensure_dir(self.directory)
        self.installed_record.save(asdict(installed))
