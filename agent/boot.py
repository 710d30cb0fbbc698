"""The first part of every boot, as a persisted state machine: key, then a valid chain (enroll).

Each step is a row of `STEPS`: a check that says whether it is already done (read from disk, so a
kill -9 at any point resumes from what is really there) and an action. The step about to act is
recorded in `<state>/boot.json` before it acts, so `tether status` and support staff can see where
a device stopped. Enrollment itself persists its CSR before sending (agent.enroll), so a retry after
a crash sends the same CSR and the station answers with the same certificate: no second key, no
second ledger row.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from agent.config import Config
from agent.errors import AgentError
from agent.identity import DeviceIdentity
from agent.state import Record
from hal.value import Value
from provisioning import EnrollmentError

log = logging.getLogger(__name__)


def chain_state(identity: DeviceIdentity, now: float | None = None) -> tuple[bool, str]:
    """(usable, why) for the stored chain, from chain.json: no X.509 parsing on a normal boot."""
    now = time.time() if now is None else now
    facts = identity.chain_facts()  # rebuilt after a cut between chain.pem and chain.json
    if facts is None:
        return False, "no certificate chain stored yet (first boot)"
    not_after = float(facts["not_after"])  # type: ignore[arg-type]
    if not_after <= now:
        return False, (f"the device certificate (serial {facts['serial']}) expired at "
                       f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(not_after))}: recovering through the "
                       "bootstrap path (one-time password or bootstrap certificate)")
    return True, "chain valid"


def seconds_text(value: float) -> str:
    """A wait in seconds as a log line says it: whole seconds from 10 s up, tenths below."""
    return f"{value:.0f}" if value >= 10 or value == int(value) else f"{value:.1f}"


def retry_delay(exc: BaseException, config: Config, fallback: float) -> float | None:
    """Seconds before the next attempt after `exc`, or None when trying again cannot help.

    A station that asked for a delay (`Retry-After` on 202/503) gets it, capped at
    `[est] retry_after_max`, and never less than `fallback` (the caller's backoff, so a station
    answering `Retry-After: 0` cannot make a device hammer it); without one, `fallback`. None for an
    EnrollmentError that is not retryable: a spent one-time password, a revoked device, a refused CSR
    (with `[enroll] method = "tpm-attestation"`: `[est] retry_after_max`, as nothing on the device can change).
    """
    if not isinstance(exc, EnrollmentError):
        return fallback
    if not exc.retryable:
        # attested enrollment carries no credential a person could replace on the device: what the station
        # refused (an EK not yet on its allow-list, a barred device) is fixed at the station, so ask again
        # after the longest wait a station may ask for
        return config.est.retry_after_max if config.enroll.method == "tpm-attestation" else None
    if exc.retry_after is None:
        return fallback
    ceiling = config.est.retry_after_max
    asked = exc.retry_after
    delay = max(min(asked, ceiling), fallback)
    log.warning("station asked to retry after %s s%s; next attempt in %s s", seconds_text(asked),
                f" (capped at {seconds_text(ceiling)} s)" if asked > ceiling else "", seconds_text(delay))
    return delay


def credentials_stamp(config: Config, otp_file: str | None = None) -> tuple[object, ...]:
    """What changes when an operator replaces the enrollment credentials (one-time password file,
    bootstrap certificate or key): a refused enrollment is sent again only after this changes."""
    stamp: list[object] = []
    for path in (otp_file or config.est.otp_file, config.est.bootstrap_cert, config.est.bootstrap_key):
        try:
            st = os.stat(path) if path else None
        except OSError:
            st = None
        stamp.append(None if st is None else (st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(stamp)


class Step(Value):
    name: str
    done: Callable[[DeviceIdentity], bool]
    run: Callable[[DeviceIdentity], Any]
    describe: str
    why: Callable[[DeviceIdentity], str] = lambda identity: ""


def _enroll(identity: DeviceIdentity) -> Any:
    config = identity.config
    if not config.est.url:
        _, why = chain_state(identity)
        raise AgentError(f"{why}; and no [est] url is configured: install a chain with `tether chain install "
                         "FILE` or set [est] url to the provisioning station")

    from agent.enroll import enroll  # first boot (or an expired chain) only: a normal boot has its chain

    return enroll(config, identity)


STEPS: tuple[Step, ...] = (
    Step("key", lambda i: i.has_key(), lambda i: i.ensure_key(), "create the device key"),
    Step("enroll", lambda i: chain_state(i)[0], _enroll, "enroll over EST and store the chain",
         lambda i: chain_state(i)[1]),
)


class BootSequence:
    """Runs the steps that are not done yet, recording each before it acts."""

    def __init__(self, config: Config, identity: DeviceIdentity | None = None,
                 report: Callable[[str, float, str], None] | None = None) -> None:
        self.config = config
        self.identity = identity or DeviceIdentity(config)
        self.record_file = Record(config.state.boot, then="starting the boot record afresh")
        self.report = report or (lambda step, seconds, what: None)

    def record(self, **fields: Any) -> None:
        self.record_file.save({**self.read(), **fields, "updated_at": int(time.time())})

    def read(self) -> dict[str, Any]:
        return self.record_file.load() or {}

    def run(self) -> None:
        """Bring the device to "key and valid chain"; raise AgentError (or a TetherError) if it cannot."""
        self.config.state.ensure()
        acted = False
        for step in STEPS:
            if step.done(self.identity):
                continue
            attempts = int(self.read().get("attempts", {}).get(step.name, 0)) + 1
            self.record(step=step.name, state="running", attempts={**self.read().get("attempts", {}),
                                                                    step.name: attempts})
            why = step.why(self.identity)
            log.info("boot: %s (attempt %d)%s", step.describe, attempts, f": {why}" if why else "")
            started = time.monotonic()
            try:
                step.run(self.identity)
            except Exception as exc:
                self.record(state="failed", error=f"{step.name}: {exc}")
                raise
            self.report(step.name, time.monotonic() - started, step.describe)
            acted = True
        if acted or self.read().get("step") != "ready":
            self.record(step="ready", state="done", error=None)
