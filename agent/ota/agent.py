"""`OtaAgent`: runs firmware operations (`515`) through the state machine and reports in SmartREST.

A component of the control loop (agent/component.py): every hook, every state change and every
report happens on the loop's thread. What blocks (the release files and payload over HTTPS, hashing,
an installer's run, the health command) runs as one step at a time in a worker thread
(agent/ota/work.py) that hands its result back through `call_soon`; between steps, and at rest, the
updater holds no thread. The commit deadline and a retry's backoff are times the loop wakes at
(`wake_at`), not timers.

Reports: 501 when an operation starts, 400 c8y_FirmwareProgress events while downloading (every
10 %), 503 + 115 once the new version is committed, 502 "<reason>" for any failure or rollback.
A final outcome is marked reported only after `publish` returned, so an outcome reached while offline
(a rollback at boot, a failure during a dropped session) is published at the next `on_session_up`.
"""

from __future__ import annotations

import logging
import random
import shlex
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any

from agent.bearer import Bearer
from agent.component import Component
from agent.core import firmware_op, smartrest
from agent.core.backoff import Backoff
from agent.core.errors import SmartRestError
from agent.core.retry import Retry
from agent.ota import release, work
from agent.ota.download import Fetched, HttpSettings
from agent.ota.health import run_health_command
from agent.ota.hosts import HostPolicy
from agent.ota.machine import Installed, Operation, OtaState, StateStore
from agent.ota.progress import ProgressMarks
from agent.ota.slots import open_configured
from agent.ota.status import describe
from hal import TetherError
from hal.slots import SlotBackend

log = logging.getLogger(__name__)

PROGRESS_EVENT = "c8y_FirmwareProgress"
RETRY_BASE, RETRY_CAP = 2.0, 60.0  # seconds between attempts after a retryable failure (full jitter)


