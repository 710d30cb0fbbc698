"""`command` installer: any update tool given as an argv template; the U-Boot environment records the switch.

    [ota]
    slots = "command"
    install_command = "mender-update install {file}"     # or a vendor script
    commit_command = "mender-update commit"               # optional
    rollback_command = "mender-update rollback"           # optional

Placeholders: `{file}` the verified bundle, `{slot}` the inactive slot (a | b), `{version}` the release's
version, `{floor}` the lowest version the device may run (anti-rollback). The tool's exit status is the
result and its last output line the reason a failure reports. The active slot, the trial and the
per-slot versions live in the U-Boot environment (`hal.slots.uboot`, `fw_setenv -c [ota] uboot_env_config`)
as for `uboot` slots, so the bootloader's bootcount fallback and `tether ota status` work the same way.
The commit and rollback commands let a framework that keeps its own state (Mender) hear about both.

Composed (hal/slots/composed.py): a `CommandInstaller` running an `InstallerTool` (how the program is
run and its output read: `PlainTool` here, `SwupdateTool` in hal.slots.swupdate) plus the U-Boot
environment as the boot selector, wrapped by `CommandHooks` when commit/rollback commands are set.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from hal import StorageError, storage
from hal.slots import BootSelector, SlotError
from hal.slots.composed import Slots
from hal.slots.uboot import UBootEnv, empty_file, make_slot_dir

log = logging.getLogger(__name__)

PLACEHOLDERS = ("file", "slot", "version", "floor")
TAIL = 40  # output lines kept for the failure reason


def check_template(template: str, key: str, required: tuple[str, ...] = ()) -> list[str]:
    """Split `template` into argv words; SlotError naming `[ota] key` for bad quoting or placeholders."""
    try:
        words = shlex.split(template)
    except ValueError as exc:
        raise SlotError(f"[ota] {key} {template!r}: {exc}") from None
    if not words:
        raise SlotError(f"[ota] {key} is empty: give the installer's command line")
    used = set(re.findall(r"\{(\w*)\}", template))
    unknown = used - set(PLACEHOLDERS)
    if unknown:
        raise SlotError(f"[ota] {key} {template!r}: unknown placeholder(s) {', '.join(sorted(unknown))}; "
                        f"expected {', '.join('{' + p + '}' for p in PLACEHOLDERS)}")
    missing = [p for p in required if p not in used]
    if missing:
        raise SlotError(f"[ota] {key} {template!r}: must contain {', '.join('{' + p + '}' for p in missing)}")
    return words


def expand(words: list[str], values: dict[str, str]) -> list[str]:
    """Substitute the placeholders in each argv word (no shell: a value never becomes two words)."""
    out = []
    for word in words:
        for name, value in values.items():
            word = word.replace("{" + name + "}", value)
        out.append(word)
    return out


@dataclass
class Outcome:
    """How an installer run ended: exit status and the last lines of its output (stdout and stderr)."""

    returncode: int
    tail: list[str]

    @property
    def last_line(self) -> str:
        return self.tail[-1] if self.tail else "(no output)"


def run_streaming(argv: list[str], on_line: Callable[[str], None] = lambda line: None,
                  env: dict[str, str] | None = None) -> Outcome:
    """Run `argv` to its end, handing every output line to `on_line`; SlotError if it cannot start.

    No timeout on purpose: an installer writing a large image may take long, and killing it midway is
    worse than waiting (the commit deadline only starts after the restart).
    """
    tail: deque[str] = deque(maxlen=TAIL)
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                                env=env)
    except OSError as exc:
        raise SlotError(f"{argv[0]}: cannot run the installer: {exc.strerror}") from exc
    assert proc.stdout is not None
    with proc:
        for raw in proc.stdout:
            line = raw.rstrip()
            if line:
                tail.append(line)
                on_line(line)
    return Outcome(proc.returncode, list(tail))


class InstallerTool(Protocol):
    """How one installer program is run and how its output is read."""

    default_install: str  # the install_command when [ota] gives none ("" = it must be given)
    suffix: str           # the staged bundle's file name suffix

    def run(self, argv: list[str], progress: Callable[[str], None]) -> Outcome:
        ...

    def succeeded(self, outcome: Outcome) -> bool:
        ...

    def failure(self, argv: list[str], outcome: Outcome) -> str:
        """The 502 reason."""
        ...


class PlainTool:
    """A vendor script or update tool: its exit status is the verdict, its last line the reason."""

    default_install = ""
    suffix = ""

    def run(self, argv: list[str], progress: Callable[[str], None]) -> Outcome:
        return run_streaming(argv, env=dict(os.environ))

    def succeeded(self, outcome: Outcome) -> bool:
        return outcome.returncode == 0

    def failure(self, argv: list[str], outcome: Outcome) -> str:
        return f"{Path(argv[0]).name} failed with exit status {outcome.returncode}: {outcome.last_line}"


class CommandInstaller:
    """An argv-template installer: the bundle is downloaded beside the slots and handed to the tool."""

    def __init__(self, directory: Path, tool: InstallerTool, install_command: str = "",
                 progress: Callable[[str], None] | None = None, floor: Callable[[], str] | None = None) -> None:
        self.directory = make_slot_dir(Path(directory))
        self.tool = tool
        self.install_words = check_template(install_command or tool.default_install, "install_command", ("file",))
        self.progress = progress or (lambda text: None)
        self.floor = floor or (lambda: "")

    def stage(self, slot: str) -> Path:
        return self.directory / "download" / f"bundle-{slot}{self.tool.suffix}"

    def prepare(self, slot: str) -> None:
        try:
            storage.ensure_dir(self.stage(slot).parent, 0o700)
        except StorageError as exc:
            raise SlotError(f"{self.stage(slot).parent}: cannot create the download directory: {exc}") from exc
        empty_file(self.stage(slot), slot)

    def install(self, slot: str, name: str, version: str) -> None:
        """Run the installer on the verified bundle; SlotError with the tool's reason."""
        values = {"file": str(self.stage(slot)), "slot": slot, "version": version, "floor": self.floor() or "0.0.0"}
        argv = expand(self.install_words, values)
        log.info("installing %s %s into slot %s: %s", name, version, slot, shlex.join(argv))
        outcome = self.tool.run(argv, self.progress)
        if not self.tool.succeeded(outcome):
            raise SlotError(self.tool.failure(argv, outcome))

    def describe(self) -> dict[str, Any]:
        return {"installer": shlex.join(self.install_words)}


