"""Start an installed systemd service the way its unit says, on a machine where systemd is not PID 1.

The test machines (CI's containers, this one) have systemd's tools but no running manager, so `systemctl
start` cannot be used. This reads the unit file the package installed and its drop-ins in
/etc/systemd/system/NAME.service.d/*.conf (in systemd's order; an empty assignment such as `ExecStart=`
clears the list, systemd.unit(5)) and does what systemd does to start a `Type=notify` service:

- runs ExecStart as User= and Group= (no supplementary groups), with UMask=, Environment= and the
  variables systemd sets (HOME, USER, STATE_DIRECTORY, RUNTIME_DIRECTORY, NOTIFY_SOCKET);
- makes StateDirectory= (kept) and RuntimeDirectory= (fresh, removed at stop) owned by that user;
- takes the start as done on READY=1, believed only from the main process (NotifyAccess=main: the sender's
  pid comes from the kernel, SCM_CREDENTIALS); stops with KillSignal= within TimeoutStopSec=.

Not done: the sandbox (ProtectSystem=, PrivateUsers=, SystemCallFilter=, ...). systemd-analyze scores and
verifies it (tests/security/test_station_unit.py, and the packaged unit with its drop-ins in
tests/packaging/test_packaging.py); tests/packaging/test_station_systemd.py starts the package under a real
systemd (nspawnbed.py), sandbox and all.
"""

from __future__ import annotations

import grp
import os
import pwd
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
from pathlib import Path

from lab.procs import LabError, wait_until

UNITS = Path("/lib/systemd/system")
DROPINS = Path("/etc/systemd/system")
LIST_KEYS = {"Environment", "ExecStart"}


def unit_settings(name: str, units: Path = UNITS, dropins: Path = DROPINS) -> dict[str, list[str]]:
    """The [Service] settings of `name` (e.g. tether-station.service) with its drop-ins applied."""
    files = [units / name, *sorted((dropins / f"{name}.d").glob("*.conf"))]
    found: dict[str, list[str]] = {}
    for path in files:
        section = ""
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                section = line
                continue
            if section != "[Service]":
                continue
            key, _, value = (part.strip() for part in line.partition("="))
            if not value:
                found[key] = []  # `Key=` resets what came before
            elif key in LIST_KEYS:
                found.setdefault(key, []).append(value)
            else:
                found[key] = [value]
    return found


