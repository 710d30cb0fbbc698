"""The agent's state directory: the one place that names its files, the one idiom for the small JSON
records in it, the status record (`StatusFile`), and who may act on the directory (`require_own_state`).

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
import pwd
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from agent.errors import AgentError
from hal import storage
from hal.value import Value

if TYPE_CHECKING:
    from agent.config import Config  # which builds a StateDir from its [device] state_dir


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


# -- the status file ---------------------------------------------------------------------------------
# The running agent's state as others see it: a small JSON file in the state directory.
#
# `tether run` writes it on every state change (session up/down, endpoint, last error, token);
# `tether status` reads it. Plain JSON so a shell script or a support tool can read it too. One
# `StatusFile` per process owns it: the runtime's control loop (other threads post their updates
# to the loop), so no update is lost to a concurrent read-modify-write.


def _record(config: Config) -> Record:
    # volatile: it describes this run only and every state change rewrites it, so a save is atomic
    # (readers never see half a file) but not fsynced; after a power cut the next update corrects it
    return Record(config.state.status, then="the next update writes it afresh", durable=False)


def read_runtime_status(config: Config) -> dict[str, Any]:
    return _record(config).load() or {}


class StatusFile:
    """The status kept in memory and written whole on each update. `owner` is the only thread
    allowed to update it once set (the runtime sets it to its control loop)."""

    def __init__(self, config: Config) -> None:
        self.record = _record(config)
        self.path = self.record.path
        self.config = config
        self.owner: threading.Thread | None = None
        self._status: dict[str, Any] | None = None

    def update(self, **fields: Any) -> dict[str, Any]:
        """Merge `fields` and write the file atomically; return the new status."""
        if self._status is None:
            self._status = read_runtime_status(self.config)
        self._status.update(fields)
        self._status["updated_at"] = int(time.time())
        self.record.save(self._status)
        return dict(self._status)


# -- who may act on the state ------------------------------------------------------------------------
# The agent acts on its state only as the user the state belongs to (issue 22, item 2).
#
# The state directory (keys, certificates, token, OTA state) belongs to the agent's user, `tether` on a
# device. A root process working there reads, parses, executes with and writes next to files that user
# controls: a FIFO, a symlink or a swapped file turns into root's action (the tpm2 provider's OpenSSL
# configuration, loaded as uid 0, was one). Dropping to that user from inside Python would also need its
# groups (`tss` for the TPM) and a clean environment, which `runuser` already does right; so the CLI
# refuses and prints the exact command instead. The systemd unit runs the agent as `tether`, the owner, and
# the .deb's postinst runs no `tether` command, so neither meets this refusal.


def owner_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def require_own_state(config: Config, argv: Sequence[str]) -> None:
    """AgentError unless the state and key directories (where they exist) belong to this process's user.

    The message names the directory and its owner and ends with the command that runs `argv` as that
    owner. Nothing is read from or written to the directories before this check.
    """
    me = os.geteuid()
    for directory in dict.fromkeys((config.state_dir, config.keys_dir)):
        owner = _owner(directory)
        if owner is None or owner == me:
            continue
        import shlex  # quotes the command of a refusal only: not loaded by every start (issue 24)

        name = owner_name(owner)
        who = f"{name} (uid {owner})" if name else f"uid {owner}, a user with no name"
        how = (f"runuser -u {shlex.quote(name)} -- tether {shlex.join(argv)}" if name
               else f"give {directory} a user and run `tether {shlex.join(argv)}` as that user")
        raise AgentError(f"{directory} belongs to {who}, not to uid {me}: its files would act on this process; "
                         f"run the command as that user: {how}")


def _owner(directory: str) -> int | None:
    try:
        return os.stat(directory).st_uid
    except FileNotFoundError:
        return None  # created by this command, as us
    except OSError as exc:
        raise AgentError(f"{directory}: cannot check who owns it: {exc.strerror}") from None
