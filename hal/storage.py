"""Atomic state on disk: temp file in the same directory, fsync, rename, fsync of the directory.

A power cut at any point leaves either the old file or the new one, never a mix. Permissions are
set on the temp file before any byte is written, so a secret never exists world-readable. The temp
file has a random name and is created with O_EXCL|O_NOFOLLOW (never a file or link someone planted),
and a secret is refused in a directory other users can write to (issue 13, item 6).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from typing import Any, TypeVar

try:
    from _json import encode_basestring_ascii, make_scanner  # the C halves json.dumps and json.loads use
except ImportError:  # an interpreter without CPython's private accelerator: json's own Python halves
    from json import JSONDecoder
    from json.encoder import encode_basestring_ascii  # type: ignore[assignment]  # same signature

    def make_scanner(context: object) -> Any:  # type: ignore[misc,no-redef]
        """The pure-Python scanner a default JSONDecoder builds; `context` holds json.loads's defaults."""
        return JSONDecoder().scan_once  # type: ignore[attr-defined]  # set by its __init__

from hal import StorageError

SECRET_MODE = 0o600
PUBLIC_MODE = 0o644
P = TypeVar("P", bound="str | os.PathLike[str]")


def ensure_dir(path: P, mode: int = 0o700) -> P:
    """Create `path` (and parents) if missing; return `path`."""
    try:
        os.makedirs(path, mode, exist_ok=True)  # as Path.mkdir(parents=True): `mode` for the last one only
    except OSError as exc:
        raise StorageError(f"{path}: cannot create directory: {exc.strerror}") from exc
    return path


def fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


TEMP_ATTEMPTS = 5  # fresh random names tried when one is taken (only another writer or an attacker takes one)


def _temp_suffix() -> str:
    """Random part of a temp file's name: unguessable, so nobody can plant a file where we will write."""
    return os.urandom(8).hex()  # what secrets.token_hex(8) returns, without importing secrets (hmac, random)


def _is_secret(mode: int) -> bool:
    return mode & 0o077 == 0


def _check_private(directory: str, st: os.stat_result) -> None:
    """StorageError unless only we (and root) can create or replace entries in `directory`.

    Group- or other-writable is refused unless the directory is sticky and ours: with the sticky bit
    only the owner of an entry or of the directory can rename or remove it, so nobody else can swap our
    file after we wrote it. A secret written elsewhere could be read through a file planted beforehand.
    """
    writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if writable and not (st.st_mode & stat.S_ISVTX and st.st_uid == os.geteuid()):
        who = "other users" if st.st_mode & stat.S_IWOTH else "its group"
        raise StorageError(f"{directory}: refusing to write a secret into a directory {who} can write to "
                           f"(mode {stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid}); "
                           f"make it private (chmod 700 {directory}) or choose another directory")


def atomic_write(path: str | os.PathLike[str], data: bytes, mode: int = SECRET_MODE, *, durable: bool = True) -> None:
    """Replace `path` with `data` atomically and durably; the file gets exactly `mode`.

    `durable=False` is for volatile files that the next update rewrites anyway (status.json): still
    atomic (a reader sees the old content or the new, never a mix), but neither the file nor the
    directory is fsynced, so a power cut may bring back the previous version.

    The temp file has a random name and is created with O_EXCL|O_NOFOLLOW, so it is always a new file
    of ours (never one planted by another user, nor a link). A secret (`mode` without group/other bits)
    is refused in a directory other users can write to. Raises StorageError naming the file and the
    reason (disk full, permission, unsafe directory) and leaves the previous content of `path` untouched.
    """
    target = os.fspath(path)
    directory = os.path.dirname(target) or "."
    ensure_dir(directory)
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise StorageError(f"{directory}: cannot open the directory: {exc.strerror}") from exc
    try:
        # Every step below goes through dir_fd: a directory swapped after this check changes nothing.
        if _is_secret(mode):
            _check_private(directory, os.fstat(dir_fd))
        _write_via(dir_fd, target, data, mode, durable)
    finally:
        os.close(dir_fd)


