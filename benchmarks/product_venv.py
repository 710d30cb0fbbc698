"""The product as a device installs it, for benchmarks: a clean virtual environment with Tether installed
from its wheel (not the checkout's editable install, whose import hooks add 10-18 ms to every interpreter
start), its dependencies pinned by requirements-test.txt, bytecode compiled by pip.

Both sides of a start-up comparison run from this one interpreter, so neither pays for the other's setup.
The environment is cached under ~/.cache/tether/bench-venv-<digest of the pins>; the wheel is rebuilt and
reinstalled on every call, so the figures are always of the code in the checkout.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _pins() -> Path:
    return REPO / "requirements-test.txt"


def product_venv() -> Path:
    """The venv's directory (its `bin/python`, `bin/tether`), with the checkout's code installed."""
    digest = hashlib.sha256(_pins().read_bytes()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tether" / f"bench-venv-{digest}"
    python = cache / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(cache)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
    # setuptools builds through the checkout's build/lib and never deletes from it: a module removed from
    # the checkout would still be copied into the wheel (seen in issue 24's sixth round: hal/errors.py)
    shutil.rmtree(REPO / "build", ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix="tether-wheel-") as out:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", out, str(REPO)],
                       check=True, capture_output=True)
        wheel = next(Path(out).glob("tether-*.whl"))
        # the runtime's dependencies at the locked versions, then the wheel itself (always reinstalled)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-c", str(_pins()), str(wheel)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(wheel)],
                       check=True)
    return cache


if __name__ == "__main__":
    print(product_venv())
