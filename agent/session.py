"""One MQTT session to one endpoint over mutual TLS: a thin wrapper around paho-mqtt.

paho is wrapped, never subclassed (STYLE.md): its callbacks only post the supervisor's typed events
(`Message`, `Acked`, `Disconnected`, each stamped with this session's epoch) to the runtime's control
loop. The network loop is our own thread driving paho's external-loop API (`loop_read`,
`loop_write`, `loop_misc`) so that paho never reconnects by itself: which endpoint to try next is the
supervisor's decision (agent/core/supervisor.py). `connect()` turns that loop itself until CONNACK
(the boot waits on it, and a hand-over to another thread and back costs two thread switches); the
network thread takes over once the session is up.

The thread sleeps in the kernel until the broker sends something, a message is queued (paho's
`on_socket_register_write` wakes it through a socket pair), `close()` wakes it, or the keepalive needs
a look: an idle device wakes a few times a minute, not five times a second, and the selector is
epoll, which has no 1,024-descriptor ceiling (paho's own `loop()` waits with `select()`).
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

from agent.core.endpoints import Endpoint
from agent.core.supervisor import ACKED, DISCONNECTED, MESSAGE, REFUSED, TLS_VERIFY, UNREACHABLE, Event
from agent.errors import AgentError
from agent.tls import describe_alert, describe_tls_failure

log = logging.getLogger(__name__)


class ConnectError(AgentError):
    """Connecting to an endpoint failed. `kind` is the supervisor's classification: UNREACHABLE (the
    endpoint is down or away), TLS_VERIFY (the broker's certificate did not verify: its CA may have
    rotated, a reason to re-discover) or REFUSED (the broker refused us: our certificate, CONNACK)."""

    retryable = True  # another endpoint, or the same one later, may work

    def __init__(self, endpoint: Endpoint, reason: str, kind: str) -> None:
        super().__init__(f"{endpoint.url()}: {reason}")
        self.endpoint = endpoint
        self.reason = reason
        self.kind = kind


Post = Callable[[Any], None]


class Session:
    def __init__(self, client_id: str, context: ssl.SSLContext, post: Post, *, epoch: int = 0,
                 keepalive: int = 60, protocol: str = "3.1.1") -> None:
        self.post = post
        self.epoch = epoch
        self.protocol = mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=self.protocol,
                                  clean_session=True if self.protocol == mqtt.MQTTv311 else None)
        self.client.tls_set_context(context)
        if log.isEnabledFor(logging.DEBUG):
            self.client.enable_logger(log)
        self.keepalive = keepalive
        self.endpoint: Endpoint | None = None
        self._connack = threading.Event()
        self._connack_rc: Any = None
        self._closing = threading.Event()
        self._down_reported = False
        self._thread: threading.Thread | None = None
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_log = self._on_log
        self._last_error = ""
        # With no callback here paho writes a publish to the TLS socket from the caller's thread while
        # our network thread may be reading it: one SSL object used by two threads corrupts the stream
        # ("bad record mac") under load. Registered, paho only queues and calls us; we wake the network
        # thread, which writes.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.client.on_socket_register_write = lambda *_: self._wake()
        # paho sends PINGREQ once `keepalive` seconds pass without traffic and gives up when no PINGRESP
        # comes within another `keepalive`: looking four times per keepalive is close enough for both
        self._misc_every = min(max(keepalive / 4, 0.5), 15.0) if keepalive else 15.0

    # -- paho callbacks (network thread) ---------------------------------------------------------
    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, properties: Any = None) -> None:
        self._connack_rc = rc
        self._connack.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, rc: Any, properties: Any = None) -> None:
        self._report_down(str(rc))

    def _report_down(self, reason: str) -> None:
        # paho's callback and our network loop both see a lost connection: report it once, or the
        # second event would cut the next session as soon as it is up
        if not self._closing.is_set() and not self._down_reported:
            self._down_reported = True
            self.post(Event(DISCONNECTED, self.epoch, reason))

    def _on_log(self, client: Any, userdata: Any, level: int, text: str) -> None:
        # paho turns a TLS alert on a read into MQTT_ERR_CONN_LOST and only logs the alert: keep it, so a
        # broker refusing our certificate after the handshake (TLS 1.3, a CRL) is reported with its reason
        if level == mqtt.MQTT_LOG_ERR:
            self._last_error = text

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        self.post(Event(MESSAGE, self.epoch, msg.topic, bytes(msg.payload)))

    def _on_publish(self, client: Any, userdata: Any, mid: int, rc: Any = None, properties: Any = None) -> None:
        self.post(Event(ACKED, self.epoch, mid))

    # -- control (runtime thread) ----------------------------------------------------------------
    def connect(self, endpoint: Endpoint, timeout: float) -> float:
        """Open TCP + TLS and wait for CONNACK; return the seconds it took. Raises ConnectError."""
        start = time.monotonic()
        self.endpoint = endpoint
        self.client.connect_timeout = timeout
        try:
            self.client.connect(endpoint.host, endpoint.port, keepalive=self.keepalive)
        except ssl.SSLCertVerificationError as exc:
            raise ConnectError(endpoint, describe_tls_failure(exc), TLS_VERIFY) from None
        except ssl.SSLError as exc:
            raise ConnectError(endpoint, describe_tls_failure(exc), REFUSED) from None
        except OSError as exc:  # includes timeouts and refused connections
            raise ConnectError(endpoint, f"cannot reach: {exc.strerror or exc}", UNREACHABLE) from None
        # CONNACK is read here, in the connecting thread: handing the socket to the network thread
        # and the answer back costs two thread switches on the path every boot waits on (issue 24).
        # The network thread starts once the session is up; until then no other thread touches paho.
        self._await_connack(start + timeout)
        if not self._connack.is_set():
            self.close()
            raise ConnectError(endpoint, f"no CONNACK within {timeout:.0f} s (is our certificate refused?)", REFUSED)
        rc = self._connack_rc
        if isinstance(rc, str):  # the network loop saw the connection close before any CONNACK
            self.close()
            raise ConnectError(endpoint, rc, REFUSED)
        if getattr(rc, "is_failure", False) or (isinstance(rc, int) and rc != 0):
            self.close()
            raise ConnectError(endpoint, f"broker refused the connection: {rc}", REFUSED)
        self._thread = threading.Thread(target=self._network_loop, name=f"mqtt-{endpoint.host}:{endpoint.port}",
                                        daemon=True)
        self._thread.start()
        return time.monotonic() - start

    def _await_connack(self, deadline: float) -> None:
        """Turn paho's loop in this thread until CONNACK, the connection's end (`_lost`) or `deadline`."""
        with selectors.DefaultSelector() as selector:
            sock = self._watch(selector)
            while sock is not None and not self._connack.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._step(selector, sock, min(remaining, self._misc_every)):
                    return

    def _wake(self) -> None:
        """Make the network thread look again (any thread): a packet is queued, or we are closing."""
        with contextlib.suppress(BlockingIOError, OSError):  # full: a wake-up is already pending
            self._wake_w.send(b"\0")

    def _network_loop(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._wake_r, selectors.EVENT_READ)
            sock = self._watch(selector)
            while sock is not None and not self._closing.is_set():
                if not self._step(selector, sock, self._misc_every):
                    return

    def _watch(self, selector: selectors.BaseSelector) -> Any:
        """Register paho's socket with `selector`; None, with the connection lost, when it has none left."""
        sock = self.client.socket()
        if sock is None:
            self._lost("connection lost (the broker closed it or the network dropped)")
            return None
        try:
            # a socket the broker closed right after the handshake has no descriptor left
            selector.register(sock, selectors.EVENT_READ)
        except (OSError, ValueError) as exc:
            self._lost(describe_tls_failure(exc))
            return None
        return sock

    def _step(self, selector: selectors.BaseSelector, sock: Any, wait: float) -> bool:
        """One `_turn`; False, with the connection lost and why, when the connection ended."""
        try:
            rc = self._turn(selector, sock, wait)
        except (OSError, ssl.SSLError, ValueError) as exc:  # a dying socket can surface as either
            self._lost(describe_tls_failure(exc))
            return False
        if rc != mqtt.MQTT_ERR_SUCCESS:
            self._lost(self._reason(rc))
            return False
        return True

    def _reason(self, rc: Any) -> str:
        """Why paho's loop returned `rc`: the TLS alert it logged, a lost connection, or paho's own text."""
        if "SSL" in self._last_error or "alert" in self._last_error:
            return describe_alert(self._last_error)
        if rc in (mqtt.MQTT_ERR_CONN_LOST, mqtt.MQTT_ERR_UNKNOWN, mqtt.MQTT_ERR_NO_CONN):
            return "connection lost (the broker closed it or the network dropped)"
        return str(mqtt.error_string(rc))

    def _turn(self, selector: selectors.BaseSelector, sock: Any, wait: float) -> Any:
        """Sleep until something is due (at most `wait` seconds), then let paho read, write and keep
        the session alive."""
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.client.want_write() else 0)
        if want != selector.get_key(sock).events:
            selector.modify(sock, want)
        # TLS may hold decrypted bytes the kernel no longer reports as readable
        readable = isinstance(sock, ssl.SSLSocket) and sock.pending() > 0
        for key, _events in selector.select(0 if readable else wait):
            if key.fileobj is self._wake_r:
                with contextlib.suppress(BlockingIOError):
                    self._wake_r.recv(4096)
            else:
                readable = True
        if self._closing.is_set():
            return mqtt.MQTT_ERR_SUCCESS
        rc = self.client.loop_read() if readable else mqtt.MQTT_ERR_SUCCESS
        if rc == mqtt.MQTT_ERR_SUCCESS and self.client.want_write():
            rc = self.client.loop_write()
        return self.client.loop_misc() if rc == mqtt.MQTT_ERR_SUCCESS else rc

    def _lost(self, reason: str) -> None:
        """The network loop ends: before CONNACK the waiting connect() learns why, after it the runtime."""
        if self._closing.is_set():
            return
        if not self._connack.is_set():
            # refused during or right after the handshake (TLS 1.3 checks our certificate late)
            self._connack_rc = f"connection closed before CONNACK: {reason}"
            self._connack.set()
        else:
            self._report_down(reason)

    def subscribe(self, topic: str, qos: int = 1) -> None:
        self.client.subscribe(topic, qos)

    def publish(self, topic: str, payload: bytes | str, qos: int = 0) -> int:
        """Queue a message; return its message id (QoS 1 completion arrives as a `published` event)."""
        info = self.client.publish(topic, payload, qos=qos)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise AgentError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        return int(info.mid)

    def close(self) -> None:
        """Send DISCONNECT if connected and stop the network thread."""
        self._closing.set()
        self._wake()
        # the woken network thread leaves its loop; only then may this thread touch the TLS socket:
        # one SSL object used by two threads corrupts memory (glibc aborts the process)
        if self._thread and self._thread is not threading.current_thread():
            self._thread.join(2)
        network_done = not (self._thread and self._thread.is_alive())
        try:
            if self._connack.is_set() and self.client.is_connected() and network_done:
                self.client.disconnect()
                self.client.loop_write()  # flush DISCONNECT
        except (OSError, ValueError, ssl.SSLError) as exc:
            log.debug("disconnect: %s", exc)
        if network_done:
            self._wake_r.close()
            self._wake_w.close()
        sock = self.client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
