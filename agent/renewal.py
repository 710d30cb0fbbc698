"""Certificate renewal: EST `simplereenroll` when the configured threshold is reached.

The renewed chain (and, with `[renewal] new_key`, the new key) is kept beside the current pair
until a session has been established with it; only then is it promoted, atomically and resumably.
If the new pair does not work the old one stays in use and renewal retries with backoff: users of
thin-edge.io and Azure's identity service lost devices when a renewal replaced a working pair with
an unproven one.

States (persisted in `<state>/renewal.json`): idle -> staged -> promoting -> idle. A crash in
`promoting` is finished on the next start (`on_boot`); a crash in `staged` proves the pair again.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from agent.config import Config
from agent.core.backoff import Backoff
from agent.errors import AgentError, ConfigError
from agent.identity import KEY_LABEL, NEXT_KEY_LABEL, DeviceIdentity
from hal import storage
from hal.errors import TetherError

log = logging.getLogger("tether.renewal")
STATE_FILE = "renewal.json"
STAGED_CHAIN = "chain.next.pem"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_UNKNOWN = object()  # due_at not computed since the chain or the state last changed


class Threshold(NamedTuple):
    """Renew at `share` of the lifetime, or `before` seconds ahead of expiry (exactly one is set)."""

    share: float | None = None
    before: float | None = None

    def renew_at(self, not_before: float, not_after: float) -> float:
        if self.share is not None:
            return not_before + (not_after - not_before) * self.share
        assert self.before is not None
        return max(not_before, not_after - self.before)


def parse_threshold(text: str, where: str = "[renewal] threshold") -> Threshold:
    """`"67%"` (share of the lifetime) or `"30d"`, `"12h"`, `"90m"`, `"45s"` (time before expiry)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(%|[smhd])\s*", text or "")
    if not match:
        raise ConfigError(f"{where}: {text!r} is neither a lifetime percentage such as '67%' nor a time "
                          "before expiry such as '30d', '12h', '90m'")
    value, unit = float(match.group(1)), match.group(2)
    if unit == "%":
        if not 0 < value < 100:
            raise ConfigError(f"{where}: lifetime percentage must be between 0 and 100 (exclusive), got {text!r}")
        return Threshold(share=value / 100)
    if value <= 0:
        raise ConfigError(f"{where}: time before expiry must be positive, got {text!r}")
    return Threshold(before=value * _UNITS[unit])


