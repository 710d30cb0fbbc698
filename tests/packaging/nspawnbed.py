"""A Debian machine with systemd as its PID 1, booted in a container, for the tests that need a real manager.

unitbed.py starts a unit the way systemd would, but cannot apply its sandbox; this boots the real thing.
The test machines have no systemd as PID 1 (their init is a process supervisor), so:

- a minimal bookworm root file system is made once with debootstrap (--variant=minbase, plus the packages
  a test names) and cached in ~/.cache/tether/nspawn/, keyed by that package list: a cold build took 76 s
  on a quiet 2-core machine (2 min 42 s at load average 150), the cache is about 300 MB;
- each machine boots from an overlay on that cache (the cache is never written: what a test installs goes
  into the overlay's upper directory in the test's temporary directory, removed with it);
- `systemd-nspawn --boot --register=no --keep-unit` starts it. Both options are needed here: without a
  system bus on the host, nspawn otherwise fails with "Failed to open system bus" (it asks the host's
  systemd for a scope, and machined to register). systemd 252 picks the hybrid cgroup layout by itself from
  the host's mounts (cgroup v1 controllers on a tmpfs, cgroup2 at /sys/fs/cgroup/unified);
- there is no private network: the machine shares the host's, so a service bound to 127.0.0.1 inside is
  reached from the test as it is;
- commands run inside with nsenter into the machine's PID 1's namespaces (there is no machined for
  `systemd-run -M`), with a clean environment;
- SIGTERM to nspawn shuts the machine down the way `poweroff` does.

Booting to `systemctl is-system-running` = running takes about 0.4 s, powering off 0.2 s.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

from lab.procs import LabError, wait_until

CACHE = Path.home() / ".cache" / "tether" / "nspawn"
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
TOOLS = {"systemd-nspawn": "systemd-container", "debootstrap": "debootstrap", "nsenter": "util-linux"}
INSIDE_ENV = ["env", "-i", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
              "LANG=C.UTF-8", "HOME=/root", "SYSTEMD_PAGER=", "SYSTEMD_COLORS=0"]


def missing_tools() -> list[str]:
    """The Debian packages to install (scripts/install-deps.sh does) for the tools this bed runs."""
    return sorted({package for tool, package in TOOLS.items() if shutil.which(tool) is None})


def rootfs(packages: Sequence[str], log: Path) -> Path:
    """The cached root file system with systemd and `packages`, built (under a lock) if absent."""
    include = sorted({"systemd", "systemd-sysv", "dbus", *packages})
    key = hashlib.sha256(f"{SUITE} {MIRROR} {' '.join(include)}".encode()).hexdigest()[:12]
    path = CACHE / f"{SUITE}-{key}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / f"{SUITE}-{key}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (path / "etc" / "os-release").exists():
            return path
        building = CACHE / f"{SUITE}-{key}.building"
        shutil.rmtree(building, ignore_errors=True)  # a build cut short
        with log.open("ab") as out:
            done = subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(include)}", SUITE,
                                   str(building), MIRROR], stdout=out, stderr=subprocess.STDOUT, timeout=1800,
                                  check=False)
        if done.returncode != 0:
            raise LabError(f"debootstrap {SUITE} into {building} exited {done.returncode}; its log: {log}")
        # Nothing a test does not start: no login prompt on the console, no apt runs on a timer.
        for unit in ("console-getty.service", "getty@.service", "apt-daily.timer", "apt-daily-upgrade.timer"):
            (building / "etc/systemd/system" / unit).unlink(missing_ok=True)
            (building / "etc/systemd/system" / unit).symlink_to("/dev/null")
        building.rename(path)
        return path


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue  # gone meanwhile
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry.name))
    return found


class Machine:
    """One boot of `lower` (read-only) with an overlay in `work`; `run` executes inside as root."""

    def __init__(self, lower: Path, work: Path, name: str = "tether-test") -> None:
        self.lower = lower
        self.name = name
        self.log = work / "console.log"
        self.upper, self._ovl_work, self.root = work / "upper", work / "ovl-work", work / "root"
        self.popen: subprocess.Popen[bytes] | None = None
        self.leader = 0

    def boot(self, timeout: float = 120.0) -> Machine:
        """Mount the overlay, boot, and wait (at most `timeout`) until systemd says running or degraded."""
        for path in (self.upper, self._ovl_work, self.root):
            path.mkdir(parents=True)
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={self.lower},upperdir={self.upper},workdir={self._ovl_work}", str(self.root)],
                       check=True, capture_output=True, timeout=60)
        with self.log.open("wb") as out:
            self.popen = subprocess.Popen(
                ["systemd-nspawn", "--boot", "--register=no", "--keep-unit", "--console=read-only",
                 f"--machine={self.name}", "-D", str(self.root)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        self.leader = wait_until(self._find_leader, timeout, "the machine's systemd to start",
                                 describe=self._console)  # type: ignore[assignment]
        wait_until(lambda: self.state() in {"running", "degraded"}, timeout,
                   "systemctl is-system-running to say running or degraded",
                   describe=lambda: f"{self.state()}; console ends:\n{self._console()}")
        return self

    def _find_leader(self) -> int:
        assert self.popen is not None
        if self.popen.poll() is not None:
            raise LabError(f"systemd-nspawn exited {self.popen.returncode}: {self._console()}")
        # the machine's PID 1 is nspawn's child (its outer child forks it with CLONE_PARENT, then exits)
        for child in _children(self.popen.pid):
            try:
                if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                    return child
            except OSError:
                continue  # the outer child, gone meanwhile
        return 0

    def _console(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def state(self) -> str:
        return self.run("systemctl", "is-system-running", check=False).stdout.strip()

    def run(self, *argv: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """`argv` inside the machine, as root, with a clean environment; with `check`, exit 0 or an error."""
        done = subprocess.run(["nsenter", "-t", str(self.leader), "-a", *INSIDE_ENV, *argv],
                              capture_output=True, text=True, timeout=timeout, check=False)
        if check and done.returncode != 0:
            raise LabError(f"in the machine, {list(argv)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        return done

    def path(self, inside: str | Path) -> Path:
        """Where a file of the machine is, seen from the host (the overlay's merged view)."""
        return self.root / Path(inside).relative_to("/")

    def shutdown(self, timeout: float = 60.0) -> None:
        """Power off (SIGTERM to nspawn, as `poweroff`), or kill after `timeout`; unmount the overlay."""
        try:
            if self.popen is not None and self.popen.poll() is None:
                self.popen.send_signal(signal.SIGTERM)
                try:
                    self.popen.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.popen.kill()
                    self.popen.wait(30)
        finally:
            if os.path.ismount(self.root):
                subprocess.run(["umount", str(self.root)], check=True, capture_output=True, timeout=60)
