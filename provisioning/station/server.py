"""EST over HTTPS (RFC 7030): the standard library's HTTP server behind `ssl`, pre-forked, thread pools.

Only the HTTP and TLS plumbing lives here; every decision is `enrollment.Enrollment.handle`. The TLS
handshake runs in the connection's own thread (not in the accept loop), so a slow or broken client
never stalls the others, and any bad request ends in a status line, never in a dead server.

`workers` > 1 forks processes that share the listening socket and the ledger (SQLite WAL serialises
writers across processes; PostgreSQL does it by itself): Python's GIL caps one process at about one
core of signing and handshakes.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import os
import signal
import socket
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from provisioning.certs import to_pem
from provisioning.station.ca import Station
from provisioning.station.console import events
from provisioning.station.enrollment import ENROLL, REENROLL, Enrollment, Request
from provisioning.station.errors import Refusal, StationError

log = logging.getLogger("tether.station")

PREFIX = "/.well-known/est/"
PKCS7_TYPE = "application/pkcs7-mime; smime-type=certs-only"
MAX_BODY = 64 * 1024   # a P-256 or RSA-4096 CSR is under 4 KiB; anything near this is not a CSR
DRAIN_LIMIT = 1 << 20  # refused bodies up to this size are read and dropped so the refusal arrives
IO_TIMEOUT = 10.0      # per socket operation: handshake, headers, body
STOP_GRACE = 2.0
DEFAULT_THREADS = 32   # connections one worker handles at once (a factory line, not the internet)


class EstHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "tether-station"
    sys_version = ""  # no Python version in the Server header
    server: EstServer

    def do_GET(self) -> None:
        if self.path.split("?")[0] == PREFIX + "cacerts":
            self._send(200, self.server.enrollment.cacerts_body, PKCS7_TYPE, base64_body=True)
        else:
            self._send_text(404, f"no such EST resource {self.path!r}; try {PREFIX}cacerts")

    def do_POST(self) -> None:
        operation = self.path.split("?")[0].removeprefix(PREFIX)
        if not self.path.startswith(PREFIX) or operation not in (ENROLL, REENROLL):
            self._discard_body()
            self._send_text(404, f"no such EST operation {self.path!r}; use {PREFIX}{ENROLL} or {PREFIX}{REENROLL}")
            return
        body = self._read_body()
        if body is None:
            return
        req = Request(operation=operation,
                      content_type=(self.headers.get("Content-Type") or "").split(";")[0].strip().lower(),
                      body=body, basic=self._basic(), peer_der=self.connection.getpeercert(binary_form=True))
        try:
            answer = self.server.enrollment.handle(req)
        except Refusal as refusal:
            log.info("%s %s refused %d: %s", self.client_address[0], operation, refusal.status,
                     refusal.reason.splitlines()[0])
            events.record(self.server.enrollment.ledger, req, refusal, self.client_address[0])  # console's live page
            self._send_text(refusal.status, refusal.reason, refusal.headers)
            return
        except Exception:  # a bug or a ledger outage must cost one request, never the server
            log.exception("%s %s failed", self.client_address[0], operation)
            self._send_text(500, "internal error in the station; the operator's log has the details")
            return
        log.info("%s %s issued serial %s to %s%s", self.client_address[0], operation, answer.row.serial,
                 answer.row.device_id, " (retry, same certificate)" if answer.reused else "")
        self._send(200, answer.body, PKCS7_TYPE, base64_body=True)

    def _read_body(self) -> bytes | None:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            self._send_text(411, "chunked bodies are not accepted: send Content-Length")
            return None
        raw = self.headers.get("Content-Length")
        try:
            length = int(raw) if raw is not None else -1
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            self._send_text(411, f"Content-Length missing or invalid ({raw!r})")
            return None
        if length > MAX_BODY:
            self._discard_body()
            self._send_text(413, f"body of {length} bytes exceeds the {MAX_BODY}-byte limit for a CSR")
            return None
        body = self.rfile.read(length)
        if len(body) != length:
            self.close_connection = True
            return None
        return body

    def _discard_body(self) -> None:
        """Read and drop a body we refuse, then close: closing with unread data makes the kernel send
        a reset, which can destroy our answer before the client reads it. Past DRAIN_LIMIT we just close."""
        self.close_connection = True
        try:
            remaining = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return
        if remaining > DRAIN_LIMIT:
            return
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 16384))
            if not chunk:
                return
            remaining -= len(chunk)

    def _basic(self) -> tuple[str, str] | None:
        value = self.headers.get("Authorization") or ""
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            user, sep, password = base64.b64decode(token.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return ("", "")  # malformed credentials are refused as bad credentials
        return (user, password) if sep else ("", "")

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None,
              base64_body: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if base64_body:
            self.send_header("Content-Transfer-Encoding", "base64")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _send_text(self, status: int, text: str, headers: dict[str, str] | None = None) -> None:
        self._send(status, (text.rstrip() + "\n").encode(), "text/plain; charset=utf-8", headers)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.client_address[0], *args)


class EstServer(HTTPServer):
    """An HTTP server on an already bound (possibly shared) socket, served by a fixed pool of threads.

    Each thread blocks in accept() and then handles that connection, TLS handshake included, so a slow
    client holds up only its own thread; no thread is created per connection (that and the selector
    loop of ThreadingHTTPServer cost about a tenth of an enrollment here).
    """

    def __init__(self, sock: socket.socket, enrollment: Enrollment, context: ssl.SSLContext) -> None:
        super().__init__(sock.getsockname()[:2], EstHandler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.enrollment = enrollment
        self.context = context
        self._stopping = threading.Event()

    def serve_pool(self, threads: int) -> None:
        """Serve until `stop()`, then give in-flight requests STOP_GRACE seconds to finish.

        Threads still busy after that are idle keep-alive connections (or stuck clients); they are
        daemons and end with the process. A request cut there loses only its answer: its ledger
        transaction committed whole or not at all, and the device's retry gets the same certificate.
        """
        pool = [threading.Thread(target=self._accept_loop, name=f"est-{i}", daemon=True) for i in range(threads)]
        for t in pool:
            t.start()
        self._stopping.wait()
        deadline = time.monotonic() + STOP_GRACE
        for t in pool:
            t.join(max(0.0, deadline - time.monotonic()))

    def stop(self) -> None:
        self._stopping.set()
        # wakes every thread blocked in accept(); the socket is shared with sibling workers, which
        # are being stopped by the same signal
        with contextlib.suppress(OSError):
            self.socket.shutdown(socket.SHUT_RDWR)

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                request, client_address = self.socket.accept()
            except OSError as exc:
                if not self._stopping.is_set():
                    log.warning("accept failed: %s", exc)
                continue
            try:
                self.finish_request(request, client_address)
            except Exception:  # one connection's bug must not cost the thread (logged with its traceback)
                log.exception("%s: unexpected error", client_address[0])
            finally:
                with contextlib.suppress(OSError):
                    request.close()

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(IO_TIMEOUT)
        try:
            tls = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            log.info("%s TLS handshake failed: %s", client_address[0], exc)
            return
        try:
            EstHandler(tls, client_address, self)
        except (ssl.SSLError, OSError) as exc:  # client vanished mid-request
            log.info("%s connection error: %s", client_address[0], exc)
        finally:
            with contextlib.suppress(OSError):
                tls.close()


def tls_context(station: Station, certfile: str, keyfile: str) -> ssl.SSLContext:
    """Server TLS: the station's certificate; client certificates optional, verified against the
    station's root (re-enrollment) and the bootstrap CAs (first enrollment without an OTP)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile, keyfile)
    ctx.load_verify_locations(cadata=to_pem([station.root, *station.bootstrap_cas]).decode())
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.num_tickets = 0  # every device connects once or twice a year: resumption tickets are wasted work
    return ctx