class NotifyService:
    """One start of a Type=notify unit; `status` is its STATUS= line once READY=1 came."""

    def __init__(self, name: str, log: Path, units: Path = UNITS, dropins: Path = DROPINS) -> None:
        self.name = name
        self.log = log
        self.unit = unit_settings(name, units, dropins)
        if self.unit.get("Type") != ["notify"] or self.unit.get("NotifyAccess") != ["main"]:
            raise LabError(f"{name}: Type={self.unit.get('Type')} NotifyAccess={self.unit.get('NotifyAccess')}; "
                           "this bed starts Type=notify, NotifyAccess=main units")
        self.popen: subprocess.Popen[bytes] | None = None
        self.messages: list[tuple[int, str]] = []  # (sender pid, datagram)
        self.status = ""
        self._notify_dir = Path(tempfile.mkdtemp(prefix="notify-", dir="/run"))
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._runtime: Path | None = None

    def one(self, key: str, default: str = "") -> str:
        return (self.unit.get(key) or [default])[-1]

    def start(self, timeout: float | None = None) -> str:
        """Start ExecStart and wait for READY=1 from its main process (at most TimeoutStartSec=); the STATUS."""
        user = pwd.getpwnam(self.one("User"))
        group = grp.getgrnam(self.one("Group", user.pw_name))
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
               "HOME": user.pw_dir, "USER": user.pw_name, "LOGNAME": user.pw_name, "SHELL": user.pw_shell}
        for assignment in self.unit.get("Environment", []):
            env.update(item.split("=", 1) for item in shlex.split(assignment))  # type: ignore[misc]
        if state := self.one("StateDirectory"):
            directory = Path("/var/lib") / state
            if not directory.is_dir():
                directory.mkdir(mode=int(self.one("StateDirectoryMode", "0755"), 8))
                os.chown(directory, user.pw_uid, group.gr_gid)
            env["STATE_DIRECTORY"] = str(directory)
        if runtime := self.one("RuntimeDirectory"):
            self._runtime = Path("/run") / runtime
            shutil.rmtree(self._runtime, ignore_errors=True)
            self._runtime.mkdir(mode=int(self.one("RuntimeDirectoryMode", "0755"), 8))
            os.chown(self._runtime, user.pw_uid, group.gr_gid)
            env["RUNTIME_DIRECTORY"] = str(self._runtime)
        path = self._notify_dir / "notify"
        self._sock.bind(str(path))
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._notify_dir.chmod(0o711)
        path.chmod(0o666)  # the service's user must be able to send
        env["NOTIFY_SOCKET"] = str(path)
        argv = shlex.split(self.one("ExecStart"))
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(argv, env=env, cwd="/", user=user.pw_uid, group=group.gr_gid,
                                          extra_groups=[], umask=int(self.one("UMask", "0022"), 8),
                                          stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        limit = timeout if timeout is not None else seconds(self.one("TimeoutStartSec", "90s"))
        wait_until(lambda: self._received("READY=1"), limit, f"READY=1 from {self.name}", describe=self._tail)
        ready = next(text for pid, text in self.messages if pid == self.popen.pid and "READY=1" in text.split("\n"))
        self.status = next((line[7:] for line in ready.split("\n") if line.startswith("STATUS=")), "")
        return self.status

    def _received(self, wanted: str) -> bool:
        assert self.popen is not None
        if self.popen.poll() is not None:
            raise LabError(f"{self.name} exited {self.popen.returncode} before {wanted}:\n{self._tail()}")
        self._recv(0.2)
        return self.sent(wanted)

    def sent(self, wanted: str) -> bool:
        """True when the main process sent the line `wanted` (NotifyAccess=main: systemd ignores the rest)."""
        assert self.popen is not None
        return any(pid == self.popen.pid and wanted in text.split("\n") for pid, text in self.messages)

    def _recv(self, timeout: float) -> bool:
        """One datagram, with its sender's pid as the kernel gives it, into `messages`; False when none came."""
        self._sock.settimeout(timeout)
        try:
            data, ancillary, _, _ = self._sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except (BlockingIOError, TimeoutError):
            return False
        sender = next((struct.unpack("iii", d[:12])[0] for level, kind, d in ancillary
                       if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS), -1)
        self.messages.append((sender, data.decode()))
        return True

    def stop(self) -> int:
        """KillSignal= to the main process, wait TimeoutStopSec= (then SIGKILL to its group); its exit status."""
        try:
            if self.popen is None:
                return 0
            if self.popen.poll() is None:
                self.popen.send_signal(getattr(signal, self.one("KillSignal", "SIGTERM")))
                try:
                    self.popen.wait(seconds(self.one("TimeoutStopSec", "90s")))
                except subprocess.TimeoutExpired:
                    os.killpg(self.popen.pid, signal.SIGKILL)
                    self.popen.wait(10)
            while self._recv(0):  # what it sent while stopping (STOPPING=1)
                pass
            return self.popen.returncode
        finally:
            self._sock.close()
            shutil.rmtree(self._notify_dir, ignore_errors=True)
            if self._runtime is not None:
                shutil.rmtree(self._runtime, ignore_errors=True)

    def _tail(self) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return ""


def seconds(span: str) -> float:
    """A systemd time span as these units write it: `15s`, `2min`, `90`."""
    for suffix, factor in (("min", 60.0), ("ms", 0.001), ("s", 1.0)):
        if span.endswith(suffix):
            return float(span[: -len(suffix)]) * factor
    return float(span)
