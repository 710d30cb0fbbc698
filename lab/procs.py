"""Starting and stopping the real processes of a test bed: ports, readiness with a deadline.

Ports: our own servers bind port 0 and report the port they got (an attribute in-process, `--port-file`
for `tether-station serve` and `python -m lab.artifacts`; see `read_port_file`). A program that must be
told its port up front (mosquitto, swtpm, PostgreSQL) is started through `start_on_free_port`: when
another process took the port first, the program exits saying "Address already in use" and it is
started again on another port. A port found free and handed to a server to bind later is a race
(another process can take it in between), so nothing does that without this retry.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from hal import TetherError

T = TypeVar("T")

PORT_TRIES = 5
ADDRESS_IN_USE = os.strerror(errno.EADDRINUSE)  # as programs print it: "Address already in use"


class LabError(TetherError):
    """A lab service failed to start or stopped unexpectedly."""


class AddressInUse(LabError):
    """A program could not bind its port because another process holds it."""


class WaitTimeout(LabError):
    """`wait_until` gave up; `last` is what the predicate returned the last time it was asked."""

    def __init__(self, message: str, last: object) -> None:
        super().__init__(message)
        self.last = last


def start_on_free_port(start: Callable[[int], T], what: str, ports: Iterable[int] | None = None) -> T:
    """`start(port)` on a port the kernel picks, again on another one while it raises AddressInUse.

    For programs that must be given their port up front. `start` must raise AddressInUse (see
    `Proc.check_alive`) when the port was taken, and clean up after itself before raising. `ports`
    replaces the kernel's picks (tests put a held port first to force a clash). After PORT_TRIES
    clashes, or when `ports` runs out, raises LabError naming `what` and every port tried.
    """
    tried: list[int] = []
    last: AddressInUse | None = None
    for port in itertools.islice(kernel_ports() if ports is None else ports, PORT_TRIES):
        try:
            return start(port)
        except AddressInUse as exc:
            tried.append(port)
            last = exc
    raise LabError(f"{what}: could not start, the address was in use on every port tried "
                   f"({', '.join(map(str, tried)) or 'none'}); other processes keep taking loopback ports. "
                   f"The last try: {last}")


def kernel_ports(host: str = "127.0.0.1") -> Iterator[int]:
    """Ports the kernel would hand out, one per `next`. Only for `start_on_free_port`: by the time a
    program binds one, another process may have taken it, and then the program is started elsewhere."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        yield port


@contextlib.contextmanager
def refusing_port(host: str = "127.0.0.1") -> Iterator[int]:
    """A loopback port where every connection is refused for as long as the block runs: bound by us
    but not listening, so nothing else can start listening there (an unreachable endpoint in a test)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))  # no SO_REUSEADDR: a server that sets it cannot bind this port either
        yield int(s.getsockname()[1])


def read_port_file(path: Path, proc: Proc, timeout: float = 20.0) -> dict[str, int]:
    """The ports a server started with `--port-file path` bound, once it has written them.

    The file is JSON, service name to port (`{"est": 40123, "console": 40124}`), written atomically
    after every socket listens, so a connection made after this returns is accepted. Remove a stale
    file before starting the server. LabError when `proc` exits first or nothing comes in `timeout`.
    """
    def written() -> dict[str, int] | None:
        try:
            return {str(k): int(v) for k, v in json.loads(path.read_text()).items()}
        except FileNotFoundError:
            proc.check_alive()
            return None

    found = wait_until(written, timeout, f"{proc.name} to write its ports to {path}",
                       describe=lambda: f"{proc.name} log ends:\n{proc.tail()}")
    return found  # type: ignore[return-value]


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.02,
               describe: Callable[[], object] | None = None) -> object:
    """Poll `predicate` until it returns a truthy value (returned) or `timeout` seconds pass.

    On timeout raises WaitTimeout naming `what`, the predicate's last value and, when given,
    `describe()` called at that moment (the state a failing test should show: a status file, a count).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            message = f"timed out after {timeout:.1f}s waiting for {what}; the last check returned {value!r}"
            if describe is not None:
                message += f"; state then: {_described(describe)}"
            raise WaitTimeout(message, value)
        time.sleep(interval)


def _described(describe: Callable[[], object]) -> str:
    try:
        return str(describe())
    except Exception as exc:  # noqa: BLE001 - the timeout is the error to report; say why the state is missing
        return f"(could not be read: {type(exc).__name__}: {exc})"


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class Proc:
    """A child process with its output appended to a log file, stopped on `stop()`."""

    def __init__(self, name: str, argv: Sequence[str], log: Path, env: dict[str, str] | None = None,
                 cwd: str | Path | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as fh:
            self.log_start = fh.tell()  # what an earlier run wrote to the same log ends here
            self.popen = subprocess.Popen(self.argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def check_alive(self) -> None:
        """LabError when the process has exited: AddressInUse when it said its port was taken."""
        if self.alive():
            return
        if ADDRESS_IN_USE in self.output():
            raise AddressInUse(f"{self.name} exited with {self.popen.returncode}: another process holds its port "
                               f"({ADDRESS_IN_USE!r}); its log {self.log} ends:\n{self.tail()}")
        raise LabError(f"{self.name} exited with {self.popen.returncode}; its log {self.log} ends:\n{self.tail()}")

    def output(self) -> str:
        """What this run has written to the log so far (not what earlier runs appended)."""
        try:
            with open(self.log, "rb") as fh:
                fh.seek(self.log_start)
                return fh.read().decode(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_output(self, text: str, timeout: float = 10.0) -> None:
        """Wait until this run has written `text` to its log (a program's own "ready" line); LabError
        (AddressInUse when its port was taken) if it exits first."""
        def said() -> bool:
            if text in self.output():
                return True
            self.check_alive()
            return False
        wait_until(said, timeout, f"{self.name} to log {text!r}", describe=lambda: f"log ends:\n{self.tail()}")

    def kill(self) -> None:
        """SIGKILL, as a crash or a power cut would."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(5)

    def stop(self, timeout: float = 5.0) -> None:
        if not self.alive():
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