class OtaAgent(Component):
    """The device updater: one update at a time; see the module docstring for threads and reports."""

    name = "ota"

    def __init__(self, config: Any, publish: Callable[[str], None], token: Callable[[], str | None],
                 request_restart: Callable[[], None], *, call_soon: Callable[[Callable[[], None]], None],
                 clock: Callable[[], float] = time.time, rand: Callable[[], float] = random.random,
                 refresh_token: Callable[[], str | None] | None = None) -> None:
        """`publish` sends a SmartREST line (raising when offline); `token` is the current access token
        and `refresh_token` (the token component's force_refresh, called on the worker) a fresh one
        after an HTTP 401 (agent/bearer.py); `call_soon` runs a function on the control loop."""
        self.config, self.publish, self.request_restart = config, publish, request_restart
        self.token, self.refresh_token = token, refresh_token
        self.call_soon, self.clock, self.rand = call_soon, clock, rand
        self.store = StateStore(config.state.ota)
        self.hosts = HostPolicy.from_config(config)  # ConfigError now, not at the first update
        self.slots: SlotBackend = open_configured(config, progress=self._install_progress, floor=self._floor)
        self._state: OtaState | None = None  # this object is state.json's only writer: read once
        self._worker: threading.Thread | None = None  # the step running now, until its result is handled
        self._retry = Retry(Backoff(RETRY_BASE, RETRY_CAP), attempts=config.ota.download_attempts)
        self._retry_at: float | None = None
        self._cancel = threading.Event()  # set by close: a download stops at its next chunk
        self._fetched: Fetched | None = None
        self._marks = ProgressMarks()

    # -- the control loop's interface ---------------------------------------------------------------
    def on_operation(self, line: str) -> bool:
        """Handle `line` if it is a `515` firmware operation (True), else return False untouched.
        A second operation while one is busy is refused with `502`."""
        if smartrest.template_id(line) != "515":
            return False
        try:
            op = firmware_op.parse_firmware_operation(line)
        except SmartRestError as exc:
            log.warning("OTA: refused a malformed firmware operation: %s", exc)
            self._publish(firmware_op.firmware_failed(f"malformed firmware operation: {exc}"))
            return True
        state = self.state()
        if self.working() or state.busy:
            what = state.release if state.operation else "another release"
            self._publish(firmware_op.firmware_failed(
                f"refused {op.name} {op.version}: the update to {what} is in progress (state {state.state}); "
                "send it again when that one has finished"))
            return True
        self._save(state.advance("start", operation=Operation(*op.fields()), manifest=None, target="",
                                 previous="", previous_version="", reason="", reported=False, downloaded=0,
                                 size=0, boots=0, deadline=0.0))
        self._publish(firmware_op.firmware_executing())
        self._begin()
        return True

    def on_boot(self) -> str:
        """Decide what an interrupted update means, before connecting; return a one-line description.

        Cut while downloading: resume at the next session. Cut while installing: fail (the active slot
        was never touched). Booted into the new slot: start the commit deadline. Started again without
        having committed: roll back (and request a restart, so the previous version runs).
        """
        state = self.state()
        installed = self.store.installed(self.config.ota.base_version)
        op = state.operation
        what = f"{op.name} {op.version}" if op else ""
        if state.state == "verifying":
            state = self._save(state.advance("resume"))
        if state.state == "downloading":
            return f"update to {what} was interrupted while downloading; it resumes when the session is up"
        active = self.slots.active()
        if state.state == "installing":
            # An installer that switches by itself (RAUC) may have made the new slot primary before
            # the cut: point the boot back at the previous slot, and restart if we run from the other.
            self.slots.rollback(state.previous)
            self._finish(state, "fail", f"interrupted while installing {what} into slot {state.target} "
                         f"(power loss or crash); slot {state.previous} with {state.previous_version} "
                         "still runs")
            if active != state.previous:
                self._restart()
            return f"update to {what} failed: interrupted while installing"
        if state.state == "restarting":
            if active != state.target:
                self.slots.rollback(state.previous)
                self._finish(state, "not_switched", f"{what} did not start from slot {state.target}: slot "
                             f"{active} still runs (power loss before the switch, or the bootloader fell back)")
                return f"update to {what} rolled back: the new slot did not start"
            # the deadline is in the state: `wake_at` asks the loop to wake for it
            self._save(state.advance("booted", boots=1, deadline=self.clock() + self.config.ota.commit_deadline))
            return (f"running {what} from slot {state.target} on trial: it commits when a session is up "
                    f"within {self.config.ota.commit_deadline:g} s")
        if state.state == "confirming":
            why = ("restarted before reaching a live session (power loss or crash before commit)"
                   if active == state.target else "was abandoned by the bootloader (boot limit reached)")
            self._rollback(state, "unconfirmed_boot", f"{what} {why}; rolled back to "
                           f"{state.previous_version} in slot {state.previous}", restart=active == state.target)
            return f"update to {what} rolled back: {why}"
        if state.state == "committed" and op and installed.version != op.version:
            self._record_installed(state, installed)  # cut between the commit and its record
        if not state.reported:
            return f"last update {state.state}; reported when the session is up"
        return f"no update pending; running {installed.version or 'an unknown version'}"

    def on_session_up(self) -> None:
        """A session is live: commit a version on trial, resume an interrupted download, report outcomes."""
        state = self.state()
        if state.state == "confirming" and self.config.ota.health_command:
            if not self.working():  # the check may take a while: in a worker, racing the deadline
                timeout = max(1.0, state.deadline - self.clock())
                self._run(lambda: run_health_command(self.config.ota.health_command, timeout), self._health_checked)
            return
        if state.state == "confirming":
            self._commit(state)
            state = self.state()
        elif state.state == "downloading" and not self.working():
            self._begin()
            return
        if state.state in ("committed", "failed", "rolled_back") and not state.reported:
            self._report(state)

    def wake_at(self, now: float) -> float | None:
        """A retry's time, or the commit deadline of a version on trial; None at rest."""
        times = [self._retry_at] if self._retry_at is not None else []
        state = self.state()
        if state.state == "confirming" and state.deadline:
            times.append(state.deadline)
        return min(times) if times else None

    def tick(self, now: float) -> None:
        if self._retry_at is not None and now >= self._retry_at:
            self._retry_at = None
            self._next()
        state = self.state()
        if state.state == "confirming" and state.deadline and now >= state.deadline:
            self._rollback(state, "deadline", f"{state.release} did not reach a live session within "
                           f"{self.config.ota.commit_deadline:g} s; rolled back to {state.previous_version} in slot "
                           f"{state.previous}", restart=True)

    def working(self) -> bool:
        """A step runs in a worker, or a retry is due: the update is being worked on in this process."""
        return self._worker is not None or self._retry_at is not None

    def state(self) -> OtaState:
        if self._state is None:
            self._state = self.store.load()
        return self._state

    def status(self) -> dict[str, Any]:
        """State, pending operation, progress, installed version and slots, for `tether ota status`:
        read from the files, as that command reads them."""
        return describe(self.store.load(), self.store.installed(self.config.ota.base_version), self.slots,
                        running=self.working())

    def close(self) -> None:
        """Stop the step running now (a download at its next chunk); the work resumes at the next start."""
        self._cancel.set()
        self._retry_at = None
        if self._worker is not None:
            self._worker.join(10)

    # -- steps: each runs in a worker; its result or error comes back on the loop ----------------------
    def _begin(self) -> None:
        self._retry.reset()
        self._retry_at = None
        self._next()

    def _next(self) -> None:
        """Start the step the persisted state calls for (none in a final state or while confirming)."""
        state = self.state()
        if state.state == "downloading":
            http = self._http()
            anchors = self.config.ota.trust_anchor or self.config.identity.ca_file
            installed = self.store.installed(self.config.ota.base_version)
            self._run(lambda: work.check_release(state, installed, http, anchors, self.slots), self._checked)
        elif state.state == "verifying":
            assert state.manifest is not None
            manifest, stage, fetched = state.manifest, self.slots.stage(state.target), self._fetched
            self._run(lambda: work.verify_payload(manifest, stage, fetched), lambda _: self._advance("verified"))
        elif state.state == "installing":
            target, manifest = state.target, state.manifest or {}
            self._run(lambda: self.slots.install(target, manifest["name"], manifest["version"]),
                      lambda _: self._advance("installed"))
        elif state.state == "restarting":
            self._run(lambda: self.slots.switch(state.target), self._switched)

    def _run(self, step: Callable[[], Any], done: Callable[[Any], None]) -> None:
        def body() -> None:
            try:
                value = step()
            except Exception as exc:
                if not isinstance(exc, TetherError):
                    log.exception("OTA internal error")
                self.call_soon(partial(self._step_failed, exc))
            else:
                self.call_soon(partial(self._step_done, done, value))

        self._cancel.clear()
        self._worker = threading.Thread(target=body, name="tether-ota", daemon=True)
        self._worker.start()

    def _step_done(self, done: Callable[[Any], None], value: Any) -> None:
        self._worker = None
        if not self._cancel.is_set():
            done(value)
        elif isinstance(value, work.Checked):
            value.close()  # its session goes no further

    def _step_failed(self, exc: Exception) -> None:
        """A retryable failure (HTTP 503, a dropped connection) is tried again after a backoff, as
        `Retry` decides from the error's `retryable`; a fatal one ends the update with a 502."""
        self._worker = None
        if self._cancel.is_set():  # shutting down: the state stays as it is and resumes at the next start
            log.info("OTA work stopped by shutdown: %s", exc)
            return
        if not isinstance(exc, TetherError):
            self._fail(f"internal error: {type(exc).__name__}: {exc}")
            return
        now = self.clock()
        at = self._retry.after(exc.retryable, now, self.rand())
        if at is None:
            log.warning("OTA failed: %s", exc)
            self._fail(str(exc))
            return
        log.warning("OTA: %s; trying again in %.0f s", exc, at - now)
        self._retry_at = at

    def _advance(self, event: str, **changes: Any) -> None:
        self._save(self.state().advance(event, **changes))
        self._next()

    def _checked(self, checked: work.Checked) -> None:
        state = self.state()
        if checked.fresh:
            installed = self.store.installed(self.config.ota.base_version)
            state = self._save(replace(state, manifest=checked.manifest, target=checked.target,
                                       previous=checked.previous, previous_version=installed.version,
                                       size=checked.manifest["size"], downloaded=0))
        self._marks = ProgressMarks()
        http, stage, cancel = self._http(), self.slots.stage(state.target), self._cancel

        def progress(done: int, total: int) -> None:  # on the worker: the loop records and reports it
            self.call_soon(lambda: self._progress(done, total))

        self._run(lambda: work.download_payload(state, checked, http, stage, progress, cancel), self._downloaded)

    def _downloaded(self, fetched: Fetched) -> None:
        self._fetched = fetched
        self._advance("downloaded", downloaded=fetched.size)

    def _switched(self, _: None) -> None:
        log.info("switched to slot %s; restarting into %s", self.state().target, self.state().release)
        self._restart()

    def _http(self) -> HttpSettings:
        return work.http_settings(self.config.ota, self.hosts, Bearer(self.token, self.refresh_token))

    def _progress(self, done: int, total: int) -> None:
        state = self.state()
        if state.state != "downloading":
            return
        persist, publish = self._marks.passed(done, total)
        if persist:
            state = self._save(replace(state, downloaded=done))
        if publish is not None:
            self._progress_event(f"downloading {publish}%")

    def _progress_event(self, text: str) -> None:
        self._publish(smartrest.format_line("400", PROGRESS_EVENT, f"{self.state().release}: {text}"))

    def _install_progress(self, text: str) -> None:
        """What an installer (SWUpdate, RAUC) reports while it installs (on the worker): an event the
        loop publishes."""
        self.call_soon(partial(self._progress_event, text))

    def _floor(self) -> str:
        """The lowest version the device may install (SWUpdate's -N): the anti-rollback floor. Read by
        an installer on the worker; installed.json changes only at a commit, never during an install."""
        installed = self.store.installed(self.config.ota.base_version)
        return installed.floor or installed.version

    def _health_checked(self, result: tuple[bool, str]) -> None:
        """`[ota] health_command` said: exit 0 commits, anything else rolls back."""
        healthy, detail = result
        state = self.state()
        if state.state != "confirming":  # the deadline won the race
            return
        if healthy:
            self._commit(state)
            self._report(self.state())
            return
        self._rollback(state, "unhealthy", f"{state.release} failed its health check ({detail}); rolled back "
                       f"to {state.previous_version} in slot {state.previous}", restart=True)
        self._report(self.state())

    # -- outcomes -----------------------------------------------------------------------------------
    def _save(self, state: OtaState) -> OtaState:
        self._state = self.store.save(state)
        return state

    def _fail(self, reason: str) -> None:
        state = self.state()
        if state.busy:
            self._finish(state, "fail", reason)
            self._report(self.state())

    def _finish(self, state: OtaState, event: str, reason: str) -> OtaState:
        return self._save(state.advance(event, reason=reason, reported=False))

    def _rollback(self, state: OtaState, event: str, reason: str, restart: bool) -> None:
        self.slots.rollback(state.previous)
        self._finish(state, event, reason)
        log.warning("OTA rolled back: %s", reason)
        if restart:
            self._restart()

    def _commit(self, state: OtaState) -> None:
        # Order matters for power cuts: the slot first (a cut after it leaves `confirming`, which rolls
        # back consistently), then the state, then the installed record (reconciled by on_boot).
        self.slots.commit()
        state = self._save(state.advance("session_up", reported=False))
        self._record_installed(state, self.store.installed(self.config.ota.base_version))

    def _record_installed(self, state: OtaState, installed: Installed) -> None:
        assert state.operation is not None
        self.store.save_installed(release.after_commit(installed, state.operation))

    def _report(self, state: OtaState) -> None:
        if state.state == "committed" and state.operation:
            op = state.operation
            ok = (self._publish(firmware_op.firmware_successful())
                  and self._publish(firmware_op.firmware_installed(op.name, op.version, op.url)))
        else:
            ok = self._publish(firmware_op.firmware_failed(state.reason or f"update {state.state}"))
        if ok:
            self._save(replace(state, reported=True))

    def _publish(self, line: str) -> bool:
        try:
            self.publish(line)
        except Exception as exc:  # noqa: BLE001 - the session's callback; offline is retried at the next session
            log.warning("could not publish %r (%s); it is sent again when the session is up", line, exc)
            return False
        return True

    def _restart(self) -> None:
        command = self.config.ota.restart_command
        if command:
            try:
                subprocess.Popen(shlex.split(command), start_new_session=True)
            except OSError as exc:
                log.error("[ota] restart_command %r failed: %s; asking the session to restart", command, exc)
        self.request_restart()
