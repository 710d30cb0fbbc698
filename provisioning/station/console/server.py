"""The console over HTTPS with required client certificates, in its own process beside the EST workers.

`ConsoleServer.bind` runs in `serve`'s parent process (so a bad address or missing certificate fails
before anything forks), `spawn` forks the process that serves it. The console shares only the ledger
with the EST workers: it polls the ledger for the live page (a read per second per open page) and
writes only its own tables, the OTPs of batches and revocations, so enrollment never waits for it.
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

from provisioning.station.ca import Station
from provisioning.station.console.operators import console_server_cert, operator_ca
from provisioning.station.console.security import Denied, identify
from provisioning.station.console.store import ConsoleStore
from provisioning.station.errors import StationError
from provisioning.tlsserver import restrict_key_exchange

log = logging.getLogger("tether.station.console")

IO_TIMEOUT = 30.0
MAX_FORM = 16 * 1024
TICK = 1.0  # seconds between live updates on an open live page


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
        app = self.server.app
        address = self.client_address[0]
        caller = None
        try:
            der = self.connection.getpeercert(binary_form=True)
            serial = None
            if der is not None:
                from cryptography import x509

                serial = x509.load_der_x509_certificate(der).serial_number
            caller = identify(app.store, serial, address, int(time.time()))
            response = app.handle(caller, method, self.path, form)
        except Denied as denied:
            if denied.status in (401, 403):
                who = caller.who if caller else "unknown certificate"
                app.store.audit(who, f"{method} {self.path.split('?')[0]}", denied.reason, address, "refused")
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


class ConsoleServer(ThreadingHTTPServer):
    """Threads per connection; the TLS handshake runs in the connection's thread."""

    daemon_threads = True

    def __init__(self, sock: socket.socket, context: ssl.SSLContext) -> None:
        super().__init__(sock.getsockname()[:2], ConsoleHandler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.context = context
        self.stopping = threading.Event()
        self.app: Any = None

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(IO_TIMEOUT)
        try:
            tls = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:  # no or unknown client certificate ends here
            log.info("console %s TLS handshake refused: %s", client_address[0], exc)
            _linger(request)
            return
        try:
            ConsoleHandler(tls, client_address, self)
        except (ssl.SSLError, OSError) as exc:
            log.debug("console %s connection error: %s", client_address[0], exc)
        finally:
            with contextlib.suppress(OSError):
                tls.close()


def _linger(sock: socket.socket, limit: int = 1 << 16) -> None:
    """Close after a refused handshake without a reset: with TLS 1.3 the client has often sent its
    request already, and closing with it unread makes the kernel send RST, which can destroy our
    "certificate required" alert before the client reads it. Read (at most `limit` bytes, 1 s) first."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(1.0)
        received = 0
        while received < limit:
            chunk = sock.recv(4096)
            if not chunk:
                break
            received += len(chunk)


class ConsoleService:
    """The console's socket and TLS material, prepared in the parent; `spawn` forks the server."""

    def __init__(self, station: Station, host: str, port: int, ledger: str | None = None) -> None:
        self.station = station
        self.ledger_location = ledger
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
        pid = os.fork()
        if pid:
            self.sock.close()
            return pid
        code = 1
        try:
            if close is not None:
                close.close()
            code = self.run()
        except Exception:
            log.exception("console stopped")
        finally:
            os._exit(code)

    def run(self) -> int:
        """Serve in this process until SIGTERM/SIGINT."""
        from provisioning.station.console.web import Console

        led = self.station.open_ledger(self.ledger_location)
        server = ConsoleServer(self.sock, self.context)
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