def serve(station: Station, host: str, port: int, *, workers: int = 1, threads: int = DEFAULT_THREADS,
          ledger: str | None = None, ready: Any = None, console: Any = None) -> int:
    """Serve EST on host:port until SIGTERM/SIGINT; returns the exit status.

    `ready(port)` is called once the socket listens (the CLI prints the URL); `console`, a bound
    `console.server.ConsoleService`, is forked beside the workers and supervised with them. Raises StationError
    when the address cannot be bound or the CA material is unusable.
    """
    led = station.open_ledger(ledger)
    try:
        certfile, keyfile = station.ensure_server_cert(host, led)
    finally:
        led.close()
    Enrollment(station, led)  # loads and checks the CA key once, before forking, so errors show here
    context = tls_context(station, str(certfile), str(keyfile))
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=1024)
    except OSError as exc:
        raise StationError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    if ready is not None:
        ready(sock.getsockname()[1])
    children: set[int] = set()
    if console is not None:  # console.ConsoleService: its own process, sharing only the ledger
        children.add(console.spawn(close=sock))
    if workers <= 1 and not children:
        return _worker(station, sock, context, ledger, threads)
    for _ in range(max(1, workers)):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _worker(station, sock, context, ledger, threads)
            finally:
                os._exit(code)
        children.add(pid)
    sock.close()
    return _supervise(children)


def _worker(station: Station, sock: socket.socket, context: ssl.SSLContext, ledger: str | None,
            threads: int) -> int:
    led = station.open_ledger(ledger)
    server = EstServer(sock, Enrollment(station, led), context)

    def stop(signum: int, frame: Any) -> None:
        server.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.serve_pool(threads)
    finally:
        server.server_close()
        led.close()
    return 0


def _supervise(children: set[int]) -> int:
    """Wait for the workers; on SIGTERM/SIGINT, or when one dies, stop them all."""
    def forward(signum: int, frame: Any) -> None:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    while children:
        try:
            pid, code = os.wait()
        except ChildProcessError:
            break
        children.discard(pid)
        if os.waitstatus_to_exitcode(code) != 0:
            print(f"tether-station: worker {pid} exited with {os.waitstatus_to_exitcode(code)}; stopping",
                  file=sys.stderr)
            status = 1
            forward(signal.SIGTERM, None)
    return status
