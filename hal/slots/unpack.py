"""Unpacking a tar payload into a slot without following, creating or trusting a link.

`tarfile`'s `filter="data"` is not enough on its own: before Python 3.11.13 / 3.12.11 / 3.13.4 a chain of
symlinks that pushes `os.path.realpath()` past PATH_MAX makes the filter approve a link that the kernel
then follows out of the destination (CVE-2025-4517). So the interpreter's patch level is not trusted here:

- every member is checked before anything is written: only regular files and directories, a relative
  name without `..`, no name the slot reserves, no file listed twice or used as a directory;
  symbolic links, hard links, devices, fifos and sparse files are refused with the member's name;
- extraction walks the slot with directory file descriptors opened O_NOFOLLOW, creates every directory
  itself (one that already exists is refused), and opens every file O_CREAT|O_EXCL|O_NOFOLLOW, so no
  byte can land outside the slot even if the checks above had a hole;
- modes lose setuid, setgid, sticky and group/other write (owner read/write kept), as "data" does;
  ownership is never taken from the archive.

`extract_tar` raises `UnsafeArchiveError` (nothing written yet) or `SlotError` (an I/O failure midway); the
caller empties the slot after either.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from hal.slots import SlotError

COPY_SIZE = 1 << 20
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafeArchiveError(SlotError):
    """A member of the archive could write outside the slot or is not plain data; nothing was extracted."""


@dataclass(frozen=True)
class _Entry:
    member: tarfile.TarInfo
    parts: tuple[str, ...]   # the name split into components, '.' and empty ones dropped


def show(name: str, limit: int = 80) -> str:
    """A member name fit for an error message: quoted, control characters escaped, long ones shortened."""
    if len(name) <= limit:
        return repr(name)
    return f"{name[:limit]!r}... ({len(name)} characters)"


def _kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return f"a symbolic link (to {show(member.linkname, 40)})"
    if member.islnk():
        return f"a hard link (to {show(member.linkname, 40)})"
    if member.ischr() or member.isblk():
        return "a device node"
    if member.isfifo():
        return "a fifo"
    return f"of tar type {member.type!r}"


def _parts(member: tarfile.TarInfo) -> tuple[str, ...]:
    name = member.name
    if "\0" in name:
        raise UnsafeArchiveError(f"member {show(name)}: the name contains a NUL character")
    if name.startswith("/"):
        raise UnsafeArchiveError(f"member {show(name)}: absolute names are refused (it would land outside "
                                 "the slot)")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise UnsafeArchiveError(f"member {show(name)}: '..' in a name is refused (it would land outside "
                                 "the slot)")
    return parts


def plan(members: Iterable[tarfile.TarInfo], reserved: Iterable[str] = ()) -> list[_Entry]:
    """Check every member (see the module docstring); return what to extract, in archive order."""
    reserved = set(reserved)
    files: set[tuple[str, ...]] = set()
    dirs: set[tuple[str, ...]] = set()
    entries = []
    for member in members:
        parts = _parts(member)
        if member.issparse():
            raise UnsafeArchiveError(f"member {show(member.name)} is a sparse file: refused (it can expand far "
                                     "beyond the payload's size); pack it without --sparse")
        if not (member.isreg() or member.isdir()):
            raise UnsafeArchiveError(f"member {show(member.name)} is {_kind(member)}: only regular files and "
                                     "directories are extracted (links could lead outside the slot, "
                                     "CVE-2025-4517)")
        if not parts:
            if member.isdir():
                continue  # "./": the slot itself
            raise UnsafeArchiveError(f"member {show(member.name)}: a file needs a name")
        if parts[0] in reserved:
            raise UnsafeArchiveError(f"member {show(member.name)}: {parts[0]!r} is reserved for the slot's own "
                                     "records")
        for depth in range(1, len(parts) + (1 if member.isdir() else 0)):
            if parts[:depth] in files:
                raise UnsafeArchiveError(f"member {show(member.name)}: {show('/'.join(parts[:depth]))} is "
                                         "a file earlier in the archive, not a directory")
            dirs.add(parts[:depth])
        if member.isreg():
            if parts in files or parts in dirs:
                raise UnsafeArchiveError(f"member {show(member.name)} appears twice in the archive")
            files.add(parts)
        entries.append(_Entry(member, parts))
    return entries


def _mtime(member: tarfile.TarInfo) -> float:
    """The member's mtime, or 0 (left as "now") when out of the range a file system can hold."""
    mtime = float(member.mtime)
    return mtime if 0 <= mtime < 2**33 else 0.0


