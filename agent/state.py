"""The agent's state directory: the one place that names its files, and the one idiom for the small
JSON records in it.

Every persisted fact has one owner, and reaches disk through `StateDir` (its path) and, for the JSON
records, `Record` (its format): a version number written into the file, an atomic save (temp file,
fsync, rename: hal/storage.py), and on load a file that is torn, not a JSON object, or written by a
newer agent (a version above ours) is set aside as `<name>.corrupt` with an error line, and the owner
starts from empty. A file without a version is version 1 (what agents wrote before records carried one).
Files that are not our JSON (the discovery server's document, the token, the key store, the outbox's
SQLite database, the publish socket) take only their path from here.
"""

from __future__ import annotations

import os
from typing import Any

from agent.errors import AgentError
from hal import storage
from hal.value import Value


class RecordError(AgentError):
    """A record that must not be forgotten (`Record.keep`) cannot be read; the message names the file."""


class StateDir:
    """`<state_dir>` and every path under it, as strings (`pathlib` is not loaded by `tether run`)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.fspath(root)

    def ensure(self) -> str:
        return storage.ensure_dir(self.root)

    @property
    def keys(self) -> str:
        return os.path.join(self.root, "keys")

    @property
    def certs(self) -> str:
        return os.path.join(self.root, "certs")

    @property
    def status(self) -> str:
        return os.path.join(self.root, "status.json")

    @property
    def boot(self) -> str:
        return os.path.join(self.root, "boot.json")

    @property
    def token(self) -> str:
        return os.path.join(self.root, "token.jwt")

    @property
    def last_good(self) -> str:
        return os.path.join(self.root, "last-good.json")

    @property
    def discovery_cache(self) -> str:
        return os.path.join(self.root, "discovery.json")

    @property
    def renewal(self) -> str:
        return os.path.join(self.root, "renewal.json")

    @property
    def ota(self) -> str:
        return os.path.join(self.root, "ota")

    @property
    def ota_state(self) -> str:
        """The updater's state (agent/ota/machine.py StateStore): present while an update is in progress."""
        return os.path.join(self.ota, "state.json")

    @property
    def slots(self) -> str:
        return os.path.join(self.root, "slots")

    @property
    def outbox(self) -> str:
        return os.path.join(self.root, "outbox.sqlite")

    @property
    def publish_socket(self) -> str:
        return os.path.join(self.root, "publish.sock")


class Record(Value):
    """One JSON record file: `path`, the `version` this agent writes, what its owner does when the
    file has to be set aside (`then`, for the log line), and whether a save must survive a power cut
    (`durable`: fsync of the file and its directory; not for a volatile file the next update rewrites).
    `keep`: a fact that must not be forgotten (the OTA anti-rollback floor: starting from empty would
    accept a replayed older release), so a bad file raises RecordError and stays where it is.
    `version_field`: where the version is written, for a record whose own fields have a `version`."""

    path: str
    version: int = 1
    then: str = "starting from empty"
    durable: bool = True
    keep: bool = False
    version_field: str = "version"

    def load(self) -> dict[str, Any] | None:
        """The record's fields (without `version`), or None when the file is absent or was set aside."""
        data = storage.read_bytes(self.path)
        if data is None:
            return None
        try:
            value = storage.parse_json(data)
        except ValueError as exc:
            self.refuse(f"not JSON ({exc})")
            return None
        if not isinstance(value, dict):
            self.refuse(f"expected a JSON object, found {type(value).__name__}")
            return None
        version = value.pop(self.version_field, 1)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            self.refuse(f"{self.version_field}: expected a positive integer, got {version!r}")
            return None
        if version > self.version:
            self.refuse(f"version {version} is newer than this agent's ({self.version})")
            return None
        return value

    def refuse(self, why: str) -> None:
        """The file cannot be believed (`why`): set it aside, or for a `keep` record raise RecordError.
        Owners call it too, for fields their own type refuses."""
        if self.keep:
            raise RecordError(f"{self.path}: {why}; {self.then}")
        storage.set_aside(self.path, why, self.then)

    def save(self, fields: dict[str, Any], mode: int = storage.PUBLIC_MODE) -> None:
        """Write `fields` with this record's version, atomically (and durably if `durable`)."""
        storage.write_json(self.path, {**fields, self.version_field: self.version}, mode, durable=self.durable)
