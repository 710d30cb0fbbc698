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
import queue
import random
import signal
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

from agent import systemd
from agent.boot import BootSequence
from agent.component import Component
from agent.config import Config
from agent.core import supervisor as sv
from agent.core.backoff import Backoff
from agent.core.endpoints import Endpoint, order_endpoints, parse_endpoint
from agent.core.errors import CoreError
from agent.core.retry import Retry
from agent.core.token_schedule import TokenRefresher
from agent.discovery import Discovery, DiscoveryError, load_last_good, save_last_good
from agent.errors import AgentError, ConfigError
from agent.identity import KEY_LABEL, DeviceIdentity
from agent.session import ConnectError, Session
from agent.status import StatusFile
from agent.tls import client_context
from agent.token import TokenService
from hal.errors import TetherError

log = logging.getLogger("tether")
RESTART_EXIT = 75  # EX_TEMPFAIL: "run me again", used after an update switched slots
CREDENTIALS_POLL = 2.0  # seconds between looks at the credential files after the station refused them
MAX_SLEEP = 60.0  # the longest the control loop sleeps without an event or a deadline


class Call:
    """A function a worker thread hands to the control loop to run there."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn


class Runtime:
    """The agent's control loop. `run()` until SIGTERM; `tether check` uses its pieces once."""

    def __init__(self, config: Config, *, rand: Callable[[], float] = random.random,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.identity = DeviceIdentity(config)
        self.events: queue.Queue[Any] = queue.Queue()
        self.stopping = threading.Event()
        self.rand = rand
        self.clock = clock
        self.discovery = Discovery(config)
        self.topics = config.topics
        self.token = TokenService(config, clock=clock) if config.token.enabled else None
        if self.token:
            self.token.wanted = lambda: self.post(sv.TokenWanted())
        self.components: list[Component] = []
        self.renewal: Any = None  # agent.renewal.Renewal when [est] url is set (also in components)
        self.supervisor: sv.Supervisor | None = None
        self.session: Session | None = None
        self.status_file = StatusFile(config)
        self.ready_sent = False
        self._contexts: dict[tuple[str | None, str, str], ssl.SSLContext] = {}
        self._token_status: dict[str, Any] = {}
        self.exit_code = 0

    # -- posting to the loop (any thread) ----------------------------------------------------------
    def post(self, event: Any) -> None:
        """Queue a supervisor event (network thread, signal handler, worker)."""
        self.events.put(event)

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the control loop: how workers hand back results without sharing state."""
        self.events.put(Call(fn))

    def status(self, **fields: Any) -> None:
        """Merge `fields` into status.json. The control loop is its only writer: other threads post."""
        if self.status_file.owner is not None and threading.current_thread() is not self.status_file.owner:
            self.call_soon(lambda: self.status(**fields))
            return
        try:
            self.status_file.update(**fields)
        except TetherError as exc:  # a full disk must not take the session down
            log.warning("cannot write status: %s", exc)

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
            ctx = client_context(self.config.certs_dir / "chain.pem", self.identity.keystore.tls_key(KEY_LABEL),
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
            self._contexts[cache_key] = client_context(self.config.certs_dir / chain,
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
        from agent.enroll import credentials_stamp, retry_delay
        from provisioning.errors import EnrollmentError

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
                at = retry.after(True, self.clock(), self.rand())
                delay = retry_delay(exc, self.config, (at or self.clock()) - self.clock())
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
        self.status_file.owner = threading.current_thread()
        self._install_signals()
        if not self.boot():
            return 0
        for c in self.components:
            line = c.on_boot()
            if line:
                log.info("%s", line)
        self.supervisor = self.new_supervisor()
        systemd.notify("STATUS=connecting")
        if self.renewal is not None:
            candidate = self.renewal.candidate()
            if candidate is not None:
                self.feed(sv.RenewalStaged(*candidate))
        self.feed(sv.Start())
        watchdog = systemd.watchdog_interval()
        next_ping = 0.0
        while not self.stopping.is_set():
            if watchdog and time.monotonic() >= next_ping:
                systemd.notify("WATCHDOG=1")
                next_ping = time.monotonic() + watchdog
            now = self.clock()
            for c in self.components:
                c.tick(now)
            self.feed(sv.Tick())
            item = self._wait(watchdog)
            if item is None:
                continue
            if isinstance(item, Call):
                item.fn()
            else:
                self.feed(item)
        self.feed(sv.Stop())
        for c in self.components:
            c.close()
        systemd.notify("STOPPING=1")
        self.status(session="stopped", endpoint=None)
        log.info("stopped")
        return self.exit_code

    def _wait(self, watchdog: float | None) -> Any:
        """The next event, or None once the earliest deadline (supervisor, components, watchdog) has come.
        An idle agent sleeps here: no fixed tick. MAX_SLEEP bounds a wait computed from the device
        clock, which may jump (NTP sets it after boot)."""
        now = self.clock()
        timeout = min(MAX_SLEEP, watchdog or MAX_SLEEP)
        deadlines = [c.wake_at(now) for c in self.components]
        deadlines.append(self.supervisor.deadline() if self.supervisor is not None else None)
        for deadline in deadlines:
            if deadline is not None:
                timeout = min(timeout, deadline - now)
        try:
            return self.events.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None

    def feed(self, event: Any) -> None:
        """Hand `event` to the supervisor and perform what it asks, until it asks nothing more."""
        assert self.supervisor is not None
        pending = [event]
        while pending:
            actions = self.supervisor.handle(pending.pop(0), self.clock())
            for action in actions:
                follow = self.perform(action)
                if follow is not None:
                    pending.append(follow)
        if self.token is not None and self.supervisor.refresher is not None:
            token_status = self.token.status(self.supervisor.refresher)
            if token_status != self._token_status:
                self._token_status = token_status
                self.status(token=token_status)

    def perform(self, action: Any) -> Any:
        """Do one action; return the event it produced (a connection attempt's outcome), if any."""
        if isinstance(action, sv.Connect | sv.ProveCandidate):
            return self._attempt(action)
        if isinstance(action, sv.Subscribe | sv.Publish):
            session = self.session
            if session is not None and session.epoch == action.epoch:
                if isinstance(action, sv.Subscribe):
                    session.subscribe(action.topic, action.qos)
                else:
                    self._publish(session, action.topic, action.payload, action.qos)
            return None
        if isinstance(action, sv.SessionUp):
            self._session_up(action.endpoint)
        elif isinstance(action, sv.SessionDown):
            self._session_down(action.reason)
        elif isinstance(action, sv.Close):
            self._close(action.epoch)
        elif isinstance(action, sv.Operation):
            if not any(c.on_operation(action.line) for c in self.components):
                log.info("operation: no handler for %r", action.line[:60])
        elif isinstance(action, sv.Delivered):
            for c in self.components:
                c.on_acked(action.mid)
        elif isinstance(action, sv.TokenAdopted):
            if self.token is not None:
                try:
                    self.token.adopted(action.token, action.schedule)
                except TetherError as exc:  # the token is in memory; local applications read the file
                    log.warning("token: cannot store it: %s", exc)
        elif isinstance(action, sv.AttemptFailed):
            log.warning("session: %s: %s", action.endpoint.url(), action.reason)
            self.status(session="connecting", last_error=f"{action.endpoint.url()}: {action.reason}",
                        endpoint_errors=dict(self.supervisor.errors) if self.supervisor else {})
        elif isinstance(action, sv.Backoff):
            log.warning("session: all %d endpoint(s) failed; next round in %.1f s", action.endpoints, action.seconds)
        elif isinstance(action, sv.Rediscover):
            found = self.rediscover(action.why)
            if found is not None:
                found = self.endpoint_list(found)
                self._contexts.clear()  # a rotated CA comes with the new list
            return sv.Discovered(found)
        elif isinstance(action, sv.Promote):
            self._contexts.clear()  # chain.pem (and maybe the key) change under the cached contexts
            self.renewal.proven()
            self.status(renewal=self.renewal.status())
        elif isinstance(action, sv.Disprove):
            self._contexts.clear()
            self.renewal.disproven(action.reason)
            self.status(renewal=self.renewal.status())
        elif isinstance(action, sv.Problem):
            log.warning("%s: %s", action.what, action.detail)
        elif isinstance(action, sv.Deliver):
            log.debug("message on %s not handled", action.topic)
        return None  # WaitUntil: the loop's wait reads supervisor.deadline()

    def _attempt(self, action: Any) -> Any:
        proving = isinstance(action, sv.ProveCandidate)
        chain, key = (action.chain, action.key) if proving else ("chain.pem", KEY_LABEL)
        if proving:
            log.info("session: proving the renewed certificate on %s", action.endpoint.url())
        try:
            self.session = self.connect(action.endpoint, chain, key, epoch=action.epoch)
        except ConnectError as exc:
            return sv.ConnectFailed(action.epoch, exc.kind, exc.reason)
        except TetherError as exc:  # our pair cannot even be loaded (a corrupt staged chain, a lost key)
            return sv.ConnectFailed(action.epoch, sv.REFUSED, f"cannot use the certificate and key: {exc}")
        return sv.Connected(action.epoch)

    def _publish(self, session: Session, topic: str, payload: bytes | str, qos: int) -> int | None:
        try:
            return session.publish(topic, payload, qos)
        except AgentError as exc:  # the session is going down; its Disconnected follows
            log.info("session: %s", exc)
            return None

    def _session_up(self, endpoint: Endpoint) -> None:
        try:
            save_last_good(self.config, endpoint)
        except TetherError as exc:  # a full disk must not take the agent down: the session works
            log.warning("cannot remember the last good endpoint: %s", exc)
        for c in self.components:
            c.on_session_up()
        self.status(session="online", endpoint=endpoint.url(), last_error=None, connected_at=int(time.time()),
                    endpoint_errors=dict(self.supervisor.errors) if self.supervisor else {})
        if not self.ready_sent:
            systemd.notify(f"READY=1\nSTATUS=online via {endpoint.url()}")
            self.ready_sent = True

    def _session_down(self, reason: str) -> None:
        session = self.session
        if session is not None and session.endpoint is not None and not self.stopping.is_set():
            log.warning("session: lost %s: %s", session.endpoint.url(), reason)
            self.status(session="reconnecting", last_error=f"{session.endpoint.url()}: {reason}")
        self._close(session.epoch if session is not None else -1)
        for c in self.components:
            c.on_session_down()

    def _close(self, epoch: int) -> None:
        session = self.session
        if session is not None and session.epoch == epoch:
            session.close()
            self.session = None

    def publish(self, topic: str, payload: bytes | str, qos: int = 1) -> int | None:
        """Publish on the live session; None when offline (callers with guarantees use the outbox).
        Any thread: paho only queues the message, the session's network thread writes it."""
        session = self.session
        if session is None or self.supervisor is None or self.supervisor.state != sv.ONLINE:
            return None
        return self._publish(session, topic, payload, qos)

    def stop(self) -> None:
        self.stopping.set()
        self.events.put(None)  # wake the loop

    def request_restart(self) -> None:
        """Stop cleanly and exit with RESTART_EXIT so the service manager starts the new version
        (systemd `Restart=on-failure`; the demo's supervisor does the same)."""
        log.info("restart requested (an update switched slots): stopping with exit code %d", RESTART_EXIT)
        self.exit_code = RESTART_EXIT
        self.stop()

    def _install_signals(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: self.stop())
            signal.signal(signal.SIGINT, lambda *_: self.stop())