def _create_temp(dir_fd: int, target: str, mode: int) -> tuple[str, int]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(TEMP_ATTEMPTS):
        # The pid stays last in the name: _sweep_stale_temps reads it to find writers that died.
        name = f".{os.path.basename(target)}.tmp-{_temp_suffix()}-{os.getpid()}"
        try:
            return name, os.open(name, flags, mode, dir_fd=dir_fd)
        except FileExistsError:
            continue
    raise StorageError(f"{target}: cannot create a temp file: {TEMP_ATTEMPTS} random names were all taken "
                       f"in {os.path.dirname(target) or '.'} (is someone planting files there?); the previous "
                       "content is unchanged")


def _write_via(dir_fd: int, target: str, data: bytes, mode: int, durable: bool = True) -> None:
    tmp = ""
    try:
        tmp, fd = _create_temp(dir_fd, target, mode)
        try:
            os.fchmod(fd, mode)  # O_CREAT honours the umask; the mode must be exact before data lands
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        name = os.path.basename(target)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        tmp = ""
        _sweep_stale_temps(dir_fd, name)
        if durable:
            os.fsync(dir_fd)
    except OSError as exc:
        if tmp:
            try:
                os.unlink(tmp, dir_fd=dir_fd)
            except FileNotFoundError:
                pass
            except OSError as cleanup:
                raise StorageError(f"{target}: write failed ({exc.strerror}) and the temp file "
                                   f"{os.path.join(os.path.dirname(target), tmp)} could not be removed "
                                   f"({cleanup.strerror})") from exc
        hint = " (disk full: free space in the state directory)" if exc.errno == errno.ENOSPC else ""
        raise StorageError(f"{target}: cannot write: {exc.strerror}{hint}; the previous content is "
                           "unchanged") from exc


def _sweep_stale_temps(dir_fd: int, name: str) -> None:
    """Remove temp files of `name` (in the directory open as `dir_fd`) left by writers that died before
    their rename (kill -9, power cut): for a key they hold a whole private key nobody uses. Files of
    live writers are kept."""
    prefix = f".{name}.tmp-"
    for stale in os.listdir(dir_fd):
        if not stale.startswith(prefix):
            continue
        pid = stale.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(stale, dir_fd=dir_fd)
        except PermissionError:  # alive, owned by another user
            continue


def read_bytes(path: str | os.PathLike[str]) -> bytes | None:
    """Return the file's content, or None when it does not exist."""
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StorageError(f"{path}: cannot read: {exc.strerror}") from exc


def remove(path: str | os.PathLike[str]) -> None:
    """Delete a file if present, durably."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StorageError(f"{path}: cannot remove: {exc.strerror}") from exc
    fsync_dir(os.path.dirname(os.fspath(path)) or ".")


def read_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A small JSON state file as a dict; {} when it is absent.

    State files are rewritten atomically, so a corrupt one (not JSON, not an object) means someone
    edited it by hand or the storage failed: it is logged and moved aside to `<name>.corrupt` (kept for
    a post-mortem, never silently emptied) and the caller starts from {}; its next write repairs it.
    """
    data = read_bytes(path)
    if data is None:
        return {}
    try:
        value = parse_json(data)
    except ValueError as exc:
        set_aside(path, f"not JSON ({exc})")
        return {}
    if not isinstance(value, dict):
        set_aside(path, f"expected a JSON object, found {type(value).__name__}")
        return {}
    return value


def set_aside(path: str | os.PathLike[str], why: str, then: str = "starting from empty") -> None:
    """Move a corrupt state file to `<name>.corrupt` (kept for a post-mortem) and log an error saying
    why and what happens now (`then`). The one way every state file's reader handles corruption:
    never silently emptied, never read again."""
    import logging

    path = os.fspath(path)
    aside = path + ".corrupt"
    try:
        os.replace(path, aside)
        fsync_dir(os.path.dirname(path) or ".")
    except FileNotFoundError:
        return
    except OSError as exc:
        logging.getLogger("tether.storage").error("%s: corrupt state file (%s) and cannot move it aside: %s; "
                                                  "%s", path, why, exc.strerror, then)
        return
    logging.getLogger("tether.storage").error("%s: corrupt state file (%s); moved to %s, %s", path, why, aside,
                                              then)


