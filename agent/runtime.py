"""`tether run` and `tether check`: from power-on to a live MQTT session, and keeping it there.

One control loop owns every decision; the network thread (agent.session) and signal handlers only
post events to its queue. Order of a boot (DESIGN.md "Data flow of one boot"): BootSequence (key,
enrollment) -> endpoints (last good, manual list, discovery with its offline cache) -> session with
failover and backoff -> on each session: token, OTA, renewal.
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
from agent.config import Config
from agent.core.backoff import Backoff
from agent.core.endpoints import Endpoint, Rotation, order_endpoints, parse_endpoint
from agent.core.errors import CoreError
from agent.core.smartrest import split_lines
from agent.core.topics import Topics
from agent.discovery import Discovery, DiscoveryError, load_last_good, save_last_good
from agent.errors import AgentError, ConfigError
from agent.identity import KEY_LABEL, DeviceIdentity
from agent.session import ConnectError, Event, Session
from agent.status import write_runtime_status
from agent.tls import client_context
from agent.token import TokenService
from hal.errors import TetherError

log = logging.getLogger("tether")
RESTART_EXIT = 75  # EX_TEMPFAIL: "run me again", used after an update switched slots
CREDENTIALS_POLL = 2.0  # seconds between looks at the credential files after the station refused them


class Runtime:
    """The agent's control loop. `run()` until SIGTERM; `check()` once for installers."""

    def __init__(self, config: Config, *, rand: Callable[[], float] = random.random) -> None:
        self.config = config
        self.identity = DeviceIdentity(config)
        self.events: queue.Queue[Event] = queue.Queue()
        self.stopping = threading.Event()
        self.rand = rand
        self.backoff = Backoff(config.mqtt.backoff_base, config.mqtt.backoff_cap)
        self.discovery = Discovery(config)
        self.topics = Topics(config.topic_prefix)
        self.token = TokenService(config) if config.token.enabled else None
        if self.token:
            self.token.wake = lambda: self.events.put(Event("wake"))
        self.session: Session | None = None
        self.endpoint_errors: dict[str, str] = {}
        self.ready_sent = False
        self.components: list[Any] = []  # OTA, outbox: objects with optional hooks
        self.renewal: Any = None  # agent.renewal.Renewal when [est] url is set
        self._contexts: dict[tuple[str | None, str], ssl.SSLContext] = {}
        self._rediscovered = False
        self.exit_code = 0

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
            # carry a rotated one
            last_good = next((e for e in candidates if e == last_good), last_good)
        return order_endpoints(candidates, last_good, demote_unlikely=not self.config.endpoints.allow_unlikely)

    def rediscover(self, why: str) -> list[Endpoint] | None:
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
        cache_key = (ca, chain + key_label)
        if cache_key not in self._contexts:
            pem = ca if ca and "-----BEGIN" in ca else None
            self._contexts[cache_key] = client_context(self.config.certs_dir / chain,
                                                       self.identity.keystore.tls_key(key_label),
                                                       cafile=None if pem else ca, cadata=pem)
        return self._contexts[cache_key]

    def connect(self, endpoint: Endpoint, chain: str = "chain.pem", key_label: str = KEY_LABEL) -> Session:
        session = Session(self.config.client_id, self.tls_context(endpoint.ca, chain, key_label), self.events,
                          keepalive=self.config.mqtt.keepalive, protocol=self.config.mqtt.protocol)
        try:
            seconds = session.connect(endpoint, self.config.mqtt.connect_timeout)
        except ConnectError:
            session.close()
            raise
        log.info("session: connected to %s in %.0f ms", endpoint.url(), seconds * 1000)
        return session

    def status(self, **fields: Any) -> None:
        try:
            write_runtime_status(self.config, **fields)
        except TetherError as exc:  # a full disk must not take the session down
            log.warning("cannot write status: %s", exc)

    # -- boot --------------------------------------------------------------------------------------
    def boot(self, once: bool = False, report: Callable[[str, float, str], None] | None = None) -> bool:
        """Run the boot sequence, retrying with backoff unless `once`. False if stopped first."""
        from agent.enroll import credentials_stamp, retry_delay

        sequence = BootSequence(self.config, self.identity, report)
        backoff = Backoff(self.config.mqtt.backoff_base, max(self.config.mqtt.backoff_cap, 1.0))
        while not self.stopping.is_set():
            credentials = credentials_stamp(self.config)
            try:
                sequence.run()
                return True
            except ConfigError:
                raise
            except TetherError as exc:
                if once:
                    raise
                self.status(session="booting", last_error=str(exc))
                # the error decides (Retry-After honoured, refusals not repeated), never its text
                delay = retry_delay(exc, self.config, backoff.next_delay(self.rand()))
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

    # -- the loop ----------------------------------------------------------------------------------
    def run(self) -> int:
        self._install_signals()
        if not self.boot():
            return 0
        for c in [self.renewal, *self.components]:
            if c is not None and hasattr(c, "on_boot"):
                log.info("%s", c.on_boot())
        rotation = self._rotation(self.endpoint_list())
        systemd.notify("STATUS=connecting")
        while not self.stopping.is_set():
            endpoint = rotation.next()
            candidate = self.renewal.candidate() if self.renewal else None
            if candidate is not None and self._prove(endpoint, *candidate):
                continue
            try:
                self.session = self.connect(endpoint)
            except ConnectError as exc:
                rotation = self._connect_failed(rotation, endpoint, exc)
                continue
            rotation.succeeded(endpoint)
            self.backoff.reset()
            self._rediscovered = False
            try:
                save_last_good(self.config, endpoint)
            except TetherError as exc:  # a full disk must not take the agent down: the session works
                log.warning("cannot remember the last good endpoint: %s", exc)
            self.serve(self.session, endpoint)
            self.session.close()
            self.session = None
            if self.stopping.is_set():
                self._session_down()
        systemd.notify("STOPPING=1")
        self.status(session="stopped", endpoint=None)
        log.info("stopped")
        return self.exit_code

    def _prove(self, endpoint: Endpoint, chain: str, key_label: str) -> bool:
        """Try a renewed pair on `endpoint`: promote it if a session comes up, else drop it.

        Returns True when the caller should pick the next endpoint without connecting (the
        endpoint itself is unreachable, so it says nothing about the new pair)."""
        try:
            session = self.connect(endpoint, chain, key_label)
        except ConnectError as exc:
            if "cannot reach" in exc.reason:
                return True
            self.renewal.disproven(exc.reason)
            self._contexts.clear()
            return False
        except TetherError as exc:
            self.renewal.disproven(str(exc))
            self._contexts.clear()
            return False
        session.close()
        self.renewal.proven()
        self._contexts.clear()  # chain.pem (and maybe the key) changed under the cached contexts
        self.status(renewal=self.renewal.status())
        return False

    def _rotation(self, endpoints: list[Endpoint]) -> Rotation:
        if not endpoints:
            endpoints = self.rediscover("no known endpoint") or []
        try:
            return Rotation(endpoints)
        except CoreError as exc:
            raise AgentError(f"{exc}: set [endpoints] urls or [discovery] url") from None

    def _connect_failed(self, rotation: Rotation, endpoint: Endpoint, exc: ConnectError) -> Rotation:
        log.warning("session: %s", exc)
        rotation.failed(endpoint)
        self.endpoint_errors[endpoint.url()] = exc.reason
        self.status(session="connecting", last_error=str(exc), endpoint_errors=self.endpoint_errors)
        if (exc.tls_verify or rotation.round_failed()) and not self._rediscovered:
            # at most once per round: a discovery server handing out a stale CA must not be hammered
            self._rediscovered = True
            why = "a broker certificate no longer verifies" if exc.tls_verify else "every endpoint failed"
            found = self.rediscover(why)
            if found is not None:
                last_good = rotation.last_good
                rotation = Rotation(self.endpoint_list(found))
                rotation.last_good = last_good
                self._contexts.clear()
        if rotation.round_failed():
            delay = self.backoff.next_delay(self.rand())
            log.warning("session: all %d endpoint(s) failed; next round in %.1f s", len(rotation.endpoints), delay)
            self.stopping.wait(delay)
            rotation.new_round()
            self._rediscovered = False
        return rotation

    def serve(self, session: Session, endpoint: Endpoint) -> None:
        """Run one session until it drops or the agent stops."""
        session.subscribe(self.topics.downstream, 1)
        if self.token:
            self.token.on_session_up(session.subscribe, session.publish)
        for c in self.components:
            if hasattr(c, "on_session_up"):
                c.on_session_up()
        self.status(session="online", endpoint=endpoint.url(), last_error=None, connected_at=int(time.time()))
        if not self.ready_sent:
            systemd.notify(f"READY=1\nSTATUS=online via {endpoint.url()}")
            self.ready_sent = True
        watchdog = systemd.watchdog_interval()
        next_ping = 0.0
        token_status: dict[str, Any] = {}
        while not self.stopping.is_set():
            if watchdog and time.monotonic() >= next_ping:
                systemd.notify("WATCHDOG=1")
                next_ping = time.monotonic() + watchdog
            if self.token:
                self.token.tick()
                if self.token.status() != token_status:
                    token_status = self.token.status()
                    self.status(token=token_status)
            for c in [self.renewal, *self.components]:
                if c is not None and hasattr(c, "tick"):
                    c.tick()
            event = self._wait(watchdog)
            if event is None or event.kind == "wake":
                continue
            if event.kind == "stop":
                break
            if event.kind == "renewed":
                log.info("session: reconnecting to prove the renewed certificate")
                self.status(renewal=self.renewal.status())
                self._session_down()
                return
            if event.kind == "disconnected":
                log.warning("session: lost %s: %s", endpoint.url(), event.reason)
                self.status(session="reconnecting", last_error=f"{endpoint.url()}: {event.reason}")
                self._session_down()
                return
            if event.kind == "message":
                self.dispatch(event)
            elif event.kind == "published":
                for c in self.components:
                    if hasattr(c, "on_published"):
                        c.on_published(event.mid)

    def _session_down(self) -> None:
        if self.token:
            self.token.on_session_down()
        for c in self.components:
            if hasattr(c, "on_session_down"):
                c.on_session_down()

    def dispatch(self, event: Event) -> None:
        if self.token and self.token.on_message(event.topic, event.payload):
            return
        if event.topic == self.topics.downstream:
            try:
                lines = split_lines(event.payload)
            except CoreError as exc:
                log.warning("operation: ignoring a message on %s: %s", event.topic, exc)
                return
            for line in lines:
                if not any(hasattr(c, "on_operation") and c.on_operation(line) for c in self.components):
                    log.info("operation: no handler for %r", line[:60])

    def _wait(self, watchdog: float | None) -> Event | None:
        now = time.time()
        deadline = min([1.0, watchdog or 1.0] + ([self.token.next_event_at() - now] if self.token else []))
        try:
            return self.events.get(timeout=max(0.0, deadline))
        except queue.Empty:
            return None

    def publish(self, topic: str, payload: bytes | str, qos: int = 1) -> int | None:
        """Publish on the live session; None when offline (callers with guarantees use the outbox)."""
        session = self.session
        if session is None:
            return None
        return session.publish(topic, payload, qos)

    def stop(self) -> None:
        self.stopping.set()
        self.events.put(Event("stop"))

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
