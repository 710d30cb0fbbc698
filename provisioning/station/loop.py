"""The EST server's connection loop: one selector per worker process, for every connection's I/O.
What a complete request is answered is computed elsewhere (`compute.Compute`: in this loop's thread
with a commit thread for the ledger writes, or in a pool of threads when `threads` > 0).

Why a loop: a connection costs nothing while it is idle, shakes hands or trickles its headers, so
a thousand idle sockets or clients that send a header line every few seconds cannot take the
threads that sign certificates (issue 13: 200 idle connections used to delay `cacerts` by 30 s).
The loop accepts, runs the TLS handshake and reads each request whole (`wire.RequestReader`), within
one deadline per request (not per `recv`); only complete requests are handed to `compute` (which
answers through `deliver`). Who gets a connection at accept is `admission.Admission`'s: at most
`max_per_client` per address and `max_connections` per worker (about 31 KB each; past that the
oldest connection still shaking hands or reading makes room), and each peer's TLS handshakes within
`handshake_cpu` CPU seconds per second, measured here with the loop thread's CPU clock.

Every request that was read gets a status line: a body shorter than its Content-Length is answered
408 when the deadline passes (400 when the client half-closes), and after any answer that ends the
connection the loop shuts down its sending side and drains what the client still sends for
LINGER seconds, so unread data never turns into a reset that destroys the answer.

While a request is computed its connection is busy: the loop does not touch it (it is in no
selector set and `_expire` skips it), so one thread at a time uses each socket. With a pool, the
thread that computed a final answer writes it and registers the socket for the drain itself
(`send_and_linger`: one wake-up per request, not two, issue 24 item 3); epoll lets another thread
add a descriptor while the loop waits. Everything else comes back through `compute.collect`, which
the loop runs after each select (the wake-up socket makes the select return).
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import ssl
import time
from collections.abc import Collection
from dataclasses import dataclass

from provisioning.station.admission import Admission, peer_key
from provisioning.station.compute import Compute
from provisioning.station.enrollment import Enrollment
from provisioning.station.routes import Response, text
from provisioning.station.wire import BadRequest, HttpRequest, RequestReader

log = logging.getLogger("tether.station")

MAX_BODY = 64 * 1024   # a P-256 or RSA-4096 CSR is under 4 KiB; anything near this is not a CSR
DRAIN_LIMIT = 1 << 20  # after a final answer, up to this much of what the client still sends is read and dropped
LINGER = 2.0           # ... for at most this long
STOP_GRACE = 2.0
DEFAULT_THREADS = 0    # 0: the loop computes requests, a commit thread makes their ledger writes durable
POOL_THREADS = 8       # with a pool (an HSM signs): requests one worker computes at once
TICK = 0.25            # how often deadlines are checked


@dataclass(frozen=True)
class Limits:
    """Per-connection limits. `request_timeout` covers the handshake and one whole request (head and
    body), however slowly it trickles; `idle_timeout` is how long a kept-alive connection may wait
    for its next request; `max_per_client` caps the connections one address holds (0 = no cap);
    `max_connections` those one worker holds (0 = no cap); `handshake_cpu` is the CPU seconds per
    second one peer (IPv4 address, IPv6 /64) may make a worker spend on TLS handshakes, with
    `admission.HANDSHAKE_BURST` seconds of it available at once (0 = no budget)."""

    request_timeout: float = 10.0
    idle_timeout: float = 5.0
    max_per_client: int = 64
    max_body: int = MAX_BODY
    max_connections: int = 2048   # x ~31 KB: 64 MB per worker at most
    handshake_cpu: float = 0.1    # 10% of a core: ~200 X25519 handshakes/s, after a 3 CPU-second burst


class _Conn:
    __slots__ = ("addr", "continued", "deadline", "drained", "idle", "key", "mask", "out", "peer", "reader",
                 "sock", "state", "then")

    def __init__(self, sock: ssl.SSLSocket, addr: str, deadline: float, max_body: int) -> None:
        self.sock = sock
        self.addr = addr
        self.key = peer_key(addr)  # what the handshake budget is kept for
        self.state = "handshake"   # handshake -> read -> busy -> write -> read ... | linger
        self.deadline = deadline
        self.reader = RequestReader(max_body)
        self.out = bytearray()
        self.then = "read"         # after the write: "read" (keep-alive) or "linger"
        self.mask = 0              # selector events registered
        self.peer: bytes | None = None
        self.drained = 0
        self.continued = False     # "100 Continue" sent for the current request
        self.idle = False          # kept alive, waiting for the next request (idle_timeout applies)


class EstServer:
    """One worker's loop on an already bound (possibly shared) listening socket."""

    def __init__(self, sock: socket.socket, enrollment: Enrollment, context: ssl.SSLContext,
                 threads: int = DEFAULT_THREADS, limits: Limits = Limits()) -> None:
        self.listener = sock
        self.enrollment = enrollment
        self.context = context
        self.limits = limits
        self.selector = selectors.DefaultSelector()
        self.conns: dict[int, _Conn] = {}
        self.admission = Admission(limits.max_per_client, limits.max_connections, limits.handshake_cpu)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.stopping = False  # set by `stop()`; `compute` reads it too (answers then end their connection)
        self._accept_paused = False
        self.compute: Compute[_Conn] = Compute(enrollment, threads, self)  # what complete requests are answered

    # -- life cycle ------------------------------------------------------------------------------------
    def serve(self) -> None:
        """Serve until `stop()`, then give requests being computed STOP_GRACE seconds to finish.

        A request cut there loses only its answer: its ledger transaction committed whole or not at
        all, and the device's retry gets the same certificate.
        """
        self.listener.setblocking(False)
        self.compute.start()
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        self.selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        next_tick = time.monotonic() + TICK
        stop_by: float | None = None
        try:
            while True:
                now = time.monotonic()
                if self.stopping and stop_by is None:
                    stop_by = now + STOP_GRACE
                    if not self._accept_paused:
                        self.selector.unregister(self.listener)
                    self._accept_paused = True
                if stop_by is not None and (self.compute.busy == 0 or now >= stop_by):
                    return
                for key, events in self.selector.select(max(0.0, min(next_tick, stop_by or next_tick) - now)):
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        with contextlib.suppress(BlockingIOError):
                            self._wake_r.recv(4096)
                    else:
                        conn = self.conns.get(key.fd)
                        if conn is not None and conn.sock.fileno() == key.fd:
                            self._ready(conn, events)
                self.compute.collect()
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + TICK
                    self._expire(now)
                    if self._accept_paused and not self.stopping:
                        self._accept_paused = False
                        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        finally:
            for conn in list(self.conns.values()):
                self._close(conn)
            self.compute.stop(STOP_GRACE)  # what the commit thread holds commits; unanswered, as after a crash
            self.selector.close()
            self._wake_r.close()
            self._wake_w.close()

    def stop(self) -> None:
        """Safe from a signal handler or another thread."""
        self.stopping = True
        self.wake()

    # -- what `compute` calls (`compute.Connections`) ----------------------------------------------------
    def handles(self) -> Collection[_Conn]:
        return self.conns.values()

    def wake(self) -> None:
        """From any thread: make the selector return."""
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def deliver(self, conn: _Conn, response: Response | None, keep_alive: bool) -> None:
        """In the loop thread: answer a request `compute` handed back (None: a pool thread wrote part
        of a final answer; the rest, then linger). Nothing if the connection was closed meanwhile
        (the worker stopping)."""
        if conn.sock.fileno() < 0:
            return
        if response is None:
            conn.then, conn.state = "linger", "write"
            conn.deadline = time.monotonic() + self.limits.request_timeout
            self._write(conn)
        else:
            self._answer(conn, response, keep_alive)

    def send_and_linger(self, conn: _Conn, response: Response) -> bool:
        """In a pool thread: write a final answer and hand the socket to the selector for the drain
        (True). False when the answer did not fit the socket's buffer at once or the send failed:
        what is left of it waits in `conn.out`, and the loop's own write finishes (or closes)."""
        out = response.render(False)
        try:
            sent = conn.sock.send(out)
        except (ssl.SSLError, OSError):  # would block (the same bytes must be retried) or failed
            sent = 0
        if sent < len(out):
            conn.out += out[sent:]
            return False
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_WR)
        conn.deadline = time.monotonic() + LINGER
        conn.then = conn.state = "linger"
        conn.mask = selectors.EVENT_READ  # before the loop can see an event for it
        try:
            self.selector.register(conn.sock.fileno(), selectors.EVENT_READ)
        except (OSError, ValueError, KeyError):  # closed or gone under us: the loop's deadline closes it
            conn.mask = 0
        return True

    # -- the loop's steps ------------------------------------------------------------------------------
    def _accept(self) -> None:
        for _ in range(64):  # the socket is shared with sibling workers: take a batch, then serve others
            try:
                raw, address = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: the connection waits in the backlog
                # the listener stays readable, so stop watching it until the next tick (no busy loop)
                log.warning("accept failed: %s; accepting again in %.2f s", exc, TICK)
                self.selector.unregister(self.listener)
                self._accept_paused = True
                return
            addr = address[0]
            if not self.admission.admit(addr, time.monotonic(), self.conns.values(), self._close):
                raw.close()
                continue
            raw.setblocking(False)
            try:
                tls = self.context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            except (ssl.SSLError, OSError) as exc:
                log.info("%s TLS setup failed: %s", addr, exc)
                self.admission.closed(addr)
                raw.close()
                continue
            conn = _Conn(tls, addr, time.monotonic() + self.limits.request_timeout, self.limits.max_body)
            self.conns[tls.fileno()] = conn
            self._handshake(conn)

    def _ready(self, conn: _Conn, events: int) -> None:
        if conn.state == "handshake":
            self._handshake(conn)
        elif conn.state == "read":
            self._read(conn)
        elif conn.state == "write":
            self._write(conn)
        elif conn.state == "linger":
            self._drain(conn)

    def _handshake(self, conn: _Conn) -> None:
        start = time.thread_time()  # OpenSSL runs in this thread: its CPU is what the peer made us spend
        try:
            conn.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._watch(conn, selectors.EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            self._watch(conn, selectors.EVENT_WRITE)
            return
        except (ssl.SSLError, OSError) as exc:
            log.info("%s TLS handshake failed: %s", conn.addr, exc)
            self._close(conn)
            return
        finally:
            self.admission.budget.charge(conn.key, time.thread_time() - start, time.monotonic())
        conn.peer = conn.sock.getpeercert(binary_form=True)
        conn.state = "read"
        self._read(conn)  # the first request may have arrived with the handshake's last flight

    def _read(self, conn: _Conn) -> None:
        while True:
            try:
                request = conn.reader.next()
            except BadRequest as bad:
                self._answer(conn, text(bad.status, bad.reason, close=True), keep_alive=False)
                return
            if request is not None:
                self._dispatch(conn, request)
                return
            if conn.reader.head is not None and conn.reader.head.expects_continue and not conn.continued:
                conn.continued = True
                with contextlib.suppress(ssl.SSLError, OSError):
                    conn.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            try:
                data = conn.sock.recv(65536)
            except ssl.SSLWantReadError:
                self._watch(conn, selectors.EVENT_READ)
                return
            except ssl.SSLWantWriteError:
                self._watch(conn, selectors.EVENT_WRITE)
                return
            except (ssl.SSLError, OSError) as exc:
                log.info("%s connection error: %s", conn.addr, exc)
                self._close(conn)
                return
            if not data:
                if conn.reader.started:  # the client half-closed in the middle of a request
                    self._answer(conn, text(400, "connection closed before the request was complete (body shorter "
                                                 "than Content-Length?)", close=True), keep_alive=False)
                else:
                    self._close(conn)
                return
            if conn.idle:  # a kept-alive connection's next request: its own whole deadline
                conn.idle = False
                conn.deadline = time.monotonic() + self.limits.request_timeout
            conn.reader.feed(data)

    def _dispatch(self, conn: _Conn, request: HttpRequest) -> None:
        conn.state = "busy"
        self._watch(conn, 0)
        self.compute.submit(conn, request)

    def _answer(self, conn: _Conn, response: Response, keep_alive: bool) -> None:
        keep = keep_alive and not response.close
        conn.out += response.render(keep)
        conn.then = "read" if keep else "linger"
        conn.state = "write"
        conn.deadline = time.monotonic() + self.limits.request_timeout
        self._write(conn)

    def _write(self, conn: _Conn) -> None:
        while conn.out:
            try:
                sent = conn.sock.send(conn.out)
            except ssl.SSLWantWriteError:
                self._watch(conn, selectors.EVENT_WRITE)
                return
            except ssl.SSLWantReadError:
                self._watch(conn, selectors.EVENT_READ)
                return
            except (ssl.SSLError, OSError) as exc:
                log.info("%s connection error while answering: %s", conn.addr, exc)
                self._close(conn)
                return
            del conn.out[:sent]
        if conn.then == "read":
            conn.state, conn.continued, conn.idle = "read", False, True
            conn.deadline = time.monotonic() + self.limits.idle_timeout
            self._read(conn)  # a pipelined request may be waiting already
        else:
            self._linger(conn)

    def _linger(self, conn: _Conn) -> None:
        """Send FIN after the answer, then read and drop what the client still sends, so closing with
        unread data does not make the kernel send a reset that can destroy the answer in flight."""
        conn.state = "linger"
        conn.deadline = time.monotonic() + LINGER
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_WR)  # drops the TLS layer: what follows is read raw
        self._drain(conn)

    def _drain(self, conn: _Conn) -> None:
        while True:
            try:
                data = conn.sock.recv(65536)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
                self._watch(conn, selectors.EVENT_READ)
                return
            except OSError:
                data = b""
            conn.drained += len(data)
            if not data or conn.drained > DRAIN_LIMIT:
                self._close(conn)
                return

    def _expire(self, now: float) -> None:
        for conn in [c for c in self.conns.values() if c.state != "busy" and c.deadline <= now]:
            if conn.state == "read" and conn.reader.started:
                log.info("%s request not complete within %.0f s", conn.addr, self.limits.request_timeout)
                self._answer(conn, text(408, f"request not complete within {self.limits.request_timeout:.0f} s",
                                        close=True), keep_alive=False)
            else:
                self._close(conn)

    # -- bookkeeping -----------------------------------------------------------------------------------
    def _watch(self, conn: _Conn, mask: int) -> None:
        if mask == conn.mask:
            return
        fd = conn.sock.fileno()
        if conn.mask == 0:
            self.selector.register(fd, mask)
        elif mask == 0:
            self.selector.unregister(fd)
        else:
            self.selector.modify(fd, mask)
        conn.mask = mask

    def _close(self, conn: _Conn) -> None:
        fd = conn.sock.fileno()
        if fd < 0:
            return
        if conn.mask:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(fd)
            conn.mask = 0
        self.conns.pop(fd, None)
        self.admission.closed(conn.addr)
        with contextlib.suppress(OSError):
            conn.sock.close()