def write_json(path: str | os.PathLike[str], value: dict[str, Any], mode: int = PUBLIC_MODE, *,
               durable: bool = True) -> None:
    """Write a small JSON state file atomically (sorted keys, so diffs and reviews stay readable);
    `durable` as for `atomic_write`."""
    atomic_write(path, dump_json(value), mode, durable=durable)


class _Scanner:
    """What `_json.make_scanner` reads from a `json.JSONDecoder`: json.loads's defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = float  # NaN, Infinity, -Infinity: what json.decoder's table gives


_scan = make_scanner(_Scanner())  # type: ignore[arg-type]  # typeshed wants a JSONDecoder; it reads these
_WHITESPACE = " \t\n\r"  # RFC 8259 section 2: the only whitespace JSON has


def parse_json(data: bytes) -> Any:
    """`json.loads(data)`, by the same C scanner, without importing `json` unless `data` is refused.

    `json` compiles six regular expressions when it is imported, and `tether run` reads its state
    records (chain facts, boot record, configuration cache) before its first packet (issue 24). The
    scanner json.loads drives is `_json`'s; this drives it the same way for UTF-8 text. Whatever it
    does not accept goes to json.loads itself, so an error is json's own (ValueError, naming the
    character), word for word."""
    try:
        text = data.decode()
        start = len(text) - len(text.lstrip(_WHITESPACE))
        value, end = _scan(text, start)
        if not text[end:].strip(_WHITESPACE):
            return value
    except (StopIteration, ValueError, SystemError):  # 3.11's _json raises SystemError when json is not loaded
        pass
    import json

    return json.loads(data)


def dump_json(value: Any) -> bytes:
    """`json.dumps(value, indent=1, sort_keys=True).encode()`, byte for byte, without importing `json`.

    With an indent, json.dumps encodes in Python anyway (its C encoder is for compact output only);
    this is that encoder for the types a record holds, quoting strings with the same C function.
    Anything else is a TypeError, as json.dumps raises it."""
    out: list[str] = []
    _encode(value, 0, out)
    return "".join(out).encode()


def _encode(value: Any, level: int, out: list[str]) -> None:
    if isinstance(value, str):
        out.append(encode_basestring_ascii(value))
    elif value is None or value is True or value is False:
        out.append(_CONSTANTS[value])
    elif isinstance(value, int):
        out.append(int.__repr__(value))
    elif isinstance(value, float):
        out.append(_float(value))
    elif isinstance(value, list | tuple | dict):
        if not value:
            out.append("{}" if isinstance(value, dict) else "[]")
            return
        inner = "\n" + " " * (level + 1)
        out.append("{" if isinstance(value, dict) else "[")
        separator = inner
        if isinstance(value, dict):
            for key, item in sorted(value.items()):
                out.append(separator + encode_basestring_ascii(_key(key)) + ": ")
                _encode(item, level + 1, out)
                separator = "," + inner
        else:
            for item in value:
                out.append(separator)
                _encode(item, level + 1, out)
                separator = "," + inner
        out.append("\n" + " " * level + ("}" if isinstance(value, dict) else "]"))
    else:
        raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


_CONSTANTS = {None: "null", True: "true", False: "false"}


def _float(value: float) -> str:
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "Infinity" if value > 0 else "-Infinity"
    return float.__repr__(value)


def _key(key: Any) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, float):
        return _float(key)
    if key is None or key is True or key is False:
        return _CONSTANTS[key]
    if isinstance(key, int):
        return int.__repr__(key)
    raise TypeError(f"keys must be str, int, float, bool or None, not {type(key).__name__}")