def _file_mode(mode: int) -> int:
    return (mode & 0o755) | 0o600


def _dir_mode(mode: int) -> int:
    return (mode & 0o755) | 0o700


class _Writer:
    """Creates directories and files under one root fd, never through a link; see the module docstring."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root_fd = os.open(root, DIR_FLAGS)
        self.created: set[tuple[str, ...]] = {()}
        self.dir_meta: dict[tuple[str, ...], tuple[int, float]] = {}

    def close(self) -> None:
        os.close(self.root_fd)

    def _open_dir(self, parts: tuple[str, ...]) -> int:
        """An fd for directory `parts`, creating each missing component (mode 0700 until `finish`)."""
        fd = os.dup(self.root_fd)
        try:
            for depth in range(1, len(parts) + 1):
                name = parts[depth - 1]
                if parts[:depth] not in self.created:
                    os.mkdir(name, 0o700, dir_fd=fd)  # FileExistsError: something we did not make is there
                    self.created.add(parts[:depth])
                    self.dir_meta.setdefault(parts[:depth], (0o755, 0.0))
                child = os.open(name, DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = child
            return fd
        except BaseException:
            os.close(fd)
            raise

    def directory(self, entry: _Entry) -> None:
        os.close(self._open_dir(entry.parts))
        self.dir_meta[entry.parts] = (_dir_mode(entry.member.mode), _mtime(entry.member))

    def file(self, entry: _Entry, archive: tarfile.TarFile) -> None:
        source = archive.extractfile(entry.member)
        if source is None:  # isreg() members always have data; a None here is tarfile's bug, not ours
            raise SlotError(f"member {show(entry.member.name)}: tarfile returned no data")
        parent = self._open_dir(entry.parts[:-1])
        try:
            fd = os.open(entry.parts[-1], FILE_FLAGS, 0o600, dir_fd=parent)
        finally:
            os.close(parent)
        try:
            while chunk := source.read(COPY_SIZE):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
            os.fchmod(fd, _file_mode(entry.member.mode))
            if mtime := _mtime(entry.member):
                os.utime(fd, (mtime, mtime))
            os.fsync(fd)
        finally:
            os.close(fd)

    def finish(self) -> None:
        """Give directories their final mode and time, deepest first (a 0555 one must not block its files)."""
        for parts in sorted(self.dir_meta, key=len, reverse=True):
            mode, mtime = self.dir_meta[parts]
            fd = self._open_dir(parts)
            try:
                os.fsync(fd)
                os.fchmod(fd, mode)
                if mtime:
                    os.utime(fd, (mtime, mtime))
            finally:
                os.close(fd)


def extract_tar(archive_path: Path, dest: Path, reserved: Iterable[str] = ()) -> int:
    """Extract the tar at `archive_path` into the existing directory `dest`; return the member count.

    `dest` must hold no entry the archive names (the slot is emptied first). Raises UnsafeArchiveError
    before writing anything when a member is refused, SlotError for an I/O failure (naming the member).
    """
    try:
        archive = tarfile.open(archive_path, "r:*")  # noqa: SIM115 - closed by the `with` below
    except (OSError, tarfile.TarError) as exc:
        raise SlotError(f"{archive_path}: not a readable tar archive: {exc}") from exc
    with archive:
        try:
            entries = plan(archive.getmembers(), reserved)
        except tarfile.TarError as exc:
            raise SlotError(f"{archive_path}: corrupt tar archive: {exc}") from exc
        writer = _Writer(dest)
        entry: _Entry | None = None
        try:
            for entry in entries:
                if entry.member.isdir():
                    writer.directory(entry)
                else:
                    writer.file(entry, archive)
            entry = None
            writer.finish()
        except FileExistsError as exc:
            where = show(entry.member.name) if entry else "a directory"
            raise SlotError(f"member {where}: {exc.filename or 'an entry'} already exists in {dest} and was not "
                            "made by this extraction") from exc
        except (OSError, tarfile.TarError) as exc:
            where = f"member {show(entry.member.name)}" if entry else "setting directory modes"
            raise SlotError(f"{where}: {exc}") from exc
        finally:
            writer.close()
    return len(entries)
