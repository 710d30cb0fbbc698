"""`swupdate` installer: a verified `.swu` handed to `swupdate -i`, the boot switch in the U-Boot environment.

    [ota]
    slots = "swupdate"
    install_command = "swupdate -f /etc/swupdate.cfg -l 3 -e stable,{slot} -N {floor} -i {file}"

The `.swu` (cpio, `sw-description` first, CMS signature `sw-description.sig`) is made and signed by
`tether-station release sign --format swu`; SWUpdate checks that signature itself against its
`public-key-file`/`-k` (the release CA) with `cert-purpose codeSigning`. `sw-description` holds one
image set per slot (`stable.a`, `stable.b`), so `-e stable,{slot}` writes the inactive slot and
nothing else; `-N {floor}` is SWUpdate's own anti-rollback check. SWUpdate does not touch the boot
selection (no `bootenv` in the description): the switch, trial and rollback are the U-Boot environment's
(`hal.slots.command.command_slots` with `SwupdateTool` as its installer tool).

Progress: SWUpdate publishes `struct progress_msg` (progress_ipc.h, libswupdate 2022.12) on
`$TMPDIR/swupdateprog` while it installs (to the clients connected at that moment); it is read here
and handed to `progress` at each step and every 10 %. On failure the reason is SWUpdate's first `ERROR` line
(e.g. "No downgrading allowed: new version 1.0.5 <= installed 1.1.0",
"Authentication of all signatures failed").

The verdict is SWUpdate's own last word, `[endupdate] : SWUpdate was successful !` or `... *failed* !`
(printed from log level 3, hence `-l 3`), not only its exit status: in `-i` mode SWUpdate 2022.12 exits 1
now and then *after* a successful install, when one of its helper processes ends while it shuts down
(its SIGCHLD handler calls exit(1)); about one run in four here. A zero exit status is success too.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path

from hal.slots.command import Outcome, run_streaming, tool_slots
from hal.slots.composed import Slots

log = logging.getLogger(__name__)

# magic, status, dwl_percent, (pad), dwl_bytes, nsteps, cur_step, cur_percent, cur_image[256],
# hnd_name[64], source, infolen, info[2048]; native alignment (x86-64, arm64): 2416 bytes.
PROGRESS = struct.Struct("=IiI4xQIII256s64siI2048s4x")
RUN, PROGRESS_STATUS = 2, 8  # RECOVERY_STATUS values (swupdate_status.h)
# "[ERROR] : SWUPDATE failed [0] ERROR : <reason>" or "[ERROR] : SWUPDATE failed [1] <reason>"
VERDICT_OK = "[endupdate] : SWUpdate was successful !"
VERDICT_FAILED = "[endupdate] : SWUpdate *failed* !"
ERROR_RE = re.compile(r"\[ERROR\]\s*:\s*SWUPDATE failed \[\d+\]\s*(?:ERROR\s*:\s*)?(.+)$")


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


class ProgressReader:
    """Reads SWUpdate's progress socket in a thread until the install ends; reports steps and every 10 %."""

    def __init__(self, path: Path, report: Callable[[str], None]) -> None:
        self.path = path
        self.report = report
        self.done = threading.Event()
        self.seen: set[tuple[int, int]] = set()
        self.thread = threading.Thread(target=self._run, name="swupdate-progress", daemon=True)

    def __enter__(self) -> ProgressReader:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join(5)

    def _connect(self) -> socket.socket | None:
        # The socket appears once swupdate has started; poll for it (short waits on the done event).
        while not self.done.is_set():
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.path))
                sock.settimeout(0.2)
                return sock
            except OSError:
                sock.close()
                self.done.wait(0.05)
        return None

    def _run(self) -> None:
        sock = self._connect()
        if sock is None:
            return
        buf = b""
        with sock:
            while not self.done.is_set() or buf:
                try:
                    chunk = sock.recv(PROGRESS.size * 4)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not chunk:
                    return
                buf += chunk
                while len(buf) >= PROGRESS.size:
                    self._message(buf[:PROGRESS.size])
                    buf = buf[PROGRESS.size:]

    def _message(self, raw: bytes) -> None:
        (_magic, status, _dwl, _bytes, nsteps, step, percent, image, handler, _src, _len,
         _info) = PROGRESS.unpack(raw)
        if status not in (RUN, PROGRESS_STATUS) or not nsteps or not _cstr(image):
            return
        key = (step, min(percent, 100) // 10)
        if key in self.seen:
            return
        self.seen.add(key)
        self.report(f"installing {_cstr(image)} ({_cstr(handler)}), step {step}/{nsteps}: "
                    f"{min(percent, 100)}%")


class SwupdateTool:
    """How SWUpdate is run and read (an `InstallerTool`); see the module docstring."""

    default_install = "swupdate -l 3 -e stable,{slot} -N {floor} -i {file}"
    suffix = ".swu"

    def run(self, argv: list[str], progress: Callable[[str], None]) -> Outcome:
        env = dict(os.environ)
        tmpdir = Path(env.get("TMPDIR") or "/tmp")  # noqa: S108 - where SWUpdate itself puts its sockets
        # Said before SWUpdate starts: its socket only reaches clients connected in time, and a small
        # image may be written before the reader is connected.
        progress("installing with SWUpdate")
        with ProgressReader(tmpdir / "swupdateprog", progress):
            return run_streaming(argv, env=env)

    def succeeded(self, outcome: Outcome) -> bool:
        if outcome.returncode == 0:
            return True
        said = " ".join(outcome.tail)
        errors = [line for line in outcome.tail if ERROR_RE.search(line)]
        # the success line counts only when nothing went wrong before it: an ERROR line means SWUpdate
        # refused something, whatever it printed afterwards (seen once in CI, cause not found)
        ok = VERDICT_OK in said and VERDICT_FAILED not in said and not errors
        if ok:
            log.warning("swupdate exited with status %d after reporting success (its shutdown race): installed",
                        outcome.returncode)
        elif VERDICT_OK in said:
            log.error("swupdate exited with status %d and reported success, but also: %s; treated as refused",
                      outcome.returncode, " | ".join(errors or outcome.tail[-5:]))
        return ok

    def failure(self, argv: list[str], outcome: Outcome) -> str:
        errors = [m.group(1).strip() for m in map(ERROR_RE.search, outcome.tail) if m]
        reason = errors[0] if errors else outcome.last_line
        return f"SWUpdate refused the bundle (exit status {outcome.returncode}): {reason}"


def swupdate_slots(directory: Path, env_config: str | Path = "", install_command: str = "",
                   commit_command: str = "", rollback_command: str = "",
                   progress: Callable[[str], None] | None = None, floor: Callable[[], str] | None = None) -> Slots:
    """`[ota] slots = "swupdate"`: SWUpdate as the installer tool, the U-Boot environment as the selector."""
    return tool_slots("swupdate", SwupdateTool(), directory, env_config, install_command, commit_command,
                      rollback_command, progress, floor)
