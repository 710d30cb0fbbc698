"""`tether-station backup` and `restore`: the station directory and its ledger in one archive.

The archive is a gzip'd tar, written 0600 (it holds the CA keys) atomically next to its destination:
  tether-station-backup.json   what it holds: format version, time, ledger kind, each file's SHA-256
  station/...                  every regular file of the station directory, with its mode (keys 0600)
  ledger.sqlite                a consistent copy of a SQLite ledger, made with SQLite's online backup API
                               (sqlite3_backup, https://sqlite.org/backup.html) while the station serves

A PostgreSQL ledger is not copied: the operator gets the `pg_dump` (and `pg_restore`) command to run,
since only the database's own tools see its roles, sequences and a consistent snapshot.

Restore checks every member before writing anything (a path that leaves the directory, a link, a device
node, a file whose digest differs: refused, naming the member), writes into a fresh sibling directory and
renames it into place, so an interrupted restore leaves no half station. It refuses a non-empty target
unless `force`, which sets the old directory aside (never deletes it).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sqlite3
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from hal import storage
from provisioning.station.errors import StationError

MANIFEST = "tether-station-backup.json"
FORMAT = 1
DIR_PREFIX = "station/"
LEDGER_MEMBER = "ledger.sqlite"
# at most: a key archived 0600 comes back 0600; nothing comes back executable or writable by others
FILE_MODES = 0o644
DIR_MODE = 0o700


@dataclass(frozen=True)
class BackupResult:
    archive: Path
    files: int
    ledger: str              # "sqlite" or "postgresql"
    postgres_hint: str = ""  # for a PostgreSQL ledger: the command to run


def _sqlite_path(location: str, directory: Path) -> Path | None:
    """The SQLite file a ledger location names (relative to the station directory), or None for PostgreSQL."""
    if location.startswith(("postgresql://", "postgres://")):
        return None
    path = Path(location.removeprefix("sqlite://"))
    return path if path.is_absolute() else directory / path


def _is_ledger_file(path: Path, ledger: Path | None) -> bool:
    if ledger is None:
        return False
    return path.name in (ledger.name, f"{ledger.name}-wal", f"{ledger.name}-shm", f"{ledger.name}-journal",
                         f"{ledger.name}.lock") and path.parent == ledger.parent


def pg_dump_hint(url: str) -> str:
    """The commands that back up and restore a PostgreSQL ledger (the password stays in ~/.pgpass)."""
    shown = url if "@" not in url else url.split("://", 1)[0] + "://" + url.rsplit("@", 1)[1]
    return (f"the ledger is in PostgreSQL: back it up with `pg_dump --format=custom --file=ledger.dump '{shown}'` "
            "and restore it with `pg_restore --clean --if-exists --dbname=URL ledger.dump`")


def backup(directory: Path, ledger_location: str, out: Path, now: float | None = None) -> BackupResult:
    """Archive `directory` and the SQLite ledger at `ledger_location` (a station.toml `ledger` or --db value)
    into `out`. StationError when the directory is not a station or the ledger cannot be read."""
    if not (directory / "station.toml").is_file():
        raise StationError(f"{directory}: not a station directory (no station.toml); pass --dir")
    ledger = _sqlite_path(ledger_location, directory)
    if ledger is not None and not ledger.is_file():
        raise StationError(f"{ledger}: the SQLite ledger does not exist")
    files: list[tuple[str, Path]] = []
    for path in sorted(directory.rglob("*")):
        if path.is_symlink() or not path.is_file() or _is_ledger_file(path, ledger):
            continue  # sockets, links and the live ledger (copied below, consistently) stay out
        files.append((DIR_PREFIX + path.relative_to(directory).as_posix(), path))
    digests: dict[str, str] = {}
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)  # 0600 from the start
    except OSError as exc:  # e.g. the service's user backing up into a directory only root may write
        raise StationError(f"--out {out}: cannot create the archive there ({exc.strerror or exc}); choose a "
                           "directory this user can write") from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz", compresslevel=6) as tar:
            for name, path in files:
                data = path.read_bytes()
                digests[name] = hashlib.sha256(data).hexdigest()
                _add(tar, name, data, path.stat().st_mode & 0o777)
            if ledger is not None:
                data = _sqlite_snapshot(ledger)
                digests[LEDGER_MEMBER] = hashlib.sha256(data).hexdigest()
                _add(tar, LEDGER_MEMBER, data, 0o600)
            manifest = {"format": FORMAT, "created": int(now if now is not None else time.time()),
                        "ledger": "sqlite" if ledger is not None else "postgresql",
                        "ledger_name": ledger.name if ledger is not None and ledger.parent == directory else None,
                        "files": digests}
            _add(tar, MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode(), 0o600)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, out)
        storage.fsync_dir(out.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    hint = "" if ledger is not None else pg_dump_hint(ledger_location)
    return BackupResult(out, len(files), "sqlite" if ledger is not None else "postgresql", hint)


def _add(tar: tarfile.TarFile, name: str, data: bytes, mode: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, int(time.time())
    tar.addfile(info, io.BytesIO(data))


def _sqlite_snapshot(path: Path) -> bytes:
    """A consistent copy of the live SQLite ledger (WAL included), via the online backup API."""
    with tempfile.TemporaryDirectory(prefix="tether-ledger-") as scratch:
        copy = Path(scratch) / "ledger.sqlite"
        try:
            source = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
            try:
                target = sqlite3.connect(copy)
                try:
                    source.backup(target)
                    target.execute("PRAGMA journal_mode=DELETE")  # one self-contained file in the archive
                finally:
                    target.close()
            finally:
                source.close()
        except sqlite3.Error as exc:
            raise StationError(f"{path}: cannot back up the SQLite ledger: {exc}") from exc
        return copy.read_bytes()


# -- restore ------------------------------------------------------------------------------------------------
def _check_member(member: tarfile.TarInfo) -> str:
    """The member's path inside the archive, after refusing anything that is not a plain file inside it."""
    name = member.name
    parts = PurePosixPath(name).parts
    if not member.isfile():
        raise StationError(f"archive member {name!r}: not a regular file (links and devices are never restored)")
    if name.startswith("/") or ".." in parts or not parts:
        raise StationError(f"archive member {name!r}: its path leaves the station directory")
    if name not in (MANIFEST, LEDGER_MEMBER) and not name.startswith(DIR_PREFIX):
        raise StationError(f"archive member {name!r}: not part of a station backup")
    return name