class CommandHooks:
    """A boot selector that also tells the update framework (`[ota] commit_command`, `rollback_command`)."""

    def __init__(self, selector: BootSelector, commit_command: str = "", rollback_command: str = "") -> None:
        self.selector = selector
        self.commit_words = check_template(commit_command, "commit_command") if commit_command else []
        self.rollback_words = check_template(rollback_command, "rollback_command") if rollback_command else []

    def _hook(self, words: list[str], what: str) -> Outcome | None:
        if not words:
            return None
        argv = expand(words, {"slot": self.selector.active()})
        outcome = run_streaming(argv)
        if outcome.returncode != 0:
            log.error("[ota] %s_command %s failed with exit status %d: %s", what, shlex.join(argv),
                      outcome.returncode, outcome.last_line)
        return outcome

    def commit(self) -> None:
        outcome = self._hook(self.commit_words, "commit")
        if outcome is not None and outcome.returncode != 0:
            raise SlotError(f"{Path(self.commit_words[0]).name} (commit) failed with exit status "
                            f"{outcome.returncode}: {outcome.last_line}")
        self.selector.commit()

    def rollback(self, slot: str) -> None:
        # The environment is switched whatever the tool says: booting the known-good slot comes first.
        self._hook(self.rollback_words, "rollback")
        self.selector.rollback(slot)

    def active(self) -> str:
        return self.selector.active()

    def switch(self, slot: str) -> None:
        self.selector.switch(slot)

    def version(self, slot: str) -> str | None:
        return self.selector.version(slot)

    def record(self, slot: str, version: str | None) -> None:
        self.selector.record(slot, version)

    def describe(self) -> dict[str, Any]:
        return self.selector.describe()


def tool_slots(backend: str, tool: InstallerTool, directory: Path, env_config: str | Path, install_command: str,
               commit_command: str, rollback_command: str, progress: Callable[[str], None] | None,
               floor: Callable[[], str] | None) -> Slots:
    """An installer tool plus the U-Boot environment (with the commit/rollback hooks); SlotError naming
    the [ota] key for a bad command template."""
    installer = CommandInstaller(directory, tool, install_command, progress, floor)
    return Slots(backend, installer, CommandHooks(UBootEnv(env_config), commit_command, rollback_command))


def command_slots(directory: Path, env_config: str | Path = "", install_command: str = "",
                  commit_command: str = "", rollback_command: str = "",
                  progress: Callable[[str], None] | None = None, floor: Callable[[], str] | None = None) -> Slots:
    """`[ota] slots = "command"`: a vendor script or update tool plus the U-Boot environment."""
    return tool_slots("command", PlainTool(), directory, env_config, install_command, commit_command,
                      rollback_command, progress, floor)