class Renewal:
    """A runtime component: `tick()` starts a renewal when due, `candidate()` offers the staged pair."""

    def __init__(self, config: Config, identity: DeviceIdentity, token: Callable[[], str | None] = lambda: None,
                 *, wake: Callable[[], None] = lambda: None, clock: Callable[[], float] = time.time,
                 rand: Callable[[], float] = random.random) -> None:
        self.config = config
        self.identity = identity
        self.threshold = parse_threshold(config.renewal.threshold)
        self.token = token
        self.wake = wake
        self.clock = clock
        self.rand = rand
        self.path = config.state_dir / STATE_FILE
        self.backoff = Backoff(min(config.renewal.retry, 60.0), max(config.renewal.retry, 60.0) * 12)
        self._worker: threading.Thread | None = None
        self.last_error: str | None = None
        self._state: dict[str, Any] | None = None
        self._due: object = _UNKNOWN
        self._stopped: str | None = None  # serial whose renewal the station refused (not retryable)

    # -- persisted state ----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        # this object is the file's only writer, so it is read once and then kept in memory: the
        # runtime ticks every second and must not read two files each time
        if self._state is None:
            self._state = storage.read_json(self.path)
        return self._state

    def _save(self, **fields: Any) -> None:
        state = {**self.state(), **fields, "updated_at": int(self.clock())}
        storage.write_json(self.path, state)
        self._state = state
        self._due = _UNKNOWN

    # -- schedule -----------------------------------------------------------------------------------
    def due_at(self) -> float | None:
        """When to re-enroll (device clock), from chain.json and a scheduled retry; None without a chain."""
        if self._due is _UNKNOWN:
            from provisioning.chainfacts import read_facts

            facts = read_facts(self.config.certs_dir)
            if facts is None or (self._stopped is not None and str(facts["serial"]) == self._stopped):
                self._due = None
            else:
                at = self.threshold.renew_at(float(facts["not_before"]),  # type: ignore[arg-type]
                                             float(facts["not_after"]))  # type: ignore[arg-type]
                self._due = max(at, float(self.state().get("next_try", 0)))
        return self._due  # type: ignore[return-value]

    def on_boot(self) -> str:
        state = self.state().get("state", "idle")
        if state == "promoting":
            self._finish_promotion()
            return "renewal: finished a promotion interrupted by a restart"
        due = self.due_at()
        return f"renewal: {'staged pair waiting to be proven' if state == 'staged' else 'next at'} " + (
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(due)) if due and state != "staged" else "")

    def tick(self) -> None:
        if self._worker is not None and self._worker.is_alive():
            return
        if self.state().get("state") == "staged":
            return  # the runtime proves it on the next connect
        due = self.due_at()
        if due is None or self.clock() < due:
            return
        self._worker = threading.Thread(target=self._renew, name="renewal", daemon=True)
        self._worker.start()

    # -- the work (worker thread) -------------------------------------------------------------------
    def _renew(self) -> None:
        try:
            self.renew_now()
        except TetherError as exc:
            self._failed(f"re-enrollment failed: {exc}", exc)
        else:
            self.wake()

    def renew_now(self) -> list[Any]:
        """Re-enroll and stage the new chain (and key). Raises TetherError on failure."""
        from provisioning.est.client import BearerAuth, ClientCertAuth, EstClient

        if not self.config.est.url:
            raise AgentError("[est] url is not set: cannot renew")
        label = KEY_LABEL
        if self.config.renewal.new_key:
            label = NEXT_KEY_LABEL
            if not self.identity.keystore.exists(label):  # a crashed attempt's key is reused, not leaked
                self.identity.keystore.create(label, self.config.keys.algorithm)
        csr = self.identity.csr(label)
        if self.config.renewal.auth == "bearer":
            token = self.token()
            if not token:
                raise AgentError("no access token to authenticate the re-enrollment (auth = bearer)")
            auth: Any = BearerAuth(token)
        else:
            tls = self.identity.keystore.tls_key(KEY_LABEL)
            auth = ClientCertAuth(str(self.identity.certstore.path()), tls.keyfile, tls.password)
        log.info("renewal: re-enrolling with %s (%s key)", self.config.est.url,
                 "a new" if label != KEY_LABEL else "the current")
        with EstClient(self.config.est.url, self.config.est.ca_file, self.config.est.timeout, auth=auth,
                       label=self.config.est.label) as est:
            chain = est.simplereenroll(csr)
        self.identity.certstore.stage(chain, self.identity.device_id, self.identity.keystore.public_key(label))
        self._save(state="staged", key=label, error=None)
        log.info("renewal: new certificate serial 0x%x staged; proving it with a session", chain[0].serial_number)
        return chain

    def _failed(self, reason: str, exc: BaseException | None = None) -> None:
        from agent.enroll import retry_delay

        fallback = self.backoff.next_delay(self.rand())
        # the error decides: the station's Retry-After is honoured; a refusal (revoked, CSR refused)
        # is not repeated for this certificate until the agent restarts
        delay = fallback if exc is None else retry_delay(exc, self.config, fallback)
        self.last_error = reason
        if delay is None:
            self._stopped = self._serial()
            self._save(state="idle", next_try=0, error=reason)
            log.error("renewal: %s; not retrying for certificate serial %s (the station refused it): the current "
                      "certificate stays in use; fix the cause, then restart the agent",
                      reason, self._stopped)
            return
        self._save(state="idle", next_try=self.clock() + delay, error=reason)
        log.warning("renewal: %s; the current certificate stays in use, retrying in %.0f s", reason, delay)

    def _serial(self) -> str | None:
        from provisioning.chainfacts import read_facts

        facts = read_facts(self.config.certs_dir)
        return None if facts is None else str(facts["serial"])

    # -- proving and promotion (runtime thread) -----------------------------------------------------
    def candidate(self) -> tuple[str, str] | None:
        """(chain file name, key label) of a staged pair to prove, or None."""
        state = self.state()
        if state.get("state") != "staged" or not self.identity.certstore.path(STAGED_CHAIN).exists():
            return None
        return STAGED_CHAIN, str(state.get("key", KEY_LABEL))

    def proven(self) -> None:
        """A session came up with the staged pair: promote it (resumable through `promoting`)."""
        self._save(state="promoting")
        self._finish_promotion()
        self.backoff.reset()
        log.info("renewal: new certificate promoted")

    def _finish_promotion(self) -> None:
        ks, store = self.identity.keystore, self.identity.certstore
        if ks.exists(NEXT_KEY_LABEL) and store.path(STAGED_CHAIN).exists():
            ks.rename(NEXT_KEY_LABEL, KEY_LABEL)
        if store.path(STAGED_CHAIN).exists():
            store.promote()
        self._save(state="idle", key=None, next_try=0, error=None)

    def disproven(self, reason: str) -> None:
        """The staged pair could not establish a session: drop it, keep the old pair, retry later."""
        self.identity.certstore.discard_staged()
        if self.identity.keystore.exists(NEXT_KEY_LABEL):
            self.identity.keystore.delete(NEXT_KEY_LABEL)
        self._failed(f"the renewed certificate did not establish a session ({reason})")

    def status(self) -> dict[str, Any]:
        due = self.due_at()
        return {"state": self.state().get("state", "idle"), "due_at": int(due) if due else None,
                "last_error": self.state().get("error")}
