"""Certificate renewal: EST `simplereenroll` when the configured threshold is reached.

The renewed chain (and, with `[renewal] new_key`, the new key) is kept beside the current pair
until a session has been established with it; only then is it promoted, atomically and resumably.
If the new pair does not work the old one stays in use and renewal retries with backoff: users of
thin-edge.io and Azure's identity service lost devices when a renewal replaced a working pair with
an unproven one. Which session proves it is the supervisor's decision (`ProveCandidate`, `Promote`,
`Disprove` in agent/core/supervisor.py); this component only re-enrolls, stages and promotes.

A failure is retried with backoff when the error says it is retryable (network, HTTP 5xx); a fatal
one (HTTP 403 for a revoked certificate, a chain the policy refuses) stops renewal until the agent
restarts, with an error log line and the reason in status.json.

Threads: the EST exchange runs in a worker thread that writes only the staged chain and key; it
hands its outcome to the control loop (`call_soon`), which alone changes the persisted state.

States: the transition table below (`TRANSITIONS`), persisted in `<state>/renewal.json`. A crash in
`promoting` is finished on the next start (`on_boot`); a crash in `staged` proves the pair again.

The one owner of "a renewed pair is staged": the supervisor is only told that one is (`RenewalStaged`,
no fields) and decides which session attempt proves it (`ProveCandidate`, no pair either); the runtime
asks `Renewal.candidate()`, read from this record, which chain and key to use. Every state is written
(atomically, agent/state.py) before the action it announces, as agent/ota/machine.py does, so a
restart finds the step it was on.

    idle --staged--> staged --proven--> promoting --promoted--> idle
    staged --disproven--> idle (retry after a backoff);  idle --failed--> idle (retry, or stop if fatal)
    staged --staged--> staged (`renew_now` again: the newer pair replaces the staged one)

(The table and the record were agent/renewal_state.py until issue 24's sixth round: every start
loaded both modules, and a module of its own cost ~0.2 M instructions and 13 system calls.)
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from agent.boot import retry_delay
from agent.component import Component
from agent.config import Config
from agent.core.backoff import Backoff
from agent.core.retry import Retry
from agent.errors import AgentError
from agent.identity import KEY_LABEL, NEXT_KEY_LABEL, DeviceIdentity
from agent.state import Record
from hal import TetherError
from hal.value import Value

log = logging.getLogger("tether.renewal")
STAGED_CHAIN = "chain.next.pem"
_UNKNOWN = object()  # due_at not computed since the chain or the state last changed


TRANSITIONS: dict[tuple[str, str], str] = {
    ("idle", "staged"): "staged",
    ("idle", "failed"): "idle",
    ("staged", "staged"): "staged",
    ("staged", "proven"): "promoting",
    ("staged", "disproven"): "idle",
    ("promoting", "promoted"): "idle",
}
STATES = frozenset(state for pair in TRANSITIONS for state in pair[:1]) | frozenset(TRANSITIONS.values())


class RenewalTransitionError(AgentError):
    """An event the renewal table has no edge for, or a record naming an unknown state."""


class RenewalState(Value):
    """renewal.json: the step, the staged key's label, when to try again, and the last error. A Value,
    not a dataclass: it is built at every start, where `dataclasses` is not loaded (hal/value.py)."""

    state: str = "idle"
    key: str | None = None          # the label of the staged pair's key (a new key with [renewal] new_key)
    next_try: float = 0             # device time before which no attempt starts (a backoff, Retry-After)
    error: str | None = None        # the last failure, for status.json
    updated_at: int = 0

    def advance(self, event: str, now: float, **changes: Any) -> RenewalState:
        """The state after `event`; RenewalTransitionError naming state and event if there is no edge."""
        try:
            nxt = TRANSITIONS[(self.state, event)]
        except KeyError:
            raise RenewalTransitionError(f"renewal state machine: event {event!r} is not allowed in state "
                                         f"{self.state!r}") from None
        return self._replace(state=nxt, updated_at=int(now), **changes)

    def to_fields(self) -> dict[str, Any]:
        return self._asdict()

    @classmethod
    def from_fields(cls, raw: dict[str, Any]) -> RenewalState:
        """The state from a record's fields; RenewalTransitionError naming what is wrong."""
        try:
            state = cls(**raw)
        except TypeError as exc:
            raise RenewalTransitionError(f"unreadable renewal state ({exc})") from None
        if state.state not in STATES:
            raise RenewalTransitionError(f"unknown renewal state {state.state!r}")
        return state


