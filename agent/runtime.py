"""`tether run`: from power-on to a live MQTT session, and keeping it there.

The decisions are the supervisor's (agent/core/supervisor.py, pure and shared with the firmware):
which endpoint, when, with which pair, what a message means. This module is its driver: it feeds it
events with the time and performs the actions it returns (connect, discover, publish, promote, write
status). One control loop owns all mutable state; the network thread, component workers and signal
handlers only post to its queue (`post`, `call_soon`). Order of a boot (DESIGN.md "Data flow of one
boot"): BootSequence (key, enrollment) -> endpoints (last good, manual list, discovery with its
offline cache) -> supervisor.
"""

from __future__ import annotations

import logging
import os
import random
import ssl
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import signal

    from agent.token import TokenService  # made by agent/compose.py when [token] enabled; only a type here
else:
    # `signal` is this C module plus three IntEnums (Signals, Handlers, Sigmasks) built when it is
    # imported, about 1% of `tether run`'s instructions to CONNACK (issue 24); two handlers need none of it
    import _signal as signal

from agent.boot import BootSequence, credentials_stamp, retry_delay
from agent.component import Component
from agent.config import Config
from agent.control import MAX_SLEEP, RESTART_EXIT, ControlLoop, Inbox, SessionLink, publish_on
from agent.core import supervisor as sv
from agent.core.backoff import Backoff
from agent.core.endpoint_list import order_endpoints, parse_endpoint
from agent.core.endpoints import Endpoint
from agent.core.errors import CoreError
from agent.core.retry import Retry
from agent.core.token_schedule import TokenRefresher
from agent.discovery import Discovery, DiscoveryError, load_last_good, save_last_good
from agent.errors import AgentError, ConfigError
from agent.identity import KEY_LABEL, DeviceIdentity
from agent.renewal import Renewal
from agent.session import ConnectError, Session
from agent.tls import client_context
from hal import TetherError, systemd
from provisioning import EnrollmentError

log = logging.getLogger("tether")
__all__ = ["RESTART_EXIT", "Runtime"]
CREDENTIALS_POLL = 2.0  # seconds between looks at the credential files after the station refused them


