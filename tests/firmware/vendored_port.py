"""Build the MicroPython unix port the way boards are built, from the vendored source, and cache it.

Boards do not run ``.mpy`` files from a filesystem by choice: they run the firmware frozen into their
image (``make BOARD=... FROZEN_MANIFEST=firmware/manifest.py``) or from a ROMFS partition mapped from
flash (MicroPython 1.25+). The PyPI unix port can do neither, so the tests build the port themselves
from ``<repo>/../shared/vendor/micropython-*-unix-src.tar.gz`` (shared/vendor/README.md), in three
flavours (FLAVOURS):

- ``frozen-32`` / ``frozen-64``: the standard variant with ``FROZEN_MANIFEST`` including
  firmware/manifest.py, 32-bit (``-m32``, Debian's gcc-multilib) and 64-bit;
- ``romfs-64`` / ``romfs-32``: the standard variant plus ``vfs.rom_ioctl`` (tests/firmware/unix_variants/romfs),
  nothing of ours frozen. ``main.c`` is patched (ROMFS_PATCH) so its one ROM segment is the file
  named by ``$MICROPY_ROMFS_IMAGE``, mapped read-only outside the GC heap as a board maps its
  partition, and mounted at ``/rom`` at start-up as a board's boot code does.

A build is cached under ``~/.cache/tether/micropython/`` (``$TETHER_MICROPYTHON_CACHE``), keyed on the
tarball's hash, the flavour's flags, the patch, the variant files and, for a frozen flavour, the
manifest and every frozen source; a changed firmware source rebuilds only the frozen flavours. A
missing tarball or compiler raises BuildError with what to install: no test skips for lack of them.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
SOURCE_NAME = "micropython-1c3c201149-unix-src.tar.gz"


def _tarball() -> Path:
    # <repo>/../shared/vendor/, or the same beside a parent (a git worktree under the checkout's parent)
    for parent in REPO.parents:
        candidate = parent / "shared" / "vendor" / SOURCE_NAME
        if candidate.is_file():
            return candidate
    return REPO.parent / "shared" / "vendor" / SOURCE_NAME


TARBALL = _tarball()
VARIANTS = Path(__file__).resolve().parent / "unix_variants"
CACHE = Path(os.environ.get("TETHER_MICROPYTHON_CACHE", Path.home() / ".cache" / "tether" / "micropython"))
SSL_WRAPPER = "lib/micropython-lib/python-stdlib/ssl"  # the unix port's `ssl` is this .py around `tls`
# the build the README recipe describes: no btree (its Berkeley DB submodule is not vendored), no ffi
MAKE_FLAGS = ("MICROPY_PY_BTREE=0", "MICROPY_PY_FFI=0")


class BuildError(AssertionError):
    """The port cannot be built here; the message says what is missing and how to install it."""


@dataclass(frozen=True)
class Flavour:
    name: str
    bits: int              # 32 builds with -m32
    frozen: bool           # firmware/manifest.py frozen into the image
    variant: str           # "standard", or a directory under unix_variants/

    @property
    def cflags(self) -> str:
        return "-m32" if self.bits == 32 else ""


FLAVOURS = {f.name: f for f in (
    Flavour("frozen-32", 32, True, "standard"),
    Flavour("frozen-64", 64, True, "standard"),
    Flavour("romfs-64", 64, False, "romfs"),
    Flavour("romfs-32", 32, False, "romfs"),
)}

# ports/unix/main.c: the one ROM segment becomes $MICROPY_ROMFS_IMAGE, mmap'd read-only (a board's
# flash partition: outside the GC heap, executed in place), and it is mounted at start-up.
ROMFS_PATCH = (
    ("static const MP_DEFINE_MEMORYVIEW_OBJ(romfs_obj, 'B', 0, sizeof(romfs_buf), romfs_buf);\n",
     """static MP_DEFINE_MEMORYVIEW_OBJ(romfs_obj, 'B', 0, sizeof(romfs_buf), romfs_buf);

#include <fcntl.h>
#include <sys/mman.h>

