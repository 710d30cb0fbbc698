"""EST over HTTPS (RFC 7030): the listening socket, TLS settings and pre-forked worker processes.

Each worker runs one `loop.EstServer` (a selector loop for the connections' I/O), which hands each
complete request to its `compute.Compute` (computed in the loop thread, with a commit thread for the
ledger writes; or by a thread pool, `threads` > 0);
the bytes of a request are read by `wire.RequestReader` and every answer is decided by
`routes.respond_steps` (for enrollment, `enrollment.Enrollment.steps`).

`workers` > 1 forks processes that share the listening socket and the ledger (SQLite WAL serialises
writers across processes; PostgreSQL does it by itself): Python's GIL caps one process at about one
core of signing and handshakes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
from typing import Any

from hal import systemd
from provisioning.certs import to_pem
from provisioning.station.ca import Station
from provisioning.station.enrollment import Enrollment
from provisioning.station.errors import StationError
from provisioning.station.loop import DEFAULT_THREADS, POOL_THREADS, EstServer, Limits
from provisioning.station.metrics import MeasuredEnrollment, Recorder, Silent
from provisioning.station.supervisor import ESSENTIAL, Supervisor
from provisioning.tlsserver import no_resumption, read_ahead, restrict_key_exchange

__all__ = ["DEFAULT_THREADS", "POOL_THREADS", "EstServer", "Limits", "serve", "tls_context"]


def tls_context(station: Station, certfile: str, keyfile: str) -> ssl.SSLContext:
    """Server TLS: the station's certificate; client certificates optional, verified against the
    station's CA chain (re-enrollment: the issuing CA is trusted here, so a client that sends its
    leaf alone verifies) and the bootstrap CAs (first enrollment without an OTP). Key exchange over
    elliptic curves only, X25519 first (`tlsserver`: no finite-field key share to compute before
    authentication), the station's EC P-256 key, no session resumption (`tlsserver.no_resumption`), and
    records read ahead (`tlsserver.read_ahead`)."""
    ctx = restrict_key_exchange(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile, keyfile)
    ctx.load_verify_locations(cadata=to_pem([*station.ca_chain, *station.bootstrap_cas]).decode())  # ends at the root
    ctx.verify_mode = ssl.CERT_OPTIONAL
    # a client that half-closes after its request (no close_notify) still gets its answer: without
    # this, OpenSSL 3 fails the session on the EOF and the answer cannot be written
    ctx.options |= ssl.OP_IGNORE_UNEXPECTED_EOF
    # every device connects once or twice a year: resumption (tickets, a session cache) is wasted work;
    # and one `read` for what the socket holds, not two per record (the loop reads until it would block)
    return read_ahead(no_resumption(ctx))


def _raise_fd_limit() -> None:
    """Idle connections cost a descriptor each: use the hard limit, not the soft default of 1024."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 16
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def serve(station: Station, host: str, port: int, *, workers: int = 1, threads: int = DEFAULT_THREADS,
          ledger: str | None = None, limits: Limits | None = None, ready: Any = None, console: Any = None,
          metrics: Any = None, recorder: Recorder | None = None) -> int:
    """Serve EST on host:port until SIGTERM/SIGINT; returns the exit status.

    `ready(port)` is called once the socket listens (the CLI prints the URL); `console`, a bound
    `console.server.ConsoleService`, and `metrics`, a bound `metrics_server.MetricsService`, are forked
    beside the workers; `recorder` counts every enrollment (metrics.Silent when None).
    `supervisor.Supervisor` watches them all. systemd gets READY=1 once the socket listens and the
    workers run. Raises StationError when the address cannot be bound or the CA material is unusable.
    """
    limits = limits or Limits()
    recorder = recorder or Silent()
    led = station.open_ledger(ledger)
    try:
        certfile, keyfile = station.ensure_server_cert(host, led)
    finally:
        led.close()
    Enrollment(station, led)  # loads and checks the CA key once, before forking, so errors show here
    context = tls_context(station, str(certfile), str(keyfile))
    _raise_fd_limit()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=1024)
    except OSError as exc:
        raise StationError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    bound = sock.getsockname()[1]
    if ready is not None:
        ready(bound)
    supervisor = Supervisor(on_restart=recorder.restart)
    for side, role in ((console, "console"), (metrics, "metrics")):
        if side is not None:  # its own process, sharing only the ledger
            supervisor.add(side.spawn(close=sock), role)
    if workers <= 1 and not supervisor.children:
        systemd.notify(f"READY=1\nSTATUS=EST on port {bound}, 1 worker")
        return _worker(station, sock, context, ledger, threads, limits, recorder)

    def start_worker() -> int:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _worker(station, sock, context, ledger, threads, limits, recorder)
            finally:
                os._exit(code)
        return pid

    for _ in range(max(1, workers)):
        supervisor.add(start_worker(), ESSENTIAL, start=start_worker)
    systemd.notify(f"READY=1\nSTATUS=EST on port {bound}, {max(1, workers)} worker(s)")
    try:
        return supervisor.run()
    finally:
        sock.close()  # kept open until now: a restarted worker inherits it


def _worker(station: Station, sock: socket.socket, context: ssl.SSLContext, ledger: str | None,
            threads: int, limits: Limits, recorder: Recorder) -> int:
    led = station.open_ledger(ledger)
    enrollment = Enrollment(station, led) if isinstance(recorder, Silent) else MeasuredEnrollment(station, led,
                                                                                                  recorder)
    server = EstServer(sock, enrollment, context, threads, limits)

    def stop(signum: int, frame: Any) -> None:
        server.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    enrollment.refusals.start()  # summaries and retention of refusal records, in this process
    try:
        server.serve()
    finally:
        enrollment.refusals.stop()
        sock.close()
        led.close()
    return 0