class Runtime:
    """The agent's control loop. `run()` until SIGTERM; `tether check` uses its pieces once. Built by
    agent/compose.py, which makes every part and hands it in."""

    def __init__(self, config: Config, *, loop: ControlLoop, link: SessionLink, identity: DeviceIdentity,
                 discovery: Discovery, token: TokenService | None, renewal: Renewal | None,
                 components: list[Component], rand: Callable[[], float] = random.random,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.loop = loop
        self.link = link
        self.identity = identity
        self.discovery = discovery
        self.token = token
        self.renewal = renewal  # also in components; the supervisor's Promote and Disprove go to it
        self.components = components
        self.rand = rand
        self.clock = clock
        self.topics = config.topics
        self.supervisor: sv.Supervisor | None = None
        self.session: Session | None = None
        self.ready_sent = False
        self._contexts: dict[tuple[str | None, str, str], ssl.SSLContext] = {}
        self._token_status: dict[str, Any] = {}
        self._perform = self.actions()

    # -- the loop's inbox (any thread) -------------------------------------------------------------
    @property
    def events(self) -> Inbox:
        return self.loop.events

    @property
    def stopping(self) -> threading.Event:
        return self.loop.stopping

    def post(self, event: Any) -> None:
        """Queue a supervisor event (network thread, signal handler, worker)."""
        self.loop.post(event)

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the control loop: how workers hand back results without sharing state."""
        self.loop.call_soon(fn)

    def status(self, **fields: Any) -> None:
        """Merge `fields` into status.json (from the control loop; other threads' writes are posted)."""
        self.loop.status(**fields)

    # -- endpoints ---------------------------------------------------------------------------------
    def manual_endpoints(self) -> list[Endpoint]:
        ca = self.config.endpoints.ca_file or self.config.identity.ca_file or None
        out = []
        for i, url in enumerate(self.config.endpoints.urls):
            try:
                out.append(parse_endpoint(url, ca=ca, field=f"[endpoints] urls[{i}]"))
            except CoreError as exc:
                raise ConfigError(f"{self.config.sources[0]}: {exc}") from None
        return out

    def endpoint_list(self, discovered: list[Endpoint] | None = None) -> list[Endpoint]:
        """Last good first, then the manual list, then discovered cores (or the cached document)."""
        found = discovered if discovered is not None else self.discovery.cached()
        candidates = self.manual_endpoints() + found
        last_good = load_last_good(self.config)
        if last_good is not None:
            # the last good endpoint decides the order; its CA comes from the fresh list, which may
            # carry a rotated one. One the configuration (a drop-in) or discovery no longer names is not
            # dialled at all: the operator removed it.
            known = next((e for e in candidates if e == last_good), None)
            if known is None:
                log.info("endpoints: the last good endpoint %s is no longer configured or discovered; "
                         "not trying it", last_good.url())
            last_good = known
        return order_endpoints(candidates, last_good, demote_unlikely=not self.config.endpoints.allow_unlikely)

    def rediscover(self, why: str) -> list[Endpoint] | None:
        """Ask the discovery service; None when it is off or failed (logged)."""
        if not self.discovery.enabled:
            return None
        log.info("discovery: asking again (%s)", why)
        try:
            ctx = client_context(os.path.join(self.config.certs_dir, "chain.pem"),
                                 self.identity.keystore.tls_key(KEY_LABEL),
                                 cafile=self.config.discovery.ca_file or self.config.identity.ca_file or None)
            return self.discovery.discover(ctx)
        except (DiscoveryError, AgentError) as exc:
            log.warning("discovery failed, using the cached and manual endpoints: %s", exc)
            self.status(last_error=str(exc))
            return None

    # -- connecting --------------------------------------------------------------------------------
    def tls_context(self, ca: str | None, chain: str = "chain.pem", key_label: str = KEY_LABEL) -> ssl.SSLContext:
        cache_key = (ca, chain, key_label)
        if cache_key not in self._contexts:
            pem = ca if ca and "-----BEGIN" in ca else None
            self._contexts[cache_key] = client_context(os.path.join(self.config.certs_dir, chain),
                                                       self.identity.keystore.tls_key(key_label),
                                                       cafile=None if pem else ca, cadata=pem)
        return self._contexts[cache_key]

    def connect(self, endpoint: Endpoint, chain: str = "chain.pem", key_label: str = KEY_LABEL,
                epoch: int = 0) -> Session:
        """A session to `endpoint` whose network events are posted under `epoch`. Raises ConnectError
        (with its kind) for the endpoint, TetherError when our own credentials cannot be loaded."""
        session = Session(self.config.client_id, self.tls_context(endpoint.ca, chain, key_label), self.post,
                          epoch=epoch, keepalive=self.config.mqtt.keepalive, protocol=self.config.mqtt.protocol)
        try:
            seconds = session.connect(endpoint, self.config.mqtt.connect_timeout)
        except ConnectError:
            session.close()
            raise
        log.info("session: connected to %s in %.0f ms", endpoint.url(), seconds * 1000)
        return session

    # -- boot --------------------------------------------------------------------------------------
    def boot(self, once: bool = False, report: Callable[[str, float, str], None] | None = None) -> bool:
        """Run the boot sequence; retry a retryable failure with backoff unless `once`. An enrollment the
        station refused (a spent one-time password, a revoked device) waits for new credentials; any
        other fatal error (no [est] url, a refused chain, bad configuration) is raised. The error decides
        (its `retryable`, the station's Retry-After), never its text. False if stopped first."""
        sequence = BootSequence(self.config, self.identity, report)
        retry = Retry(Backoff(self.config.mqtt.backoff_base, max(self.config.mqtt.backoff_cap, 1.0)))
        while not self.stopping.is_set():
            credentials = credentials_stamp(self.config)
            try:
                sequence.run()
                return True
            except TetherError as exc:
                refused = isinstance(exc, EnrollmentError) and not exc.retryable
                if once or isinstance(exc, ConfigError) or not (exc.retryable or refused):
                    raise
                self.status(session="booting", last_error=str(exc))
                now = self.clock()
                at = retry.after(True, now, self.rand())
                delay = retry_delay(exc, self.config, max(0.0, (at or now) - now))
                if delay is None:
                    log.error("boot: %s; not retrying with the same credentials: waiting for a new one-time "
                              "password in %s (or a new bootstrap certificate)", exc,
                              self.config.est.otp_file or "[est] otp_file")
                    while not self.stopping.is_set() and credentials_stamp(self.config) == credentials:
                        self.stopping.wait(CREDENTIALS_POLL)
                    continue
                log.error("boot: %s; retrying in %.1f s", exc, delay)
                self.stopping.wait(delay)
        return False

    def new_supervisor(self, endpoints: list[Endpoint] | None = None, discovery: bool | None = None) -> sv.Supervisor:
        """The supervisor for this device: endpoints from `endpoint_list()` unless given."""
        mqtt = self.config.mqtt
        refresher = None
        if self.config.token.enabled:
            refresher = TokenRefresher(Backoff(mqtt.backoff_base, mqtt.backoff_cap), self.config.token.timeout)
        try:
            return sv.Supervisor(self.endpoint_list() if endpoints is None else endpoints,
                                 Backoff(mqtt.backoff_base, mqtt.backoff_cap), self.topics, self.rand, refresher,
                                 discovery=self.discovery.enabled if discovery is None else discovery)
        except CoreError as exc:
            raise AgentError(f"{exc}: set [endpoints] urls or [discovery] url") from None

    # -- the loop ----------------------------------------------------------------------------------
    def run(self) -> int:
        self.loop.status_file.owner = threading.current_thread()
        self._install_signals()
        if not self.boot():
            return 0
        for c in self.components:
            line = c.on_boot()
            if line:
                log.info("%s", line)
        self.supervisor = self.new_supervisor()
        systemd.notify("STATUS=connecting")
        if self.renewal is not None and self.renewal.candidate() is not None:
            self.feed(sv.Event(sv.RENEWAL_STAGED))
        self.feed(sv.Event(sv.START))
        watchdog = systemd.watchdog_interval()
        next_ping = 0.0
        while not self.stopping.is_set():
            if watchdog and time.monotonic() >= next_ping:
                systemd.notify("WATCHDOG=1")
                next_ping = time.monotonic() + watchdog
            self.loop.tick(self.components, self.clock())
            self.feed(sv.Event(sv.TICK))
            item = self.loop.next(self.components, self.clock, self.supervisor.deadline(),
                                  min(MAX_SLEEP, watchdog or MAX_SLEEP))
            if item is not None:
                self.feed(item)
        self.feed(sv.Event(sv.STOP))
        for c in self.components:
            c.close()
        systemd.notify("STOPPING=1")
        self.status(session="stopped", endpoint=None)
        log.info("stopped")
        return self.loop.exit_code

    def feed(self, event: Any) -> None:
        """Hand `event` to the supervisor and perform what it asks, until it asks nothing more."""
        assert self.supervisor is not None
        sv.drive(self.supervisor, event, self.clock, self._perform)
        refresher = self.supervisor.token_refresher()
        if self.token is not None and refresher is not None:
            token_status = self.token.status(refresher)
            if token_status != self._token_status:
                self._token_status = token_status
                self.status(token=token_status)

    def actions(self) -> dict[int, Callable[[Any, float], Any]]:
        """Action type -> handler(action, now) returning the event it caused, if any: every action
        the supervisor can return (`Supervisor.ACTIONS`) has one (tests/unit/test_drivers.py)."""
        return {
            sv.CONNECT: self._attempt, sv.PROVE_CANDIDATE: self._attempt,
            sv.SUBSCRIBE: self._subscribe, sv.PUBLISH: self._publish_action,
            sv.SESSION_UP: self._session_up, sv.SESSION_DOWN: self._session_down, sv.CLOSE: self._close,
            sv.OPERATION: self._operation, sv.DELIVERED: self._delivered, sv.TOKEN_ADOPTED: self._token_adopted,
            sv.ATTEMPT_FAILED: self._attempt_failed, sv.BACKOFF: self._backoff, sv.REDISCOVER: self._rediscover,
            sv.PROMOTE: self._promote, sv.DISPROVE: self._disprove, sv.PROBLEM: self._problem,
            sv.DELIVER: self._deliver,
            sv.WAIT_UNTIL: self._nothing,  # the loop's wait asks supervisor.deadline()
        }

    # -- performing actions ----------------------------------------------------------------------
    def _attempt(self, action: sv.Event, now: float) -> Any:
        chain, key = ("chain.pem", KEY_LABEL)
        if action.type == sv.PROVE_CANDIDATE:
            pair = self.renewal.candidate() if self.renewal is not None else None  # the record owns which pair
            if pair is None:
                return sv.Event(sv.CONNECT_FAILED, action.epoch, sv.REFUSED, "the staged certificate and key are gone")
            chain, key = pair
            log.info("session: proving the renewed certificate on %s", action.endpoint.url())
        try:
            self.session = self.connect(action.endpoint, chain, key, epoch=action.epoch)
        except ConnectError as exc:
            return sv.Event(sv.CONNECT_FAILED, action.epoch, exc.kind, exc.reason)
        except TetherError as exc:  # our pair cannot even be loaded (a corrupt staged chain, a lost key)
            return sv.Event(sv.CONNECT_FAILED, action.epoch, sv.REFUSED, f"cannot use the certificate and key: {exc}")
        return sv.Event(sv.CONNECTED, action.epoch)

    def _subscribe(self, action: sv.Event, now: float) -> None:
        session = self.session
        if session is not None and session.epoch == action.epoch:
            session.subscribe(action.topic, action.qos)

    def _publish_action(self, action: sv.Event, now: float) -> None:
        session = self.session
        if session is not None and session.epoch == action.epoch:
            publish_on(session, action.topic, action.payload, action.qos)

    def _operation(self, action: sv.Event, now: float) -> None:
        if not any(c.on_operation(action.line) for c in self.components):
            log.info("operation: no handler for %r", action.line[:60])

    def _delivered(self, action: sv.Event, now: float) -> None:
        for c in self.components:
            c.on_acked(action.mid)

    def _token_adopted(self, action: sv.Event, now: float) -> None:
        if self.token is not None:
            try:
                self.token.adopted(action.token, action.schedule)
            except TetherError as exc:  # the token is in memory; local applications read the file
                log.warning("token: cannot store it: %s", exc)

    def _attempt_failed(self, action: sv.Event, now: float) -> None:
        log.warning("session: %s: %s", action.endpoint.url(), action.reason)
        self.status(session="connecting", last_error=f"{action.endpoint.url()}: {action.reason}",
                    endpoint_errors=self.supervisor.endpoint_errors() if self.supervisor else {})

    def _backoff(self, action: sv.Event, now: float) -> None:
        log.warning("session: all %d endpoint(s) failed; next round in %.1f s", action.endpoints, action.seconds)

    def _rediscover(self, action: sv.Event, now: float) -> sv.Event:
        found = self.rediscover(action.why)
        if found is not None:
            found = self.endpoint_list(found)
            self._contexts.clear()  # a rotated CA comes with the new list
        return sv.Event(sv.DISCOVERED, found)

    def _promote(self, action: sv.Event, now: float) -> None:
        self._contexts.clear()  # chain.pem (and maybe the key) change under the cached contexts
        if self.renewal is not None:  # always: only a pair renewal staged is proven
            self.renewal.proven()
            self.status(renewal=self.renewal.status())

    def _disprove(self, action: sv.Event, now: float) -> None:
        self._contexts.clear()
        if self.renewal is not None:
            self.renewal.disproven(action.reason)
            self.status(renewal=self.renewal.status())

    def _problem(self, action: sv.Event, now: float) -> None:
        log.warning("%s: %s", action.what, action.detail)

    def _deliver(self, action: sv.Event, now: float) -> None:
        log.debug("message on %s not handled", action.topic)

    def _nothing(self, action: Any, now: float) -> None:
        return None

    def _session_up(self, action: sv.Event, now: float) -> None:
        endpoint = action.endpoint
        try:
            save_last_good(self.config, endpoint)
        except TetherError as exc:  # a full disk must not take the agent down: the session works
            log.warning("cannot remember the last good endpoint: %s", exc)
        self.link.up(self.session)
        for c in self.components:
            c.on_session_up()
        self.status(session="online", endpoint=endpoint.url(), last_error=None, connected_at=int(time.time()),
                    endpoint_errors=self.supervisor.endpoint_errors() if self.supervisor else {})
        if not self.ready_sent:
            systemd.notify(f"READY=1\nSTATUS=online via {endpoint.url()}")
            self.ready_sent = True

    def _session_down(self, action: sv.Event, now: float) -> None:
        reason = action.reason
        session = self.session
        if session is not None and session.endpoint is not None and not self.stopping.is_set():
            log.warning("session: lost %s: %s", session.endpoint.url(), reason)
            self.status(session="reconnecting", last_error=f"{session.endpoint.url()}: {reason}")
        self._close_session(session.epoch if session is not None else -1)
        for c in self.components:
            c.on_session_down()

    def _close(self, action: sv.Event, now: float) -> None:
        self._close_session(action.epoch)

    def _close_session(self, epoch: int) -> None:
        session = self.session
        if session is not None and session.epoch == epoch:
            self.link.down()
            session.close()
            self.session = None

    def stop(self) -> None:
        self.loop.stop()

    def _install_signals(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: self.stop())
            signal.signal(signal.SIGINT, lambda *_: self.stop())