// Tether: map $MICROPY_ROMFS_IMAGE read-only, outside the GC heap, as a board maps its partition.
static void romfs_map_image(void) {
    const char *path = getenv("MICROPY_ROMFS_IMAGE");
    struct stat st;
    int fd = path == NULL ? -1 : open(path, O_RDONLY);
    if (fd < 0 || fstat(fd, &st) != 0 || st.st_size == 0) {
        fprintf(stderr, "MICROPY_ROMFS_IMAGE=%s: cannot read the image\\n", path ? path : "");
        exit(1);
    }
    void *image = mmap(NULL, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (image == MAP_FAILED) {
        fprintf(stderr, "MICROPY_ROMFS_IMAGE=%s: cannot map the image\\n", path);
        exit(1);
    }
    romfs_obj.items = image;
    romfs_obj.len = st.st_size;
}

void tether_romfs_on_path(void) {
    // A board's boot code appends these after its default sys.path; the unix port sets its path
    // after mp_init() has mounted the image, so they are added again here.
    if (getenv("MICROPY_ROMFS_IMAGE") != NULL) {
        mp_obj_list_append(mp_sys_path, MP_OBJ_NEW_QSTR(MP_QSTR__slash_rom));
        mp_obj_list_append(mp_sys_path, MP_OBJ_NEW_QSTR(MP_QSTR__slash_rom_slash_lib));
    }
}
"""),
    ("        case MP_VFS_ROM_IOCTL_GET_SEGMENT:\n",
     """        case MP_VFS_ROM_IOCTL_GET_SEGMENT:
            if (romfs_obj.items == romfs_buf && getenv("MICROPY_ROMFS_IMAGE") != NULL) {
                romfs_map_image();  // mp_init() mounts the segment at /rom, as on a board
            }
"""),
    ("    mp_obj_list_init(MP_OBJ_TO_PTR(mp_sys_argv), 0);\n",
     """    #if MICROPY_VFS_ROM_IOCTL
    {
        void tether_romfs_on_path(void);
        tether_romfs_on_path();
    }
    #endif

    mp_obj_list_init(MP_OBJ_TO_PTR(mp_sys_argv), 0);
"""),
)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def frozen_sources() -> list[Path]:
    """firmware/manifest.py and every file it freezes (its SHIPPED list)."""
    scope: dict[str, object] = {}
    manifest = REPO / "firmware" / "manifest.py"
    exec(compile(manifest.read_text(), str(manifest), "exec"), scope)  # noqa: S102 - our own manifest
    return [manifest, *(REPO / rel for rel in scope["SHIPPED"])]  # type: ignore[attr-defined]


def build_key(flavour: Flavour) -> str:
    """What the build depends on, hashed: any change makes a new cache entry."""
    digest = hashlib.sha256()
    for part in (_sha256(TARBALL), flavour.name, flavour.cflags, repr(MAKE_FLAGS), repr(ROMFS_PATCH)):
        digest.update(part.encode() + b"\0")
    files = sorted((VARIANTS / flavour.variant).glob("*")) if flavour.variant != "standard" else []
    if flavour.frozen:
        files += frozen_sources()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:20]


def _check_tools(flavour: Flavour) -> None:
    if not TARBALL.is_file():
        raise BuildError(f"the vendored MicroPython source is missing: {TARBALL} (see shared/vendor/README.md)")
    for tool in ("make", "gcc"):
        if shutil.which(tool) is None:
            raise BuildError(f"{tool} is not installed; run scripts/install-deps.sh (Debian: build-essential)")
    if flavour.bits == 32:
        probe = subprocess.run(["gcc", "-m32", "-x", "c", "-o", "/dev/null", "-"], input=b"int main(void){return 0;}",
                               capture_output=True, check=False)
        if probe.returncode != 0:
            raise BuildError("gcc cannot build 32-bit programs; run scripts/install-deps.sh (Debian: gcc-multilib)\n"
                             + probe.stderr.decode(errors="replace")[-500:])


def _run(cmd: list[str], cwd: Path, log: Path) -> None:
    with log.open("ab") as out:
        out.write(("$ " + " ".join(cmd) + "\n").encode())
        out.flush()
        done = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise BuildError(f"{' '.join(cmd[:3])} ... failed (exit {done.returncode}); log: {log}\n"
                         + log.read_text(errors="replace")[-3000:])


def _source_tree(work: Path, log: Path) -> Path:
    """The tarball unpacked in ``work``, main.c patched, the variants added and mpy-cross built."""
    with tarfile.open(TARBALL) as tar:
        tar.extractall(work, filter="data")
    src = work / "micropython"
    main_c = src / "ports" / "unix" / "main.c"
    text = main_c.read_text()
    for anchor, replacement in ROMFS_PATCH:
        if text.count(anchor) != 1:
            raise BuildError(f"{main_c}: the ROMFS patch no longer applies (anchor {anchor.strip()!r})")
        text = text.replace(anchor, replacement)
    main_c.write_text(text)
    for variant in VARIANTS.iterdir():
        shutil.copytree(variant, src / "ports" / "unix" / "variants" / variant.name)
    _run(["make", "-C", "mpy-cross", f"-j{os.cpu_count() or 2}"], src, log)
    return src


def ensure(name: str) -> Path:
    """The ``micropython`` program of flavour ``name``, built (once per key) and cached."""
    flavour = FLAVOURS[name]
    _check_tools(flavour)
    entry = CACHE / f"{flavour.name}-{build_key(flavour)}"
    program = entry / "micropython"
    if program.is_file():
        return program
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test run may be building the same entry
        if program.is_file():
            return program
        for leftover in CACHE.glob(".build-*"):  # a build killed half way (we hold the lock)
            shutil.rmtree(leftover, ignore_errors=True)
        started = time.monotonic()
        with tempfile.TemporaryDirectory(dir=CACHE, prefix=".build-") as tmp:
            work = Path(tmp)
            log = work / "build.log"
            src = _source_tree(work, log)
            manifest = work / "board.manifest.py"
            lines = [f'module("ssl.py", base_path="{src / SSL_WRAPPER}")']
            if flavour.frozen:
                lines.append(f'include("{REPO / "firmware" / "manifest.py"}")')
            manifest.write_text("\n".join(lines) + "\n")
            cmd = ["make", "-C", "ports/unix", f"-j{os.cpu_count() or 2}", f"VARIANT={flavour.variant}",
                   "BUILD=build-tether", *MAKE_FLAGS, f"FROZEN_MANIFEST={manifest}"]
            if flavour.cflags:
                cmd += [f"CFLAGS_EXTRA={flavour.cflags}", f"LDFLAGS_EXTRA={flavour.cflags}"]
            _run(cmd, src, log)
            staged = work / "entry"
            staged.mkdir()
            shutil.copy2(src / "ports" / "unix" / "build-tether" / "micropython", staged / "micropython")
            (staged / "build.txt").write_text(f"{' '.join(cmd)}\nbuilt in {time.monotonic() - started:.1f} s\n")
            os.replace(staged, entry)
    return program


def build_seconds(program: Path) -> str:
    """How long the cached build took, from its record ("built in N s")."""
    return (program.parent / "build.txt").read_text().splitlines()[-1]
