"""`OtaAgent`: runs firmware operations (`515`) through the state machine and reports in SmartREST.

The session hands it lines and callbacks (DESIGN.md "MQTT dialect"); it owns the work thread, the
persisted state, the slot backend and the reports:
    501 when an operation starts, 400 c8y_FirmwareProgress events while downloading (every 10 %),
    503 + 115 once the new version is committed, 502 "<reason>" for any failure or rollback.
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
from typing import Any

from agent.bearer import Bearer
from agent.core import smartrest
from agent.core.backoff import Backoff
from agent.core.errors import SmartRestError
from agent.core.retry import Retry
from agent.ota import release
from agent.ota.download import Fetched, HttpSettings, fetch_payload, fetch_small, hash_existing, open_session
from agent.ota.errors import VerificationError
from agent.ota.health import run_health_command
from agent.ota.hosts import HostPolicy
from agent.ota.machine import Installed, Operation, OtaState, StateStore
from agent.ota.slots import open_configured
from agent.ota.status import describe
from hal.errors import TetherError
from hal.slots import SlotBackend, other

log = logging.getLogger(__name__)

PROGRESS_EVENT = "c8y_FirmwareProgress"
PUBLISH_STEP = 10   # percent between progress events on the wire
PERSIST_STEP = 2    # percent between progress writes to the state file (for `tether ota status`)
RETRY_BASE, RETRY_CAP = 2.0, 60.0  # seconds between attempts after a retryable failure (full jitter)


class OtaAgent:
    """The device updater. Thread-safe; one update at a time; see the module docstring for reports."""

    def __init__(self, config: Any, publish: Callable[[str], None], token: Callable[[], str | None],
                 request_restart: Callable[[], None], *, clock: Callable[[], float] = time.time,
                 refresh_token: Callable[[], str | None] | None = None) -> None:
        """`token` is the current access token; `refresh_token` (the token component's force_refresh)
        gets a fresh one after an HTTP 401 from an artifact host (agent/bearer.py)."""
        self.config = config
        self.publish = publish
        self.token = token
        self.refresh_token = refresh_token
        self.request_restart = request_restart
        self.clock = clock
        self.store = StateStore(config.state.ota)
        self.hosts = HostPolicy.from_config(config)  # ConfigError now, not at the first update
        self.slots: SlotBackend = open_configured(config, progress=self._install_progress, floor=self._floor)
        self._lock = threading.RLock()
        self._worker: threading.Thread | None = None
        self._cancel = threading.Event()
        self._timer: threading.Timer | None = None
        self._fetched: Fetched | None = None
        self._percent = (-1, -1)  # last (published, persisted)

    # -- the session's interface --------------------------------------------------------------------
    def on_operation(self, line: str) -> bool:
        """Handle `line` if it is a `515` firmware operation (True), else return False untouched.

        The update runs in a background thread; a second operation while one is busy is refused with `502`.
        """
        if smartrest.template_id(line) != "515":
            return False
        try:
            op = smartrest.parse_firmware_operation(line)
        except SmartRestError as exc:
            log.warning("OTA: refused a malformed firmware operation: %s", exc)
            self._publish(smartrest.firmware_failed(f"malformed firmware operation: {exc}"))
            return True
        with self._lock:
            state = self.store.load()
            if self._running() or state.busy:
                cur = state.operation
                what = f"{cur.name} {cur.version}" if cur else "another release"
                self._publish(smartrest.firmware_failed(
                    f"refused {op.name} {op.version}: the update to {what} is in progress (state {state.state}); "
                    "send it again when that one has finished"))
                return True
            self._save(state.advance("start", operation=Operation(*op.fields()), manifest=None, target="",
                                     previous="", previous_version="", reason="", reported=False, downloaded=0,
                                     size=0, boots=0, deadline=0.0))
            self._publish(smartrest.firmware_executing())
            self._start_worker()
        return True

    def on_boot(self) -> str:
        """Decide what an interrupted update means, before connecting; return a one-line description.

        Cut while downloading: resume at the next session. Cut while installing: fail (the active slot
        was never touched). Booted into the new slot: start the commit deadline. Started again without
        having committed: roll back (and request a restart, so the previous version runs).
        """
        with self._lock:
            state = self.store.load()
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
                deadline = self.clock() + self.config.ota.commit_deadline
                self._save(state.advance("booted", boots=1, deadline=deadline))
                self._arm_deadline(deadline)
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
        with self._lock:
            state = self.store.load()
            if state.state == "confirming" and self.config.ota.health_command:
                if not self._running():  # the check may take a while: not on the session's thread
                    self._start_worker(self._check_health)
                return
            if state.state == "confirming":
                self._commit(state)
                state = self.store.load()
            elif state.state == "downloading" and not self._running():
                self._start_worker()
                return
            if state.state in ("committed", "failed", "rolled_back") and not state.reported:
                self._report(state)

    def status(self) -> dict[str, Any]:
        """State, pending operation, progress, installed version and slots, for `tether ota status`."""
        with self._lock:
            return describe(self.store.load(), self.store.installed(self.config.ota.base_version),
                            self.slots, running=self._running())

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the work thread to finish; True when no work is running."""
        worker = self._worker
        if worker is not None:
            worker.join(timeout)
        return not self._running()

    def close(self) -> None:
        """Stop the work thread (at the next chunk) and the deadline timer; the state stays on disk."""
        self._cancel.set()
        if self._timer:
            self._timer.cancel()
        self.join(10)

    # -- the work thread ----------------------------------------------------------------------------
    def _running(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    def _start_worker(self, target: Callable[[], None] | None = None) -> None:
        self._cancel.clear()
        self._worker = threading.Thread(target=target or self._work, name="tether-ota", daemon=True)
        self._worker.start()

    def _work(self) -> None:
        """Run the update; a retryable failure (HTTP 503, a dropped connection) is tried again after a
        backoff, as `Retry` decides from the error's `retryable`; a fatal one ends it with a 502."""
        retry = Retry(Backoff(RETRY_BASE, RETRY_CAP), attempts=self.config.ota.download_attempts)
        while True:
            failure = self._attempt()
            if failure is None:
                return
            at = retry.after(failure.retryable, self.clock(), random.random())  # noqa: S311 (jitter)
            if at is None or self._cancel.is_set():
                log.warning("OTA failed: %s", failure)
                self._fail(str(failure))
                return
            log.warning("OTA: %s; trying again in %.0f s", failure, at - self.clock())
            if self._cancel.wait(max(0.0, at - self.clock())):
                return  # shutting down: the state stays as it is and resumes at the next start

    def _attempt(self) -> TetherError | None:
        """One pass over the work; the error that stopped it, or None when done (or stopped)."""
        try:
            state = self.store.load()
            if state.state == "downloading":
                state = self._download(state)
            if state.state == "verifying":
                state = self._verify(state)
            if state.state == "installing":
                self.slots.install(state.target, state.manifest["name"], state.manifest["version"])  # type: ignore[index]
                state = self._save(state.advance("installed"))
            if state.state == "restarting":
                self.slots.switch(state.target)
                log.info("switched to slot %s; restarting into %s", state.target, state.manifest)
                self._restart()
        except TetherError as exc:
            if self._cancel.is_set():  # shutting down: the state stays as it is and resumes at the next start
                log.info("OTA work stopped by shutdown: %s", exc)
                return None
            return exc
        except Exception as exc:  # a bug must still end the operation with a 502, not leave it hanging
            log.exception("OTA internal error")
            self._fail(f"internal error: {type(exc).__name__}: {exc}")
        return None

    def _http(self) -> HttpSettings:
        ota = self.config.ota
        return HttpSettings(ca_file=ota.ca_file, bearer=Bearer(self.token, self.refresh_token),
                            timeout=ota.download_timeout, attempts=ota.download_attempts, hosts=self.hosts)

    def _download(self, state: OtaState) -> OtaState:
        op = state.operation
        assert op is not None
        installed = self.store.installed(self.config.ota.base_version)
        release.check_not_older(op.version, installed)  # a replay costs no download
        http = self._http()
        base = release.release_base(op.url)
        with open_session() as session:
            return self._download_with(state, op, installed, http, base, session)

    def _download_with(self, state: OtaState, op: Operation, installed: Installed, http: HttpSettings, base: str,
                       session: Any) -> OtaState:
        files = [fetch_small(base + name, http, session=session)
                 for name in ("manifest.json", "manifest.sig", "signer.pem")]
        anchors = release.load_anchors(self.config.ota.trust_anchor or self.config.identity.ca_file)
        manifest = release.check_release(files[0], files[1], files[2], anchors, op, installed)
        if not state.target or state.manifest != manifest:  # a fresh start, not a resume: empty the slot
            previous = self.slots.active()
            target = other(previous)
            self.slots.prepare(target)
            state = self._save(replace(state, manifest=manifest, target=target, previous=previous,
                                       previous_version=installed.version, size=manifest["size"], downloaded=0))
        self._percent = (-1, -1)
        self._fetched = fetch_payload(base + "payload", self.slots.stage(state.target), manifest["size"], http,
                                      progress=self._progress, cancel=self._cancel, session=session)
        return self._save(state.advance("downloaded", downloaded=self._fetched.size))

    def _verify(self, state: OtaState) -> OtaState:
        manifest = state.manifest or {}
        fetched = self._fetched
        if fetched is None:  # resumed in a new process: hash what is on disk
            size, digest = hash_existing(self.slots.stage(state.target), manifest["size"])
            fetched = Fetched(size=size, sha256=digest.hexdigest())
        if fetched.size != manifest["size"]:
            raise VerificationError(f"payload is {fetched.size} bytes, the manifest says {manifest['size']} "
                                    "(truncated)")
        if fetched.sha256 != manifest["sha256"]:
            raise VerificationError(f"payload SHA-256 {fetched.sha256[:16]}... does not match the manifest's "
                                    f"{manifest['sha256'][:16]}... (corrupted or altered payload)")
        return self._save(state.advance("verified"))

    def _progress(self, done: int, total: int) -> None:
        percent = done * 100 // total if total else 100
        published, persisted = self._percent
        if percent >= persisted + PERSIST_STEP or percent == 100:
            self._save(replace(self.store.load(), downloaded=done))
            persisted = percent
        if percent >= published + PUBLISH_STEP or (percent == 100 and published != 100):
            op = self.store.load().operation
            self._publish(smartrest.format_line("400", PROGRESS_EVENT,
                                                f"{op.name if op else ''} {op.version if op else ''}: "
                                                f"downloading {percent}%"))
            published = percent
        self._percent = (published, persisted)

    def _install_progress(self, text: str) -> None:
        """What an installer (SWUpdate, RAUC) reports while it installs, as a progress event."""
        op = self.store.load().operation
        self._publish(smartrest.format_line("400", PROGRESS_EVENT,
                                            f"{op.name if op else ''} {op.version if op else ''}: {text}"))

    def _floor(self) -> str:
        """The lowest version the device may install (SWUpdate's -N): the anti-rollback floor."""
        installed = self.store.installed(self.config.ota.base_version)
        return installed.floor or installed.version

    def _check_health(self) -> None:
        """Run `[ota] health_command` on the version on trial: exit 0 commits, anything else rolls back."""
        state = self.store.load()
        healthy, detail = run_health_command(self.config.ota.health_command, max(1.0, state.deadline - self.clock()))
        with self._lock:
            state = self.store.load()
            if state.state != "confirming":  # the deadline won the race
                return
            if healthy:
                self._commit(state)
                self._report(self.store.load())
                return
            op = state.operation
            self._rollback(state, "unhealthy", f"{op.name if op else ''} {op.version if op else ''} failed its "
                           f"health check ({detail}); rolled back to {state.previous_version} in slot "
                           f"{state.previous}", restart=True)
            self._report(self.store.load())

    # -- outcomes -----------------------------------------------------------------------------------
    def _save(self, state: OtaState) -> OtaState:
        return self.store.save(state)

    def _fail(self, reason: str) -> None:
        with self._lock:
            state = self.store.load()
            if state.busy:
                self._finish(state, "fail", reason)
                self._report(self.store.load())

    def _finish(self, state: OtaState, event: str, reason: str) -> OtaState:
        return self._save(state.advance(event, reason=reason, reported=False))

    def _rollback(self, state: OtaState, event: str, reason: str, restart: bool) -> None:
        self.slots.rollback(state.previous)
        self._finish(state, event, reason)
        log.warning("OTA rolled back: %s", reason)
        if restart:
            self._restart()

    def _arm_deadline(self, deadline: float) -> None:
        if self._timer:
            self._timer.cancel()
        self._timer = threading.Timer(max(0.0, deadline - self.clock()), self._deadline_passed)
        self._timer.daemon = True
        self._timer.start()

    def _deadline_passed(self) -> None:
        with self._lock:
            state = self.store.load()
            if state.state != "confirming":
                return
            op = state.operation
            self._rollback(state, "deadline", f"{op.name if op else ''} {op.version if op else ''} did not reach a "
                           f"live session within {self.config.ota.commit_deadline:g} s; rolled back to "
                           f"{state.previous_version} in slot {state.previous}", restart=True)

    def _commit(self, state: OtaState) -> None:
        if self._timer:
            self._timer.cancel()
        # Order matters for power cuts: the slot first (a cut after it leaves `confirming`, which rolls
        # back consistently), then the state, then the installed record (reconciled by on_boot).
        self.slots.commit()
        state = self._save(state.advance("session_up", reported=False))
        self._record_installed(state, self.store.installed(self.config.ota.base_version))

    def _record_installed(self, state: OtaState, installed: Installed) -> None:
        op = state.operation
        assert op is not None
        floor = release.higher(op.version, installed.floor)
        self.store.save_installed(Installed(op.name, op.version, op.url, floor,
                                            [*installed.history[-9:], op.version]))

    def _report(self, state: OtaState) -> None:
        if state.state == "committed" and state.operation:
            op = state.operation
            ok = (self._publish(smartrest.firmware_successful())
                  and self._publish(smartrest.firmware_installed(op.name, op.version, op.url)))
        else:
            ok = self._publish(smartrest.firmware_failed(state.reason or f"update {state.state}"))
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