class Renewal(Component):
    """The renewal component. `staged()` is called on the control loop when a renewed pair waits to
    be proven (which pair: `candidate()`, from the record); `call_soon(fn)` runs `fn` on the control
    loop (Runtime.call_soon)."""

    name = "renewal"

    def __init__(self, config: Config, identity: DeviceIdentity, token: Callable[[], str | None] = lambda: None,
                 *, staged: Callable[[], None] = lambda: None,
                 call_soon: Callable[[Callable[[], None]], None] = lambda fn: fn(),
                 clock: Callable[[], float] = time.time, rand: Callable[[], float] = random.random) -> None:
        self.config = config
        self.identity = identity
        self.threshold = config.renewal_threshold
        self.token = token
        self.staged = staged
        self.call_soon = call_soon
        self.clock = clock
        self.rand = rand
        self.record = Record(config.state.renewal, then="no renewal in progress")
        self.path = self.record.path
        self.retry = Retry(Backoff(min(config.renewal.retry, 60.0), max(config.renewal.retry, 60.0) * 12))
        self._worker: threading.Thread | None = None
        self.fatal: str | None = None
        self._state: RenewalState | None = None
        self._due: object = _UNKNOWN

    # -- persisted state (control loop only) ----------------------------------------------------------
    def state(self) -> RenewalState:
        # this object is the file's only writer, so it is read once and then kept in memory: the
        # runtime ticks every second and must not read two files each time
        if self._state is None:
            fields = self.record.load()
            try:
                self._state = RenewalState() if fields is None else RenewalState.from_fields(fields)
            except RenewalTransitionError as exc:
                self.record.refuse(str(exc))
                self._state = RenewalState()
        return self._state

    def _advance(self, event: str, **changes: Any) -> None:
        """Take the table's edge for `event` and write the new state before acting on it."""
        state = self.state().advance(event, self.clock(), **changes)
        self.record.save(state.to_fields())
        self._state = state
        self._due = _UNKNOWN

    # -- schedule -----------------------------------------------------------------------------------
    def due_at(self) -> float | None:
        """When to re-enroll (device clock), from chain.json and a scheduled retry; None without a chain
        or after a fatal failure."""
        if self.fatal:
            return None
        if self._due is _UNKNOWN:
            facts = self.identity.chain_facts()
            if facts is None:
                self._due = None
            else:
                at = self.threshold.renew_at(float(facts["not_before"]),  # type: ignore[arg-type]
                                             float(facts["not_after"]))  # type: ignore[arg-type]
                self._due = max(at, float(self.state().next_try))
        return self._due  # type: ignore[return-value]

    def on_boot(self) -> str:
        state = self.state().state
        if state == "promoting":
            self._finish_promotion()
            return "renewal: finished a promotion interrupted by a restart"
        due = self.due_at()
        return f"renewal: {'staged pair waiting to be proven' if state == 'staged' else 'next at'} " + (
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(due)) if due and state != "staged" else "")

    def wake_at(self, now: float) -> float | None:
        if self.fatal or (self._worker is not None and self._worker.is_alive()):
            return None  # the worker hands its result back through the loop, which wakes it
        if self.state().state == "staged":
            return None
        return self.due_at()

    def tick(self, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        due = self.wake_at(now)  # None while a worker runs, a pair is staged (the supervisor proves it) or fatal
        if due is None or now < due:
            return
        self._worker = threading.Thread(target=self._renew, name="renewal", daemon=True)
        self._worker.start()

    # -- the work (worker thread) -------------------------------------------------------------------
    def _renew(self) -> None:
        try:
            _, label = self._fetch()
        except TetherError as exc:
            reason, error = f"re-enrollment failed: {exc}", exc
            self.call_soon(lambda: self._failed(reason, error))
        else:
            self.call_soon(lambda: self._staged(label))

    def renew_now(self) -> list[Any]:
        """Re-enroll and stage the new chain (and key) at once, on the caller's thread (the control loop,
        a test): the chain. Raises TetherError."""
        chain, label = self._fetch()
        self._staged(label)
        return chain

    def _fetch(self) -> tuple[list[Any], str]:
        """Re-enroll and write the staged chain (and key); return (chain, key label). Raises TetherError.

        Touches only chain.next.pem and the next key, never renewal.json: the control loop records
        the outcome."""
        from agent.reenroll import reenroll  # the EST exchange: loaded when renewal is due, not at every boot

        return reenroll(self.config, self.identity, self.token)

    # -- outcomes (control loop) ----------------------------------------------------------------------
    def _staged(self, label: str) -> None:
        self._advance("staged", key=label, error=None)
        self.staged()

    def _failed(self, reason: str, error: TetherError | None = None, event: str = "failed") -> None:
        """Record a failed attempt. The error decides: retryable ones come back after a backoff (or the
        station's Retry-After); a fatal one (revoked, CSR refused, no token to present) stops renewal
        until the agent restarts. Logged before the state is written: whoever sees the error recorded
        finds its log line."""
        now = self.clock()
        at = self.retry.after(error is None or error.retryable, now, self.rand())
        if at is not None and error is not None:
            delay = retry_delay(error, self.config, at - now)  # the station's Retry-After, never shorter
            at = None if delay is None else now + delay
        if at is None:
            self.fatal = reason
            log.error("renewal: %s; not retrying (the error is not one that goes away by itself): the current "
                      "certificate stays in use; fix the cause, then restart the agent", reason)
            self._advance(event, key=None, error=reason)
            return
        log.warning("renewal: %s; the current certificate stays in use, retrying in %.0f s", reason, at - now)
        self._advance(event, key=None, next_try=at, error=reason)

    def candidate(self) -> tuple[str, str] | None:
        """(chain file name, key label) of a staged pair to prove, or None."""
        state = self.state()
        if state.state != "staged" or not self.identity.certstore.path(STAGED_CHAIN).exists():
            return None
        return STAGED_CHAIN, state.key or KEY_LABEL

    def proven(self) -> None:
        """A session came up with the staged pair: promote it (resumable through `promoting`)."""
        self._advance("proven")
        self._finish_promotion()
        self.retry.reset()
        log.info("renewal: new certificate promoted")

    def _finish_promotion(self) -> None:
        ks, store = self.identity.keystore, self.identity.certstore
        if ks.exists(NEXT_KEY_LABEL) and store.path(STAGED_CHAIN).exists():
            ks.rename(NEXT_KEY_LABEL, KEY_LABEL)
        if store.path(STAGED_CHAIN).exists():
            store.promote()
        self._advance("promoted", key=None, next_try=0, error=None)

    def disproven(self, reason: str) -> None:
        """The staged pair could not establish a session: drop it, keep the old pair, retry later."""
        self.identity.certstore.discard_staged()
        if self.identity.keystore.exists(NEXT_KEY_LABEL):
            self.identity.keystore.delete(NEXT_KEY_LABEL)
        self._failed(f"the renewed certificate did not establish a session ({reason})", event="disproven")

    def status(self) -> dict[str, Any]:
        due = self.due_at()
        return {"state": self.state().state, "due_at": int(due) if due else None,
                "last_error": self.state().error}
