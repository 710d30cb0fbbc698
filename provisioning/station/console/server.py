"""The console over HTTPS with required client certificates, in its own process beside the EST workers.

`ConsoleServer.bind` runs in `serve`'s parent process (so a bad address or missing certificate fails
before anything forks), `spawn` forks the process that serves it. The console shares only the ledger
with the EST workers: it polls the ledger for the live page (a read per second per open page) and
writes only its own tables, the OTPs of batches and revocations, so enrollment never waits for it.

Before any operator has authenticated, the console applies the EST port's admission rules
(`provisioning/station/admission.py`): a client over its handshake CPU budget (`--handshake-cpu`) has
new connections closed at accept, and at `--console-max-connections` the oldest connection still
shaking hands or waiting for a request is shut down to make room (each connection holds a thread).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import ssl
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from provisioning.station.admission import HandshakeBudget, oldest_waiting, peer_key
from provisioning.station.ca import Station
from provisioning.station.console.operators import console_server_cert, operator_ca
from provisioning.station.console.security import Denied, holder, identify
from provisioning.station.console.store import REFUSED, ConsoleStore
from provisioning.station.errors import StationError
from provisioning.station.supervisor import fork_side_process
from provisioning.tlsserver import restrict_key_exchange

log = logging.getLogger("tether.station.console")

IO_TIMEOUT = 30.0
MAX_FORM = 16 * 1024
TICK = 1.0  # seconds between live updates on an open live page
MAX_CONNECTIONS = 128   # a thread each; operators are a handful of browsers with a few connections each
HANDSHAKE_BURST = 30.0  # as the EST port's: seconds' worth of handshake_cpu available at once
FULL_LOG_EVERY = 10.0


def _loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def parse_address(text: str, allow_remote: bool = False) -> tuple[str, int]:
    """HOST:PORT for --console; a non-loopback host needs `allow_remote` (--console-remote)."""
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise StationError(f"--console {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8444")
    if not _loopback(host) and not allow_remote:
        raise StationError(f"--console {text!r}: the console listens on loopback only unless "
                           "--console-remote is given (operators reach it through an SSH tunnel otherwise)")
    return host, int(port)


class ConsoleHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "tether-station-console"
    sys_version = ""
    server: ConsoleServer

    def handle_one_request(self) -> None:
        super().handle_one_request()
        self.server.mark(self.connection, "read")  # answered: waiting for the next request again

    def do_GET(self) -> None:
        self._dispatch("GET", {})

    def do_POST(self) -> None:
        try:
            length = int(self.headers.get("Content-Length") or "-1")
        except ValueError:
            length = -1
        if length < 0 or length > MAX_FORM:
            self.close_connection = True
            self._plain(413 if length > MAX_FORM else 411, "form missing Content-Length or over 16 KiB")
            return
        body = self.rfile.read(length).decode("utf-8", "replace")
        self._dispatch("POST", dict(urllib.parse.parse_qsl(body, keep_blank_values=True)))

    def _dispatch(self, method: str, form: dict[str, str]) -> None:
        self.server.mark(self.connection, "busy")  # a whole request arrived: no longer made room with
        app = self.server.app
        address = self.client_address[0]
        caller = None
        serial: int | None = None
        try:
            der = self.connection.getpeercert(binary_form=True)
            if der is not None:
                from cryptography import x509

                serial = x509.load_der_x509_certificate(der).serial_number
            caller = identify(app.store, serial, address, int(time.time()))
            response = app.handle(caller, method, self.path, form)
        except Denied as denied:
            if denied.status in (401, 403):
                who = caller.who if caller else holder(app.store, serial, address)
                app.store.audit(who, f"{method} {self.path.split('?')[0]}", denied.reason, address, REFUSED)
            response = app.error_page(caller, denied)
        except Exception:  # a bug costs this request only
            log.exception("%s %s %s failed", address, method, self.path)
            response = app.error_page(caller, Denied(500, "internal error; the station's log has the details"))
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        for k, v in app.headers(response).items():
            self.send_header(k, v)
        if response.stream is not None:
            self.close_connection = True
            self.send_header("Connection", "close")
            self.end_headers()
            self._stream(response.stream)
            return
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(response.body)

    def _stream(self, chunks: Any) -> None:
        """Write server-sent events; an empty chunk means "wait a tick". Ends when the page goes away."""
        self.connection.settimeout(IO_TIMEOUT)
        for chunk in chunks:
            if chunk:
                self.wfile.write(chunk)
                continue
            self.wfile.flush()
            if self.server.stopping.wait(TICK):
                return

    def _plain(self, status: int, text: str) -> None:
        body = (text + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.client_address[0], *args)


class _Held:
    """A connection the console holds, by descriptor; `state` as in admission.WAITING, or "busy"."""

    __slots__ = ("fd", "state")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.state = "handshake"


class ConsoleServer(ThreadingHTTPServer):
    """Threads per connection; the TLS handshake runs in the connection's thread."""

    daemon_threads = True

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, handshake_cpu: float = 0.1,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        super().__init__(sock.getsockname()[:2], ConsoleHandler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.context = context
        self.stopping = threading.Event()
        self.app: Any = None
        self.budget = HandshakeBudget(handshake_cpu, handshake_cpu * HANDSHAKE_BURST)
        self.max_connections = max_connections
        self.held: dict[int, _Held] = {}  # by descriptor, in the order accepted; guarded by _lock
        self._lock = threading.Lock()
        self._overdrawn: set[str] = set()
        self._full_logged_at = -FULL_LOG_EVERY

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """In the accepting thread, before a thread or any TLS: the handshake budget, then room."""
        key, now = peer_key(client_address[0]), time.monotonic()
        with self._lock:
            if not self.budget.allows(key, now):
                if key not in self._overdrawn and len(self._overdrawn) < 4096:
                    self._overdrawn.add(key)
                    log.warning("console: %s spent its TLS handshake CPU budget (handshake_cpu); closing its new "
                                "connections for %.1f s", key, self.budget.wait(key, now))
                return False
            self._overdrawn.discard(key)
            if self.max_connections and len(self.held) >= self.max_connections:
                victim = oldest_waiting(self.held.values())
                if now - self._full_logged_at >= FULL_LOG_EVERY:
                    self._full_logged_at = now
                    log.warning("console holds %d connections (console_max_connections): %s", len(self.held),
                                "the oldest waiting ones make room" if victim else "all busy, refusing new ones")
                if victim is None:
                    return False
                # its thread's recv returns at once and the thread ends; the descriptor stays open until
                # that thread closes it, after taking it out of `held` under this lock
                victim.state = "closing"
                with contextlib.suppress(OSError), socket.socket(fileno=os.dup(victim.fd)) as same:
                    same.shutdown(socket.SHUT_RDWR)
            self.held[request.fileno()] = _Held(request.fileno())
        return True

    def mark(self, conn: socket.socket, state: str) -> None:
        with self._lock:
            held = self.held.get(conn.fileno())
            if held is not None and held.state != "closing":
                held.state = state

    def finish_request(self, request: Any, client_address: Any) -> None:
        fd = request.fileno()
        tls: ssl.SSLSocket | None = None
        try:
            request.settimeout(IO_TIMEOUT)
            # the handshake is ours to run (not wrap_socket's), so that on failure the descriptor stays
            # open until it has left `held`: a closed one could be reused by the next connection
            tls = self.context.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
            if self._handshake(tls, client_address[0]):
                self.mark(tls, "read")
                ConsoleHandler(tls, client_address, self)
        except (ssl.SSLError, OSError) as exc:
            log.debug("console %s connection error: %s", client_address[0], exc)
        finally:
            with self._lock:
                self.held.pop(fd, None)
            with contextlib.suppress(OSError):
                (tls or request).close()

    def _handshake(self, tls: ssl.SSLSocket, address: str) -> bool:
        start = time.thread_time()  # the handshake runs in this thread: its CPU is what the client cost
        try:
            tls.do_handshake()
            return True
        except (ssl.SSLError, OSError) as exc:  # no or unknown client certificate ends here
            log.info("console %s TLS handshake refused: %s", address, exc)
            _linger(tls)
            return False
        finally:
            with self._lock:
                self.budget.charge(peer_key(address), time.thread_time() - start, time.monotonic())


def _linger(sock: socket.socket, limit: int = 1 << 16) -> None:
    """Close after a refused handshake without a reset: with TLS 1.3 the client has often sent its
    request already, and closing with it unread makes the kernel send RST, which can destroy our
    "certificate required" alert before the client reads it. Read (at most `limit` bytes, 1 s) first,
    from the TCP socket under the TLS one."""
    with contextlib.suppress(OSError), socket.socket(fileno=os.dup(sock.fileno())) as raw:
        raw.shutdown(socket.SHUT_WR)
        raw.settimeout(1.0)
        received = 0
        while received < limit:
            chunk = raw.recv(4096)
            if not chunk:
                break
            received += len(chunk)


class ConsoleService:
    """The console's socket and TLS material, prepared in the parent; `spawn` forks the server."""

    def __init__(self, station: Station, host: str, port: int, ledger: str | None = None, *,
                 handshake_cpu: float = 0.1, max_connections: int = MAX_CONNECTIONS) -> None:
        self.station = station
        self.ledger_location = ledger
        self.handshake_cpu, self.max_connections = handshake_cpu, max_connections
        led = station.open_ledger(ledger)
        try:
            store = ConsoleStore(led)
            certfile, keyfile = console_server_cert(station, host, store)
        finally:
            led.close()
        ctx = restrict_key_exchange(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))  # as the EST port: see tlsserver
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(certfile), str(keyfile))
        from provisioning.certs import to_pem

        ctx.load_verify_locations(cadata=to_pem([operator_ca(station).cert]).decode())
        ctx.verify_mode = ssl.CERT_REQUIRED  # every request, every page: no certificate, no handshake
        self.context = ctx
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self.sock = socket.create_server((host, port), family=family, backlog=64)
        except OSError as exc:
            raise StationError(f"--console: cannot listen on {host}:{port}: {exc.strerror}") from None
        self.host = host
        self.port = self.sock.getsockname()[1]

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}/"

    def spawn(self, close: socket.socket | None = None) -> int:
        """Fork the console process; returns its pid. It stops on SIGTERM."""
        return fork_side_process(self.sock, self.run, "console", close)

    def run(self) -> int:
        """Serve in this process until SIGTERM/SIGINT."""
        from provisioning.station.console.web import Console

        led = self.station.open_ledger(self.ledger_location)
        server = ConsoleServer(self.sock, self.context, self.handshake_cpu, self.max_connections)
        server.app = Console(self.station, ConsoleStore(led), stopping=server.stopping.is_set)

        def stop(signum: int, frame: Any) -> None:
            server.stopping.set()
            threading.Thread(target=server.shutdown, daemon=True).start()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        try:
            server.serve_forever(poll_interval=0.5)
        finally:
            server.server_close()
            led.close()
        return 0