def read_archive(archive: Path) -> tuple[dict[str, object], dict[str, tuple[bytes, int]]]:
    """(manifest, {member: (data, mode)}) of a backup archive, every member checked and every digest verified."""
    members: dict[str, tuple[bytes, int]] = {}
    try:
        with tarfile.open(archive, mode="r:gz") as tar:
            for member in tar:
                name = _check_member(member)
                if name in members:
                    raise StationError(f"archive member {name!r}: appears twice")
                handle = tar.extractfile(member)
                assert handle is not None  # a regular file has a body
                members[name] = (handle.read(), member.mode & 0o777)
    except FileNotFoundError:
        raise StationError(f"{archive}: no such backup archive") from None
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise StationError(f"{archive}: not a readable backup archive: {exc}") from None
    if MANIFEST not in members:
        raise StationError(f"{archive}: no {MANIFEST}: not a tether-station backup")
    try:
        manifest = json.loads(members.pop(MANIFEST)[0])
    except ValueError as exc:
        raise StationError(f"{archive}: {MANIFEST}: {exc}") from None
    if not isinstance(manifest, dict):
        raise StationError(f"{archive}: {MANIFEST}: not a JSON object")
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise StationError(f"{archive}: {MANIFEST}: format {manifest.get('format')!r} is not {FORMAT}")
    listed: dict[str, str] = manifest["files"]
    if set(listed) != set(members):
        extra = sorted(set(members) ^ set(listed))
        raise StationError(f"archive member {extra[0]!r}: in the archive or its manifest, not both")
    for name, (data, _) in members.items():
        if hashlib.sha256(data).hexdigest() != listed[name]:
            raise StationError(f"archive member {name!r}: SHA-256 differs from the manifest (damaged archive)")
    return manifest, members


def restore(archive: Path, directory: Path, force: bool = False, now: float | None = None) -> tuple[int, Path | None]:
    """Restore `archive` into `directory`; (files written, where the old directory was set aside or None).

    StationError, with nothing written, when the archive is not a valid backup or `directory` is not empty
    and `force` is not given."""
    manifest, members = read_archive(archive)
    if directory.exists() and not directory.is_dir():
        raise StationError(f"{directory}: exists and is not a directory")
    if directory.is_dir() and any(directory.iterdir()) and not force:
        count = sum(1 for _ in directory.iterdir())
        raise StationError(f"{directory}: not empty ({count} entries); restore onto an empty directory, or "
                           "pass --force to set the current one aside first")
    ledger_name = manifest.get("ledger_name") or "ledger.sqlite"
    if LEDGER_MEMBER in members and (not isinstance(ledger_name, str) or "/" in ledger_name
                                     or ledger_name in ("", "..", ".")):
        raise StationError(f"{archive}: {MANIFEST}: ledger_name {ledger_name!r} is not a file name")
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.restore-", dir=directory.parent))
    except OSError as exc:  # the station's user restoring into /var/lib/tether-station: /var/lib is root's
        raise StationError(f"--dir {directory}: cannot create the restore's staging directory in "
                           f"{directory.parent} ({exc.strerror or exc}); restore as a user who can write there "
                           "(root), then give the directory to the station's user (chown -R)") from None
    try:
        for name, (data, mode) in members.items():
            target = staging / (name.removeprefix(DIR_PREFIX) if name != LEDGER_MEMBER else str(ledger_name))
            target.parent.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
            _write_new(target, data, mode & FILE_MODES if name != LEDGER_MEMBER else 0o600)
        if LEDGER_MEMBER in members:
            _check_sqlite(staging / str(ledger_name))
        os.chmod(staging, DIR_MODE)
        aside = None
        if directory.exists():
            if any(directory.iterdir()):
                stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now if now is not None else time.time()))
                aside = directory.with_name(f"{directory.name}.before-restore-{stamp}")
                os.rename(directory, aside)
            else:
                directory.rmdir()
        os.rename(staging, directory)
    except BaseException:
        with contextlib.suppress(OSError):
            _remove_tree(staging)
        raise
    return len(members), aside


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create `path` with `mode` before any byte is written, then fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)  # whatever the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_sqlite(path: Path) -> None:
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            result = conn.execute("PRAGMA integrity_check").fetchone()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise StationError(f"archive member {LEDGER_MEMBER!r}: not a SQLite database: {exc}") from None
    if result != ("ok",):
        raise StationError(f"archive member {LEDGER_MEMBER!r}: SQLite integrity check failed: {result}")


def _remove_tree(path: Path) -> None:
    for child in sorted(path.rglob("*"), reverse=True):
        child.rmdir() if child.is_dir() and not child.is_symlink() else child.unlink()
    path.rmdir()
